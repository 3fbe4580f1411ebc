// The paravirtual block device (kvm/block_device.h) on real KVM, driven by the test guest's
// disk workload (tests/guests/disk.c): the guest's writes reach the image and verify; a
// block changed behind the guest's back is caught; save/restore with a disk goes on
// verifying; invalid guest requests are refused; bad --disk input is one line and exit 125.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <mutex>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "guests/guest_report.h"
#include "kvm/block_device.h"
#include "kvm/block_write_log.h"
#include "kvm/device_dirty.h"
#include "kvm/machine.h"
#include "test_util.h"

namespace kvmig::kvm {
namespace {

constexpr uint64_t kDiskTagBase = 0x6b64000000000000ull;  // tests/guests/disk.c DTAG
constexpr uint64_t kBlock = 64 * 1024;

struct Console {
  std::mutex mu;
  guest::Report report;
  std::string text;
  void attach(Machine& vm) {
    vm.set_console_listener([this](std::string_view line) {
      std::lock_guard lock(mu);
      report.add_line(line);
      text.append(line).append("\n");
    });
  }
  template <class F>
  bool wait_for(F pred, int seconds) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
    while (std::chrono::steady_clock::now() < deadline) {
      {
        std::lock_guard lock(mu);
        if (pred(report)) return true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return false;
  }
  std::string get() {
    std::lock_guard lock(mu);
    return text;
  }
};

class BlockDeviceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (access("/dev/kvm", R_OK | W_OK) != 0) GTEST_SKIP() << "/dev/kvm not available: the device runs a real guest";
    dir_ = test::make_temp_dir("kvmig-blockdev");
    ASSERT_FALSE(dir_.empty());
  }
  void TearDown() override {
    if (!dir_.empty()) std::system(("rm -rf " + dir_).c_str());
  }

  std::string make_image(const std::string& name, uint64_t bytes) {
    std::string path = dir_ + "/" + name;
    int fd = ::open(path.c_str(), O_CREAT | O_RDWR | O_TRUNC, 0644);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(::ftruncate(fd, static_cast<off_t>(bytes)), 0);
    ::close(fd);
    return path;
  }

  // Word 0 of every block of the image: the guest's tag where it wrote the block.
  std::vector<uint64_t> block_tags(const std::string& path) {
    std::string data = test::read_file(path);
    std::vector<uint64_t> tags;
    for (size_t off = 0; off + kBlock <= data.size(); off += kBlock) {
      uint64_t w = 0;
      std::memcpy(&w, data.data() + off, 8);
      tags.push_back(w);
    }
    return tags;
  }

  std::string dir_;
};

// Each pattern writes through the ring, reads back and verifies with no error; the blocks
// it reports written are in the image file with the guest's stamp.
TEST_F(BlockDeviceTest, GuestWorkloadVerifiesEveryPattern) {
  for (const char* pattern : {"seq", "random", "hotcold"}) {
    SCOPED_TRACE(pattern);
    std::string img = make_image(std::string("disk-") + pattern + ".raw", 4 << 20);  // 64 blocks
    std::string console = dir_ + "/console-" + pattern;
    auto r = test::run_kvmig("vm run --no-control -v --kernel " KVMIG_GUEST " --memory 128M --console " + console +
                             " --disk " + img + " --cmdline 'ws=4M passes=12 disk=1 dpattern=" + pattern +
                             " dhot=25 dpass=48 dverify=32'");
    guest::Report rep;
    rep.feed(test::read_file(console));
    EXPECT_EQ(r.status, 0) << r.err << test::read_file(console);
    ASSERT_TRUE(rep.disk_start.has_value()) << test::read_file(console);
    EXPECT_EQ(rep.disk_start->blocks, 64u);
    EXPECT_EQ(rep.disk_start->pattern, pattern);
    ASSERT_FALSE(rep.disk_passes.empty());
    const guest::DiskPassLine& last = rep.disk_passes.back();
    EXPECT_EQ(last.errors, 0u);
    // A block picked twice for one batch is skipped, not retried: seq never repeats within
    // a batch; random rarely does; hotcold (90% of writes on 16 blocks) often does.
    std::string p = pattern;
    EXPECT_GE(last.writes, p == "seq" ? 12u * 48 : p == "random" ? 12u * 40 : 12u * 20);
    EXPECT_LE(last.writes, 12u * 48);
    EXPECT_GT(last.reads, 12u * 16);
    EXPECT_TRUE(rep.disk_corrupt.empty()) << test::read_file(console);
    ASSERT_TRUE(rep.done.has_value());
    EXPECT_TRUE(rep.done->pass);
    // The device's counters (vm run -v) agree that the I/O went to the host.
    EXPECT_NE(r.err.find("kvmig: disk 0 ("), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("bad_requests=0 io_errors=0 ring_errors=0"), std::string::npos) << r.err;
    // Written blocks carry the guest's tag at their start, in the file itself.
    auto tags = block_tags(img);
    size_t stamped = 0;
    for (size_t b = 0; b < tags.size(); ++b) {
      if (tags[b] == 0) continue;
      EXPECT_EQ(tags[b], kDiskTagBase | b) << "block " << b;
      ++stamped;
    }
    EXPECT_GT(stamped, std::string(pattern) == "hotcold" ? 8u : 32u);
  }
}

// dqd=32: 32 requests in flight per doorbell (a 32-entry ring), each completed in any order,
// all verified; a queue depth the guest cannot honour is a boot error, not a smaller queue.
TEST_F(BlockDeviceTest, DeeperGuestQueueVerifiesAndBadQueueDepthIsABootError) {
  std::string img = make_image("disk-qd.raw", 4 << 20);  // 64 blocks
  std::string console = dir_ + "/console-qd";
  auto r = test::run_kvmig("vm run --no-control -v --kernel " KVMIG_GUEST " --memory 128M --console " + console +
                           " --disk " + img + " --cmdline 'ws=4M passes=8 disk=1 dpattern=seq dqd=32 dpass=96 dverify=64'");
  guest::Report rep;
  rep.feed(test::read_file(console));
  EXPECT_EQ(r.status, 0) << r.err << test::read_file(console);
  ASSERT_FALSE(rep.disk_passes.empty()) << test::read_file(console);
  EXPECT_EQ(rep.disk_passes.back().writes, 8u * 96) << "seq never repeats a block within a batch of 32";
  EXPECT_EQ(rep.disk_passes.back().errors, 0u);
  EXPECT_TRUE(rep.disk_corrupt.empty()) << test::read_file(console);
  ASSERT_TRUE(rep.done.has_value());
  EXPECT_TRUE(rep.done->pass);
  for (const char* bad : {"dqd=12", "dqd=128", "dqd=64 dblock=256K"}) {
    SCOPED_TRACE(bad);
    std::string c = dir_ + "/console-badqd";
    auto b = test::run_kvmig("vm run --no-control --kernel " KVMIG_GUEST " --memory 128M --console " + c + " --disk " +
                             img + " --cmdline 'ws=1M passes=1 disk=1 " + bad + "'");
    EXPECT_NE(b.status, 0);
    std::string text = test::read_file(c);
    EXPECT_NE(text.find("kvmig-guest: error"), std::string::npos) << text;
    EXPECT_NE(text.find("dqd="), std::string::npos) << text;
  }
}

// The test flips bytes in the middle of a block the guest has written, while the VM is
// paused: the guest's next read-back must report exactly that block. Also checks that the
// device logged the guest's writes per block (BlockWriteLog) and that pause drained it.
TEST_F(BlockDeviceTest, BlockChangedBehindTheGuestIsDetected) {
  std::string img = make_image("disk.raw", 1 << 20);  // 16 blocks of 64 KiB
  MachineConfig config;
  config.memory = 128ull << 20;
  config.console_path = "/dev/null";
  auto m = Machine::create(config);
  ASSERT_TRUE(m.ok()) << m.error().message;
  Machine& vm = **m;
  auto index = vm.attach_disk(img);
  ASSERT_TRUE(index.ok()) << index.error().message;
  ASSERT_EQ(vm.disks().size(), 1u);
  EXPECT_EQ(vm.disks()[0].size, 1u << 20);
  EXPECT_EQ(vm.disks()[0].path, img);
  EXPECT_GE(vm.disks()[0].fd, 0);
  BlockWriteLog& log = vm.disk_write_log(0);
  EXPECT_EQ(log.blocks(), 16u);
  log.start();
  Console console;
  console.attach(vm);
  // idle=1: pass 1 writes all 16 blocks (seq), later passes only read back and verify, so
  // nothing the guest writes can cover the test's change before a read-back sees it.
  ASSERT_TRUE(vm.load_kernel(KVMIG_GUEST, "ws=2M disk=1 idle=1 dpattern=seq dpass=16 dverify=16 report_ms=1").ok());
  // Nothing of guest RAM is device-dirty before the guest runs.
  EXPECT_FALSE(vm.device_dirty().test(0, config.memory));
  ASSERT_TRUE(vm.start().ok());
  // Every block written once and verified since.
  ASSERT_TRUE(console.wait_for([](const guest::Report& r) { return !r.disk_passes.empty() && r.disk_passes.back().reads >= 32; }, 30))
      << console.get();
  ASSERT_TRUE(vm.pause().ok());
  EXPECT_EQ(vm.disk(0).in_flight(), 0u) << "pause must drain the disk";
  // Read completions and ring statuses were marked where the device wrote them: in the
  // guest image's bss (below 32 MiB), never in the working set above it.
  EXPECT_TRUE(vm.device_dirty().test(1 << 20, 31 << 20));
  EXPECT_FALSE(vm.device_dirty().test(32 << 20, config.memory - (32 << 20)));
  auto dirty = log.harvest();
  ASSERT_EQ(dirty.size(), 16u);
  for (const auto& b : dirty) EXPECT_EQ(b.writes, 1u) << "block " << b.index;
  EXPECT_EQ(console.get().find("disk corrupt"), std::string::npos) << console.get();

  constexpr uint64_t kVictim = 5;
  int fd = ::open(img.c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  char junk[16];
  std::memset(junk, 0xa5, sizeof junk);
  ASSERT_EQ(::pwrite(fd, junk, sizeof junk, kVictim * kBlock + 20000), static_cast<ssize_t>(sizeof junk));
  ::close(fd);

  ASSERT_TRUE(vm.resume().ok());
  bool seen = console.wait_for(
      [](const guest::Report& r) {
        for (const auto& c : r.disk_corrupt)
          if (c.block == kVictim && c.why == "checksum") return true;
        return false;
      },
      20);
  vm.stop(0);
  (void)vm.wait();
  EXPECT_TRUE(seen) << console.get();
}

// vm save with a disk attached, then vm restore --disk: the guest goes on from where it was
// (no reboot), its ring position restored, and verifies every block to the end.
TEST_F(BlockDeviceTest, SaveRestoreWithDiskGoesOnVerifying) {
  std::string img = make_image("disk.raw", 2 << 20);
  std::string sock = dir_ + "/vm.sock", c1 = dir_ + "/c1", c2 = dir_ + "/c2", state = dir_ + "/state";
  test::CliRun first;
  std::thread runner([&] {
    first = test::run_kvmig("vm run --kernel " KVMIG_GUEST " --memory 128M --control " + sock + " --console " + c1 +
                            " --disk " + img +
                            ",block=4K --cmdline 'ws=4M disk=1 dpattern=random drate=8 dpass=16 dverify=32 passes=40 "
                            "report_ms=20'");
  });
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  uint64_t before = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    guest::Report rep;
    rep.feed(test::read_file(c1));
    if (!rep.disk_passes.empty() && rep.disk_passes.back().n >= 4) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  auto saved = test::run_kvmig("vm save --control " + sock + " --output " + state);
  runner.join();
  EXPECT_EQ(saved.status, 0) << saved.err;
  EXPECT_EQ(first.status, 0) << first.err;
  guest::Report rep1;
  rep1.feed(test::read_file(c1));
  ASSERT_FALSE(rep1.disk_passes.empty()) << test::read_file(c1);
  before = rep1.disk_passes.back().n;
  ASSERT_FALSE(rep1.done.has_value()) << "finished before the save";

  // Without its disk the state cannot be restored: one clear line.
  auto no_disk = test::run_kvmig("vm restore " + state + " --no-control --console /dev/null");
  EXPECT_EQ(no_disk.status, 125);
  EXPECT_NE(no_disk.err.find("not attached"), std::string::npos) << no_disk.err;

  auto second = test::run_kvmig("vm restore " + state + " --no-control -v --console " + c2 + " --disk " + img + ",block=4K");
  guest::Report rep2;
  rep2.feed(test::read_file(c2));
  EXPECT_EQ(second.status, 0) << second.err << test::read_file(c2);
  EXPECT_FALSE(rep2.start.has_value()) << "rebooted";
  EXPECT_FALSE(rep2.disk_start.has_value()) << "rebooted";
  ASSERT_FALSE(rep2.disk_passes.empty()) << test::read_file(c2);
  EXPECT_GT(rep2.disk_passes.front().n, before);
  EXPECT_EQ(rep2.disk_passes.back().n, 40u);
  EXPECT_GT(rep2.disk_passes.back().reads, rep1.disk_passes.back().reads);
  EXPECT_EQ(rep2.disk_passes.back().errors, 0u);
  EXPECT_TRUE(rep2.disk_corrupt.empty()) << test::read_file(c2);
  ASSERT_TRUE(rep2.done.has_value());
  EXPECT_TRUE(rep2.done->pass);
  EXPECT_NE(second.err.find("ring_errors=0"), std::string::npos) << second.err;
}

// dbad=1: the guest sends requests with a buffer outside RAM, sectors past the end, a
// misaligned buffer, a length that is not whole sectors and an unknown op; each must come
// back refused, with the guest's buffer untouched (the guest checks a canary), and the
// image must not have grown.
TEST_F(BlockDeviceTest, BadGuestRequestsAreRefused) {
  std::string img = make_image("disk.raw", 1 << 20);
  std::string console = dir_ + "/console";
  auto r = test::run_kvmig("vm run --no-control -v --kernel " KVMIG_GUEST " --memory 64M --console " + console +
                           " --disk " + img + " --cmdline 'ws=1M passes=2 disk=1 dbad=1 dpass=4 dverify=4'");
  guest::Report rep;
  rep.feed(test::read_file(console));
  EXPECT_EQ(r.status, 0) << r.err << test::read_file(console);
  ASSERT_TRUE(rep.disk_bad_requests.has_value()) << test::read_file(console);
  EXPECT_EQ(rep.disk_bad_requests->of, 7u);
  EXPECT_EQ(rep.disk_bad_requests->rejected, 7u);
  EXPECT_NE(r.err.find("guest request rejected (buffer outside guest RAM"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("sectors beyond the end of the disk"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("bad_requests=7 "), std::string::npos) << r.err;
  struct stat st {};
  ASSERT_EQ(::stat(img.c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 1 << 20);
  ASSERT_TRUE(rep.done.has_value());
  EXPECT_TRUE(rep.done->pass);  // and the valid requests after them still work
}

// Bad --disk input: one line on stderr, exit 125, nothing run.
TEST_F(BlockDeviceTest, BadDiskInputIsOneLineAndExit125) {
  std::string odd = dir_ + "/odd.raw";
  {
    int fd = ::open(odd.c_str(), O_CREAT | O_RDWR, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::ftruncate(fd, 1000), 0);
    ::close(fd);
  }
  std::string good = make_image("good.raw", 1 << 20);
  struct Case {
    std::string disk, expect;
  } cases[] = {
      {dir_ + "/missing.raw", "No such file"},
      {odd, "not a non-zero multiple of 512"},
      {good + ",block=3K", "power of two"},
      {good + ",block=4M", "power of two"},
      {good + ",speed=1", "unknown option"},
      {dir_, "Is a directory"},
      {"/dev/null", "not a regular file or block device"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.disk);
    auto r = test::run_kvmig("vm run --no-control --kernel " KVMIG_GUEST " --memory 64M --console /dev/null --disk " +
                             c.disk + " --cmdline 'ws=1M passes=1 disk=1'");
    EXPECT_EQ(r.status, 125);
    EXPECT_NE(r.err.find(c.expect), std::string::npos) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  // The guest asked for a disk that is not there: its own boot error, not a hang.
  std::string console = dir_ + "/console";
  auto r = test::run_kvmig("vm run --no-control --kernel " KVMIG_GUEST " --memory 64M --console " + console +
                           " --cmdline 'ws=1M passes=1 disk=1'");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(test::read_file(console).find("no kvmig block device"), std::string::npos) << test::read_file(console);
}

}  // namespace
}  // namespace kvmig::kvm
