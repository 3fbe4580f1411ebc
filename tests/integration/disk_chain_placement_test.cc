// Where a migrated chain's lower layers land at the destination (helper/disk_chain_migration.h,
// place_chain + link_chain), on real files: a delta of the same name and content ID that sits
// on another parent belongs to another chain here, so it is neither counted as held nor
// re-linked; one that sits on exactly the layers held below it is held and left untouched.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "helper/disk_chain_migration.h"
#include "test_util.h"

namespace kvmig::helper {
namespace {

namespace fs = std::filesystem;
constexpr uint64_t kSize = 1 << 20;

void write_raw(const fs::path& p, uint8_t fill) {
  std::ofstream(p, std::ios::binary) << std::string(kSize, static_cast<char>(fill));
}
// An empty kvmig delta (sparse, no data) on `parent`, as `kvmig disk snapshot` makes one.
void write_delta(const fs::path& p, const std::string& parent) {
  { std::ofstream f(p, std::ios::binary); }
  fs::resize_file(p, kSize);
  std::ofstream(p.string() + ".kvmig-delta") << nlohmann::json{{"kvmig_delta", 1}, {"parent", parent}, {"size", kSize}}.dump();
}
std::string read_text(const fs::path& p) {
  std::ifstream f(p);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

class ChainPlacement : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test::make_temp_dir("kvmig-placement");
    fs::create_directories(src());
    fs::create_directories(dst());
    write_raw(src() / "base.img", 0xa1);
    write_delta(src() / "overlay.img", "base.img");
    write_delta(src() / "top.img", "overlay.img");
    auto chain = source_chain((src() / "top.img").string());
    ASSERT_TRUE(chain.ok()) << chain.error().message;
    ASSERT_EQ(chain->lower.size(), 2u);
    disk_.size = kSize;
    disk_.block_bytes = 65536;
    disk_.lower = chain->lower;
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path src() const { return fs::path(dir_) / "src"; }
  fs::path dst() const { return fs::path(dir_) / "dst"; }
  std::string dir_;
  MigrationDisk disk_;
};

TEST_F(ChainPlacement, ASameIdDeltaOnAnotherParentIsNeitherHeldNorRelinked) {
  // Another VM's chain at the destination: a different base under the same name, and an empty
  // overlay (same name, size and content ID as the source's) on it.
  write_raw(dst() / "base.img", 0xb2);
  write_delta(dst() / "overlay.img", "base.img");
  const std::string before = read_text(dst() / "overlay.img.kvmig-delta");
  auto placed = place_chain((dst() / "top.img").string(), disk_);
  ASSERT_TRUE(placed.ok()) << placed.error().message;
  ASSERT_EQ(placed->size(), 2u);
  EXPECT_EQ((*placed)[0].answer, LayerAnswer::copy);
  EXPECT_NE((*placed)[0].path, (dst() / "base.img").string());
  EXPECT_EQ((*placed)[1].answer, LayerAnswer::copy) << "an overlay on another base is not this chain's";
  EXPECT_NE((*placed)[1].path, (dst() / "overlay.img").string());
  ASSERT_TRUE(link_chain((dst() / "top.img").string(), *placed, kSize).ok());
  EXPECT_EQ(read_text(dst() / "overlay.img.kvmig-delta"), before) << "the other chain's descriptor was rewritten";
}

TEST_F(ChainPlacement, ADeltaOnTheHeldBaseIsHeldAndLeftAsItIs) {
  write_raw(dst() / "base.img", 0xa1);
  write_delta(dst() / "overlay.img", "base.img");
  const std::string before = read_text(dst() / "overlay.img.kvmig-delta");
  auto placed = place_chain((dst() / "top.img").string(), disk_);
  ASSERT_TRUE(placed.ok()) << placed.error().message;
  ASSERT_EQ(placed->size(), 2u);
  EXPECT_EQ((*placed)[0].answer, LayerAnswer::held);
  EXPECT_EQ((*placed)[1].answer, LayerAnswer::held);
  EXPECT_EQ((*placed)[1].path, (dst() / "overlay.img").string());
  ASSERT_TRUE(link_chain((dst() / "top.img").string(), *placed, kSize).ok());
  EXPECT_EQ(read_text(dst() / "overlay.img.kvmig-delta"), before);
  EXPECT_NE(read_text(dst() / "top.img.kvmig-delta").find("overlay.img"), std::string::npos);
}

}  // namespace
}  // namespace kvmig::helper
