// The destination's half of a chained disk's live migration (helper/disk_precopy_receiver.h,
// docs/disk-migration.md "Chained disks") on real files and io_uring, without a VM: what it
// creates is removed again whatever step fails, blocks for a layer whose copy is complete are
// refused, the room check counts every layer it will copy, a layer two disks share is copied
// once, and a copied layer's re-hashing happens off the control thread yet before finish().
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <random>
#include <set>
#include <thread>

#include "base/fd.h"
#include "helper/disk_chain_migration.h"
#include "helper/disk_layer_id.h"
#include "helper/disk_precopy_receiver.h"
#include "helper/messages.h"
#include "test_util.h"

namespace kvmig::helper {
namespace {

namespace fs = std::filesystem;
constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kSize = 1 * kMiB;
constexpr uint32_t kTopBlock = 64 << 10;

std::string random_bytes(uint64_t n, uint32_t seed) {
  std::string s(n, '\0');
  std::mt19937 rng(seed);
  for (auto& c : s) c = static_cast<char>(rng());
  return s;
}

void write_file(const fs::path& p, const std::string& bytes) {
  Fd fd(::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644));
  ASSERT_TRUE(fd.valid()) << p;
  ASSERT_EQ(::pwrite(fd.get(), bytes.data(), bytes.size(), 0), static_cast<ssize_t>(bytes.size()));
}

std::set<std::string> listing(const fs::path& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

// One DISK_BLOCKS payload: a single data run of `bytes` at `offset`.
std::vector<uint8_t> blocks(uint32_t target, uint64_t offset, const std::string& bytes) {
  std::vector<DiskRun> runs{{offset, static_cast<uint32_t>(bytes.size()), DiskRunKind::data}};
  std::vector<uint8_t> p = encode_disk_blocks_head(target, 1, runs);
  p.insert(p.end(), bytes.begin(), bytes.end());
  return p;
}

class DiskChainReceiver : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test::make_temp_dir("kvmig-chainrx");
    ASSERT_FALSE(dir_.empty());
    fs::create_directories(src());
    fs::create_directories(dst());
    base_ = random_bytes(kSize, 11);
    write_file(src() / "base.raw", base_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path src() const { return fs::path(dir_) / "src"; }
  fs::path dst() const { return fs::path(dir_) / "dst"; }
  MigrationLayer base_layer() const {
    auto id = layer_content_id((src() / "base.raw").string(), false);
    EXPECT_TRUE(id.ok()) << id.error().message;
    return {kSize, kSize, id.ok() ? id->id : LayerId{1, 1}, "base.raw"};
  }
  MigrationDisk disk(std::vector<MigrationLayer> lower) const { return {kSize, kTopBlock, kTopBlock, std::move(lower)}; }
  static DiskReceiverOptions buffered() {
    DiskReceiverOptions o;
    o.direct = false;
    return o;
  }
  std::string dir_, base_;
};

TEST_F(DiskChainReceiver, ALayerThatCannotBeOpenedLeavesNothingItCreatedBehind) {
  // Three layers to copy, none at the destination; a file of someone else's next to them.
  MigrationLayer mid = base_layer(), low = base_layer();
  mid.name = "mid.raw";
  mid.id = {2, 2};
  low.name = "low.raw";
  low.id = {3, 3};
  DisksMsg declared;
  declared.disks.push_back(disk({base_layer(), mid, low}));
  write_file(dst() / "keep.raw", "not kvmig's");
  std::vector<std::string> paths{(dst() / "top.raw").string()};

  // Room for exactly two more descriptors: the top's and the base's. Opening the second layer
  // then fails with EMFILE, after the first was created (and, before the fix, the third too).
  struct rlimit old {};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &old), 0);
  rlim_t limit = 0;
  for (int free_slots = 0; free_slots < 2; ++limit)
    if (::fcntl(static_cast<int>(limit), F_GETFD) < 0) ++free_slots;
  struct rlimit tight = old;
  tight.rlim_cur = limit;
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &tight), 0);
  auto rx = DiskPrecopyReceiver::open(declared, paths, buffered());
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &old), 0);

  ASSERT_FALSE(rx.ok());
  EXPECT_NE(rx.error().message.find("Too many open files"), std::string::npos) << rx.error().message;
  EXPECT_EQ(rx.error().message.find('\n'), std::string::npos);
  EXPECT_EQ(listing(dst()), std::set<std::string>{"keep.raw"}) << "a file the failed receive created is left";
  EXPECT_EQ(test::read_file((dst() / "keep.raw").string()), "not kvmig's");
}

TEST_F(DiskChainReceiver, BlocksForACopiedLayerAfterTheTopBeganAreRefused) {
  DisksMsg declared;
  declared.disks.push_back(disk({base_layer()}));
  std::vector<std::string> paths{(dst() / "top.raw").string()};
  auto rx = DiskPrecopyReceiver::open(declared, paths, buffered());
  ASSERT_TRUE(rx.ok()) << rx.error().message;
  ASSERT_EQ((*rx)->ready().layers, std::vector<LayerAnswer>{LayerAnswer::copy});
  ASSERT_TRUE((*rx)->on_blocks(blocks(1, 0, base_)).ok());            // the base, whole
  ASSERT_TRUE((*rx)->on_blocks(blocks(0, 0, random_bytes(kTopBlock, 5))).ok());  // the top begins
  // The base again, changed: its copy is complete (and being verified) by now.
  std::string changed = base_.substr(0, 4096);
  changed[0] ^= 1;
  auto again = (*rx)->on_blocks(blocks(1, 0, changed));
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(wire_code_of(again.error()), WireCode::unexpected) << again.error().message;
  EXPECT_NE(again.error().message.find("copied layer"), std::string::npos) << again.error().message;
  EXPECT_EQ(test::read_file((dst() / "base.raw").string()), base_) << "nothing of the refused block landed";
  (*rx)->discard();
  EXPECT_TRUE(listing(dst()).empty()) << "the discarded receive left files";
}

TEST_F(DiskChainReceiver, AWrongCopyDoesNotHoldUpTheRoundAndFailsFinish) {
  DisksMsg declared;
  declared.disks.push_back(disk({base_layer()}));
  std::vector<std::string> paths{(dst() / "top.raw").string()};
  auto rx = DiskPrecopyReceiver::open(declared, paths, buffered());
  ASSERT_TRUE(rx.ok()) << rx.error().message;
  std::string wrong = base_;
  wrong[kSize / 2] ^= 0x40;
  ASSERT_TRUE((*rx)->on_blocks(blocks(1, 0, wrong)).ok());
  // The re-hash runs on its own thread: the top's first block is taken at once, not failed.
  ASSERT_TRUE((*rx)->on_blocks(blocks(0, 0, random_bytes(kTopBlock, 6))).ok());
  auto fin = (*rx)->finish();
  ASSERT_FALSE(fin.ok()) << "a copy whose content ID differs was used";
  EXPECT_NE(fin.error().message.find("copied, but its content ID is"), std::string::npos) << fin.error().message;
  (*rx)->discard();
  EXPECT_TRUE(listing(dst()).empty());
}

TEST_F(DiskChainReceiver, RoomIsCheckedForEveryLayerToCopyBeforeOneIsCreated) {
  struct statvfs vfs {};
  ASSERT_EQ(::statvfs(dst().c_str(), &vfs), 0);
  uint64_t free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
  uint64_t size = (free_bytes / 512 + 1) * 512;  // sparse: a file this big takes no room
  // The top's data fits alone (the check before the fix), with its base it does not.
  MigrationDisk d{size, free_bytes / 4, kTopBlock, {{size, free_bytes, LayerId{7, 7}, "base.raw"}}};
  DisksMsg declared;
  declared.disks.push_back(d);
  std::vector<std::string> paths{(dst() / "top.raw").string()};
  auto rx = DiskPrecopyReceiver::open(declared, paths, buffered());
  ASSERT_FALSE(rx.ok()) << "a base bigger than the free space was accepted";
  EXPECT_EQ(wire_code_of(rx.error()), WireCode::config_mismatch);
  EXPECT_NE(rx.error().message.find("destination disk full"), std::string::npos) << rx.error().message;
  EXPECT_NE(rx.error().message.find("1 lower layer"), std::string::npos) << rx.error().message;
  EXPECT_TRUE(listing(dst()).empty()) << "nothing may be created on refusal";
}

TEST_F(DiskChainReceiver, TwoDisksSharingABaseGetOneCopyOfIt) {
  DisksMsg declared;
  declared.disks.push_back(disk({base_layer()}));
  declared.disks.push_back(disk({base_layer()}));
  std::vector<std::string> paths{(dst() / "a.raw").string(), (dst() / "b.raw").string()};
  auto opened = DiskPrecopyReceiver::open(declared, paths, buffered());
  ASSERT_TRUE(opened.ok()) << opened.error().message;
  std::unique_ptr<DiskPrecopyReceiver> rx = std::move(*opened);
  EXPECT_EQ(rx->ready().layers, (std::vector<LayerAnswer>{LayerAnswer::copy, LayerAnswer::held}))
      << "the second disk's base is the first's: not sent again";
  // Only one layer target exists (index 2); index 3 would be a second copy.
  auto second = rx->on_blocks(blocks(3, 0, base_.substr(0, 4096)));
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(wire_code_of(second.error()), WireCode::malformed);

  // The source's half over a socketpair: send_missing_layers follows the answers.
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  FdStream source(Fd(sv[0]), "source"), dest(Fd(sv[1]), "dest");
  std::string dest_error;
  std::thread receiver([&] {
    for (;;) {
      auto m = read_message(dest, kWireVersion, WireLimits{});
      if (!m.ok()) return void(dest_error = m.error().message);
      if (m->type() == MsgType::commit) {
        if (auto r = rx->finish(); !r.ok()) dest_error = r.error().message;
        return;
      }
      if (auto r = rx->on_blocks(m->payload); !r.ok()) return void(dest_error = r.error().message);
    }
  });
  SourceChain chain{{(src() / "base.raw").string()}, {base_layer()}};
  auto sent = send_missing_layers(source, kWireVersion, {chain, chain}, rx->ready());
  ASSERT_TRUE(sent.ok()) << sent.error().message;
  EXPECT_EQ(sent->copied, 1u);
  EXPECT_EQ(sent->held, 1u);
  for (uint32_t disk = 0; disk < 2; ++disk) {
    std::vector<uint8_t> top = blocks(disk, 0, random_bytes(kTopBlock, disk));
    ASSERT_TRUE(send_message(source, kWireVersion, MsgType::disk_blocks, top).ok());
  }
  ASSERT_TRUE(send_message(source, kWireVersion, MsgType::commit).ok());
  receiver.join();
  EXPECT_EQ(dest_error, "");
  EXPECT_EQ(test::read_file((dst() / "base.raw").string()), base_);
  std::set<std::string> names = listing(dst());
  EXPECT_EQ(std::count_if(names.begin(), names.end(), [](const std::string& n) { return n.rfind("base.raw.", 0) == 0 && n != "base.raw.kvmig-id"; }), 0)
      << "a second copy of the base was made";
  for (const char* top : {"a.raw", "b.raw"})
    EXPECT_NE(test::read_file((dst() / (std::string(top) + ".kvmig-delta")).string()).find("\"base.raw\""),
              std::string::npos)
        << top << " is not linked onto the one base";
}

}  // namespace
}  // namespace kvmig::helper
