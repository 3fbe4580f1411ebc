// Content IDs of disk layers: they follow the bytes (and a delta's allocation), and a cached
// ID is used only when its key matches the file and its hashing began well after the file's
// last change; a stale or racy cache is never believed.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "base/fd.h"
#include "helper/disk_layer_id.h"
#include "test_util.h"

namespace kvmig::helper {
namespace {

namespace fs = std::filesystem;

class LayerIdTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test::make_temp_dir("kvmig-layerid");
    ASSERT_FALSE(dir_.empty());
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string make(const std::string& name, uint64_t size) {
    std::string p = dir_ + "/" + name;
    Fd fd(::open(p.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644));
    EXPECT_EQ(::ftruncate(fd.get(), static_cast<off_t>(size)), 0);
    return p;
  }
  void write_at(const std::string& p, uint64_t off, const std::vector<char>& bytes) {
    Fd fd(::open(p.c_str(), O_WRONLY));
    ASSERT_EQ(::pwrite(fd.get(), bytes.data(), bytes.size(), static_cast<off_t>(off)),
              static_cast<ssize_t>(bytes.size()));
  }
  nlohmann::json sidecar(const std::string& p) {
    return nlohmann::json::parse(test::read_file(p + kLayerIdSuffix), nullptr, false);
  }
  void put_sidecar(const std::string& p, const nlohmann::json& j) {
    std::ofstream(p + kLayerIdSuffix) << j.dump();
  }

  std::string dir_;
};

TEST_F(LayerIdTest, IdFollowsTheBytesNotTheFile) {
  std::string a = make("a", 1 << 20), b = make("b", 1 << 20);
  write_at(a, 8192, std::vector<char>(4096, 'x'));
  write_at(b, 8192, std::vector<char>(4096, 'x'));
  auto ia = layer_content_id(a, false), ib = layer_content_id(b, false);
  ASSERT_TRUE(ia.ok() && ib.ok());
  EXPECT_EQ(ia->id, ib->id);
  EXPECT_FALSE(ia->id.zero());
  write_at(b, 8192, std::vector<char>(1, 'y'));
  auto changed = layer_content_id(b, false);
  ASSERT_TRUE(changed.ok());
  EXPECT_NE(changed->id, ia->id);
  EXPECT_FALSE(changed->from_cache);
}

TEST_F(LayerIdTest, AllocationCountsForDeltasOnly) {
  // Same bytes (all zero), but one holds an allocated zero block where the other has a hole.
  std::string hole = make("hole", 1 << 20), zeros = make("zeros", 1 << 20);
  write_at(zeros, 65536, std::vector<char>(65536, 0));
  EXPECT_EQ(layer_content_id(hole, false)->id, layer_content_id(zeros, false)->id);
  EXPECT_NE(layer_content_id(hole, true)->id, layer_content_id(zeros, true)->id);
}

TEST_F(LayerIdTest, CacheIsUsedOnlyWhenItsKeyMatchesAndItIsNotRacy) {
  std::string p = make("layer", 1 << 20);
  write_at(p, 0, std::vector<char>(4096, 'a'));
  auto first = layer_content_id(p, false);
  ASSERT_TRUE(first.ok());
  EXPECT_FALSE(first->from_cache);
  nlohmann::json j = sidecar(p);
  ASSERT_FALSE(j.is_discarded());
  EXPECT_EQ(j["id"], first->id.hex());
  // Just written: racy, so hashed again rather than believed.
  EXPECT_FALSE(layer_content_id(p, false)->from_cache);

  // A forged entry whose hashing "began" long after the file's last change, with a wrong ID:
  // believed only while its key matches — which is what makes the key the whole guarantee.
  LayerId forged{1, 2};
  j = sidecar(p);
  j["hashed_at_ns"] = j["ctime_ns"].get<int64_t>() + 10 * kRacyMarginNs;
  j["id"] = forged.hex();
  put_sidecar(p, j);
  auto trusted = layer_content_id(p, false);
  EXPECT_TRUE(trusted->from_cache);
  EXPECT_EQ(trusted->id, forged);
  EXPECT_FALSE(layer_content_id(p, true)->from_cache);  // asked with allocation: another key

  // Any write moves ctime (even when mtime is put back): the stale entry is ignored.
  struct stat st {};
  ASSERT_EQ(::stat(p.c_str(), &st), 0);
  put_sidecar(p, j);
  write_at(p, 0, std::vector<char>(1, 'b'));
  timespec times[2] = {st.st_atim, st.st_mtim};
  ASSERT_EQ(::utimensat(AT_FDCWD, p.c_str(), times, 0), 0);
  auto fresh = layer_content_id(p, false);
  ASSERT_TRUE(fresh.ok());
  EXPECT_FALSE(fresh->from_cache);
  EXPECT_NE(fresh->id, forged);
  EXPECT_NE(fresh->id, first->id);
}

TEST_F(LayerIdTest, OriginIsKeptOnlyWhileTheFileKeepsItsId) {
  std::string p = make("relinked", 1 << 20);
  write_at(p, 0, std::vector<char>(4096, 'q'));
  auto own = layer_content_id(p, false);
  ASSERT_TRUE(own.ok());
  Fd fd(::open(p.c_str(), O_RDONLY)), dir(::open(dir_.c_str(), O_RDONLY | O_DIRECTORY));
  LayerId origin{7, 8};
  ASSERT_TRUE(record_layer_origin(fd.get(), dir.get(), "relinked", false, own->id, origin).ok());
  auto again = layer_content_id(p, false);  // racy: re-hashed, same bytes, origin kept
  ASSERT_TRUE(again.ok());
  ASSERT_TRUE(again->origin.has_value());
  EXPECT_EQ(*again->origin, origin);
  write_at(p, 0, std::vector<char>(1, 'z'));
  auto changed = layer_content_id(p, false);
  EXPECT_FALSE(changed->origin.has_value());
  EXPECT_FALSE(record_layer_origin(fd.get(), dir.get(), "relinked", false, own->id, origin).ok());
}

}  // namespace
}  // namespace kvmig::helper
