// Live disk migration end to end on real KVM over loopback (docs/disk-migration.md): a
// `kvmig vm run --disk` guest writing and verifying its disk (each pattern), `kvmig receive
// --disk`, `kvmig migrate`. After the move the guest must go on verifying memory and disk at
// the destination and end with no error (its last act reads back every block it ever wrote,
// against the versions in its shadow table: a block lost or stale in the move is caught).
// And the destination killed mid disk pre-copy must leave the source running, its disk
// untouched by kvmig.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "helper/disk_extents.h"
#include "helper/disk_precopy_messages.h"
#include "helper/messages.h"
#include "tests/integration/migration_harness.h"

namespace kvmig::testing {
namespace {

using namespace std::chrono_literals;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kDisk = 256 * kMiB;

#define REQUIRE_GUEST()                                                                     \
  if (!have_kvm()) GTEST_SKIP() << "/dev/kvm is not available";                             \
  if (::access(guest64_path().c_str(), R_OK) != 0) GTEST_SKIP() << "test guest not built"

class DiskMigration : public ::testing::TestWithParam<std::string> {
 protected:
  std::string path(const std::string& name) const { return scratch_.path(name); }

  // A sparse image with 32 MiB of data at its start: a bulk copy, holes, and room to write.
  void make_image() {
    int fd = ::open(path("src.raw").c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::ftruncate(fd, kDisk), 0);
    std::vector<uint8_t> buf(kMiB);
    std::mt19937 rng(11);
    for (uint64_t off = 0; off < 32 * kMiB; off += kMiB) {
      for (auto& b : buf) b = static_cast<uint8_t>(rng());
      ASSERT_EQ(::pwrite(fd, buf.data(), buf.size(), off), static_cast<ssize_t>(buf.size()));
    }
    ::close(fd);
  }
  Child source(const std::string& cmdline, const std::vector<std::string>& env = {}) {
    Child c = spawn({KVMIG_BINARY, "vm", "run", "--kernel", guest64_path(), "--memory", "256M", "--disk",
                     path("src.raw"), "--cmdline", cmdline, "--console", path("src.console"), "--control",
                     path("src.ctl")},
                    path("src.out"), path("src.err"), env);
    EXPECT_TRUE(wait_until([&] { return guest_report(path("src.console")).disk_passes.size() >= 2 || c.poll(); },
                           60s))
        << read_text(path("src.err"));
    return c;
  }
  Child receiver() {
    Child c = spawn({KVMIG_BINARY, "receive", "--listen", "unix:" + path("mig.sock"), "--disk", path("dst.raw"),
                     "--console", path("dst.console"), "--no-control"},
                    path("recv.out"), path("recv.err"));
    EXPECT_TRUE(wait_until([&] { return read_text(path("recv.err")).find("listening on") != std::string::npos; }, 10s));
    return c;
  }
  Child migrate(std::vector<std::string> extra = {}) {
    std::vector<std::string> args{KVMIG_BINARY, "migrate", path("src.ctl"), "--to", "unix:" + path("mig.sock"),
                                  "--json", "--no-progress"};
    args.insert(args.end(), extra.begin(), extra.end());
    return spawn(args, path("mig.out"), path("mig.err"));
  }
  nlohmann::json report() { return nlohmann::json::parse(read_text(path("mig.out")), nullptr, false); }

  ScratchDir scratch_{"/var/tmp/kvmig-diskmig"};  // not tmpfs: O_DIRECT, holes
};

TEST_P(DiskMigration, GuestKeepsVerifyingMemoryAndDiskAtTheDestination) {
  REQUIRE_GUEST();
  make_image();
  // ~40 MiB/s of 64 KiB block writes; the guest ends by itself after 120 passes with a
  // read-back of every block it wrote.
  const std::string cmdline = "ws=16M pattern=seq passes=120 report_ms=50 disk=1 drate=40 dpattern=" + GetParam();
  Child src = source(cmdline);
  Child dst = receiver();
  Child mig = migrate();
  ASSERT_EQ(mig.wait(120s), 0) << read_text(path("mig.err")) << read_text(path("recv.err"));
  nlohmann::json r = report();
  ASSERT_FALSE(r.is_discarded());
  EXPECT_EQ(r["result"], "completed");
  ASSERT_TRUE(r.contains("disk")) << r.dump();
  const auto& d = r["disk"];
  EXPECT_EQ(d["disks"], 1);
  EXPECT_GE(d["bytes"].get<uint64_t>(), 32 * kMiB) << "the bulk copy moved the data extents";
  EXPECT_LT(d["bytes"].get<uint64_t>(), kDisk) << "holes are not sent";
  EXPECT_GE(d["rounds"].get<int>(), 2);
  EXPECT_LE(d["pause_ms"].get<double>(), 20.0 * 3) << "disk pause far over its budget: " << d.dump();
  EXPECT_EQ(src.wait(10s), 0) << "the source VM ends once the destination runs it";
  EXPECT_EQ(dst.wait(120s), 0) << read_text(path("recv.err")) << read_text(path("dst.console")).substr(0, 2000);
  guest::Report g = guest_report(path("dst.console"));
  EXPECT_TRUE(g.disk_corrupt.empty()) << read_text(path("dst.console")).substr(0, 2000);
  EXPECT_TRUE(g.corrupt.empty());
  EXPECT_TRUE(g.errors.empty());
  ASSERT_FALSE(g.disk_passes.empty()) << "the destination guest did disk passes";
  EXPECT_EQ(g.disk_passes.back().errors, 0u);
  ASSERT_TRUE(g.done.has_value()) << "the guest ran to its end at the destination";
  EXPECT_TRUE(g.done->pass) << "its final read-back of every block it wrote found an error";
  std::fprintf(stderr, "%s: %s\n", GetParam().c_str(), r.dump().substr(0, 600).c_str());
}

INSTANTIATE_TEST_SUITE_P(Patterns, DiskMigration, ::testing::Values("seq", "random", "hotcold"),
                         [](const auto& info) { return info.param; });

class DiskMigrationFault : public DiskMigration {};

TEST_F(DiskMigrationFault, DestinationKilledMidDiskPrecopySourceRunsOnWithItsDisk) {
  REQUIRE_GUEST();
  make_image();
  Child src = source("ws=16M pattern=seq passes=0 report_ms=50 disk=1 drate=40");
  Child dst = receiver();
  Child mig = migrate();
  // The destination's copy appears when DISKS arrives: pre-copy of the disk has begun.
  ASSERT_TRUE(wait_until([&] { return ::access(path("dst.raw").c_str(), F_OK) == 0; }, 30s));
  dst.kill9();
  EXPECT_EQ(mig.wait(60s), 1) << read_text(path("mig.err"));
  EXPECT_EQ(report().value("result", ""), "failed");
  auto stats = host::control_request(path("src.ctl"), {{"cmd", "stats"}});
  ASSERT_TRUE(stats.ok()) << stats.error().message;
  EXPECT_FALSE(stats->value("paused", true));
  size_t n = guest_report(path("src.console")).disk_passes.size();
  EXPECT_TRUE(wait_until([&] { return guest_report(path("src.console")).disk_passes.size() > n + 2; }, 20s))
      << "the source guest stopped doing disk passes";
  guest::Report g = guest_report(path("src.console"));
  EXPECT_TRUE(g.disk_corrupt.empty());
  EXPECT_TRUE(g.corrupt.empty());
}

// A host I/O that hangs (KVMIG_DISK_HOLD, kvm/block_device.h: the completions of the guest's
// requests are held while a file exists, as a dead NFS server or a failing disk would) must
// not freeze the VM through the migration's pause: the pause gives up after the drain limit
// (5 s), the migration fails with one line naming the disk, the source runs on, and once the
// I/O completes the guest finds every block as it wrote it.
TEST_F(DiskMigrationFault, HungHostIoFailsThePauseAndTheSourceRunsOn) {
  REQUIRE_GUEST();
  make_image();
  const std::string hold = path("hold");
  Child src = source("ws=16M pattern=seq passes=0 report_ms=50 disk=1 drate=40", {"KVMIG_DISK_HOLD=" + hold});
  Child dst = receiver();
  { std::ofstream(hold.c_str()) << "held\n"; }
  ASSERT_TRUE(wait_until([&] { return read_text(path("src.err")).find("holding completions") != std::string::npos; },
                         10s))
      << read_text(path("src.err"));
  auto begin = std::chrono::steady_clock::now();
  Child mig = migrate();
  EXPECT_EQ(mig.wait(60s), 1) << read_text(path("mig.err"));
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  std::string err = read_text(path("mig.err"));
  EXPECT_NE(err.find("still in flight on the host after 5000 ms"), std::string::npos) << err;
  EXPECT_GE(secs, 5.0) << "the pause waited its limit for the I/O";
  EXPECT_LT(secs, 30.0) << "but not much more";
  EXPECT_EQ(report().value("result", ""), "failed");
  auto stats = host::control_request(path("src.ctl"), {{"cmd", "stats"}});
  ASSERT_TRUE(stats.ok()) << stats.error().message;
  EXPECT_FALSE(stats->value("paused", true)) << "the source VM is left running";
  EXPECT_FALSE(src.poll()) << read_text(path("src.err"));
  EXPECT_EQ(dst.wait(20s), 1) << "the destination discards";
  EXPECT_NE(::access(path("dst.raw").c_str(), F_OK), 0) << "and removes its copy";
  // The I/O comes back: the guest's held batch completes and it goes on writing and verifying.
  size_t n = guest_report(path("src.console")).disk_passes.size();
  ASSERT_EQ(::unlink(hold.c_str()), 0);
  EXPECT_TRUE(wait_until([&] { return guest_report(path("src.console")).disk_passes.size() > n + 2; }, 30s))
      << "the source guest stopped doing disk passes: " << read_text(path("src.err"));
  guest::Report g = guest_report(path("src.console"));
  EXPECT_TRUE(g.disk_corrupt.empty()) << read_text(path("src.console")).substr(0, 2000);
  EXPECT_TRUE(g.corrupt.empty());
  EXPECT_TRUE(g.errors.empty());
}

// --- hostile sources against the real `kvmig receive --disk` ---

class DiskReceiverFault : public DiskMigration {
 protected:
  // Runs `act` on a connection to a fresh receiver; returns its exit status and stderr.
  std::pair<int, std::string> against_receiver(const std::function<void(helper::Connection&)>& act) {
    Child dst = receiver();
    auto conn = helper::connect(*helper::parse_endpoint("unix:" + path("mig.sock")), {});
    EXPECT_TRUE(conn.ok()) << conn.error().message;
    if (conn.ok()) {
      act(*conn);
      while (helper::read_message(*conn->control, 0, {}).ok()) {
      }
    }
    int status = dst.wait(20s).value_or(-1);
    return {status, read_text(path("recv.err"))};
  }
  static helper::Hello hello(uint64_t features) {
    helper::Hello h;
    h.migration_id = "disk-fault";
    h.vcpus = 1;
    h.memory.ranges.push_back({0, 256 * kMiB});
    h.streams = 1;
    h.features = features;
    return h;
  }
  static void handshake(helper::Connection& c, uint64_t features) {
    ASSERT_TRUE(helper::send_message(*c.control, helper::kWireVersion, helper::MsgType::hello,
                                     helper::encode(hello(features)))
                    .ok());
    auto ack = helper::read_message(*c.control, 0, {});
    ASSERT_TRUE(ack.ok() && ack->type() == helper::MsgType::hello_ack);
  }
};

TEST_F(DiskReceiverFault, BlocksBeforeDisksAreUnexpectedAndNothingIsCreated) {
  REQUIRE_GUEST();
  auto [status, err] = against_receiver([](helper::Connection& c) {
    handshake(c, helper::kFeatureDisks);
    std::vector<helper::DiskRun> runs{{0, 65536, helper::DiskRunKind::zero}};
    std::vector<uint8_t> head = helper::encode_disk_blocks_head(0, 1, runs);
    ASSERT_TRUE(helper::send_disk_blocks(*c.control, helper::kWireVersion, head, {}).ok());
  });
  EXPECT_EQ(status, 1);
  EXPECT_NE(err.find("[unexpected]"), std::string::npos) << err;
  EXPECT_NE(::access(path("dst.raw").c_str(), F_OK), 0);
}

TEST_F(DiskReceiverFault, BlocksOutsideTheDiskAreRefusedAndTheCopyIsDiscarded) {
  REQUIRE_GUEST();
  auto [status, err] = against_receiver([](helper::Connection& c) {
    handshake(c, helper::kFeatureDisks);
    helper::DisksMsg disks;
    disks.disks.push_back({8 * kMiB, 0, 65536});
    ASSERT_TRUE(helper::send_message(*c.control, helper::kWireVersion, helper::MsgType::disks, helper::encode(disks)).ok());
    auto ready = helper::read_message(*c.control, helper::kWireVersion, {});
    ASSERT_TRUE(ready.ok() && ready->type() == helper::MsgType::disks_ready);
    std::vector<uint8_t> block(65536, 0x77);
    std::vector<helper::DiskRun> runs{{8 * kMiB, 65536, helper::DiskRunKind::data}};  // just past the end
    std::vector<uint8_t> head = helper::encode_disk_blocks_head(0, 1, runs);
    iovec v{block.data(), block.size()};
    ASSERT_TRUE(helper::send_disk_blocks(*c.control, helper::kWireVersion, head, {&v, 1}).ok());
  });
  EXPECT_EQ(status, 1);
  EXPECT_NE(err.find("[malformed]"), std::string::npos) << err;
  EXPECT_NE(::access(path("dst.raw").c_str(), F_OK), 0) << "the copy of a failed migration is removed";
}

TEST_F(DiskReceiverFault, DiskPathsForASourceWithoutDisksIsAConfigMismatch) {
  REQUIRE_GUEST();
  auto [status, err] = against_receiver([](helper::Connection& c) {
    ASSERT_TRUE(helper::send_message(*c.control, helper::kWireVersion, helper::MsgType::hello,
                                     helper::encode(hello(0)))
                    .ok());
  });
  EXPECT_EQ(status, 1);
  EXPECT_NE(err.find("no disks to migrate"), std::string::npos) << err;
}

}  // namespace
}  // namespace kvmig::testing
