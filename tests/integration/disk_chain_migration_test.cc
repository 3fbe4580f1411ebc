// Live migration of a VM whose disk is a kvmig base + delta chain (docs/disk-migration.md,
// "Chained disks"), end to end on real KVM over loopback: `kvmig disk snapshot`, `kvmig vm run
// --disk TOP` (the guest writing and verifying its disk on the chain), `kvmig receive --disk`,
// `kvmig migrate`. The destination already holding the base (same content ID, by its own
// reading) gets zero base bytes; one whose base differs by one byte gets the base copied to a
// file of its own and the chain re-linked to it, its own file untouched. Hostile chain fields
// in DISKS end the receive with one line, nothing created.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "helper/disk_extents.h"
#include "helper/disk_layer_id.h"
#include "helper/disk_precopy_messages.h"
#include "helper/messages.h"
#include "tests/integration/migration_harness.h"

namespace kvmig::testing {
namespace {

using namespace std::chrono_literals;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kDisk = 128 * kMiB;

#define REQUIRE_GUEST()                                                                     \
  if (!have_kvm()) GTEST_SKIP() << "/dev/kvm is not available (the test boots the guest)"; \
  if (::access(guest64_path().c_str(), R_OK) != 0) GTEST_SKIP() << "test guest not built"

class DiskChainMigration : public ::testing::Test {
 protected:
  void SetUp() override {
    std::filesystem::create_directory(dst(""));
  }
  std::string path(const std::string& name) const { return scratch_.path(name); }
  std::string dst(const std::string& name) const { return scratch_.path("dst/" + name); }

  // A sparse base with 16 MiB of data, then `kvmig disk snapshot`: the VM runs on the delta.
  void make_chain() {
    int fd = ::open(path("base.raw").c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::ftruncate(fd, kDisk), 0);
    std::vector<uint8_t> buf(kMiB);
    std::mt19937 rng(5);
    for (uint64_t off = 0; off < 16 * kMiB; off += kMiB) {
      for (auto& b : buf) b = static_cast<uint8_t>(rng());
      ASSERT_EQ(::pwrite(fd, buf.data(), buf.size(), off), static_cast<ssize_t>(buf.size()));
    }
    ::close(fd);
    auto snap = run_to_end({KVMIG_BINARY, "disk", "snapshot", path("base.raw")}, path("snap"), std::chrono::seconds(30));
    ASSERT_EQ(snap.status, 0) << snap.err;
    ASSERT_EQ(::access(path("base.delta1.raw.kvmig-delta").c_str(), F_OK), 0);
  }
  Child source(const std::string& cmdline) {
    Child c = spawn({KVMIG_BINARY, "vm", "run", "--kernel", guest64_path(), "--memory", "256M", "--disk",
                     path("base.delta1.raw"), "--cmdline", cmdline, "--console", path("src.console"), "--control",
                     path("src.ctl")},
                    path("src.out"), path("src.err"));
    EXPECT_TRUE(wait_until([&] { return guest_report(path("src.console")).disk_passes.size() >= 2 || c.poll(); },
                           60s))
        << read_text(path("src.err"));
    return c;
  }
  Child receiver() {
    Child c = spawn({KVMIG_BINARY, "receive", "--listen", "unix:" + path("mig.sock"), "--disk", dst("top.raw"),
                     "--console", path("dst.console"), "--no-control"},
                    path("recv.out"), path("recv.err"));
    EXPECT_TRUE(wait_until([&] { return read_text(path("recv.err")).find("listening on") != std::string::npos; }, 10s));
    return c;
  }
  // Migrates the running chain guest; returns the report's "disk" object after checking the
  // guest went on verifying memory and disk at the destination to its end.
  nlohmann::json migrate_and_verify() {
    const std::string cmdline = "ws=16M pattern=seq passes=100 report_ms=50 disk=1 drate=20 dpattern=random";
    Child src = source(cmdline);
    Child d = receiver();
    Child mig = spawn({KVMIG_BINARY, "migrate", path("src.ctl"), "--to", "unix:" + path("mig.sock"), "--json",
                       "--no-progress"},
                      path("mig.out"), path("mig.err"));
    EXPECT_EQ(mig.wait(120s), 0) << read_text(path("mig.err")) << read_text(path("recv.err"));
    nlohmann::json r = nlohmann::json::parse(read_text(path("mig.out")), nullptr, false);
    EXPECT_FALSE(r.is_discarded());
    if (r.is_discarded()) return {};
    EXPECT_EQ(r["result"], "completed") << r.dump();
    EXPECT_EQ(src.wait(10s), 0) << "the source VM ends once the destination runs it";
    EXPECT_EQ(d.wait(120s), 0) << read_text(path("recv.err")) << read_text(path("dst.console")).substr(0, 2000);
    guest::Report g = guest_report(path("dst.console"));
    EXPECT_TRUE(g.disk_corrupt.empty()) << read_text(path("dst.console")).substr(0, 2000);
    EXPECT_TRUE(g.corrupt.empty());
    EXPECT_TRUE(g.errors.empty());
    EXPECT_FALSE(g.disk_passes.empty()) << "the destination guest did disk passes";
    EXPECT_TRUE(g.done.has_value() && g.done->pass) << "its final read-back of every block it wrote failed";
    std::fprintf(stderr, "report: %s\n", r.dump().substr(0, 700).c_str());
    return r.value("disk", nlohmann::json::object());
  }
  // The descriptor of the destination's top names `parent`.
  void expect_linked_to(const std::string& parent) {
    auto j = nlohmann::json::parse(read_text(dst("top.raw.kvmig-delta")), nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << "no descriptor at the destination";
    EXPECT_EQ(j.value("parent", ""), parent);
    EXPECT_EQ(j.value("size", uint64_t{0}), kDisk);
  }
  uint64_t digest(const std::string& file) {
    int fd = ::open(file.c_str(), O_RDONLY);
    auto h = helper::hash_file(fd, kDisk);
    ::close(fd);
    return h.ok() ? *h : 0;
  }

  ScratchDir scratch_{"/var/tmp/kvmig-chainmig"};  // not tmpfs: O_DIRECT, holes
};

TEST_F(DiskChainMigration, HeldBaseIsNotSentAndTheGuestVerifiesAtTheDestination) {
  REQUIRE_GUEST();
  make_chain();
  ASSERT_EQ(std::system(("cp --sparse=always " + path("base.raw") + " " + dst("base.raw")).c_str()), 0);
  struct stat before {};
  ASSERT_EQ(::stat(dst("base.raw").c_str(), &before), 0);
  nlohmann::json d = migrate_and_verify();
  EXPECT_EQ(d.value("layers_held", -1), 1) << d.dump();
  EXPECT_EQ(d.value("layers_copied", -1), 0);
  EXPECT_EQ(d.value("layer_bytes", uint64_t{1}), 0u) << "zero base bytes sent";
  expect_linked_to("base.raw");
  struct stat after {};
  ASSERT_EQ(::stat(dst("base.raw").c_str(), &after), 0);
  EXPECT_EQ(after.st_mtim.tv_nsec, before.st_mtim.tv_nsec) << "the held base is not written";
  EXPECT_EQ(after.st_mtim.tv_sec, before.st_mtim.tv_sec);
}

TEST_F(DiskChainMigration, ABaseThatDiffersIsCopiedNeverTrusted) {
  REQUIRE_GUEST();
  make_chain();
  ASSERT_EQ(std::system(("cp --sparse=always " + path("base.raw") + " " + dst("base.raw")).c_str()), 0);
  {  // one byte changed
    int fd = ::open(dst("base.raw").c_str(), O_RDWR);
    uint8_t b = 0;
    ASSERT_EQ(::pread(fd, &b, 1, 4 * kMiB + 3), 1);
    b ^= 0xff;
    ASSERT_EQ(::pwrite(fd, &b, 1, 4 * kMiB + 3), 1);
    ::close(fd);
  }
  uint64_t theirs = digest(dst("base.raw"));
  nlohmann::json d = migrate_and_verify();
  EXPECT_EQ(d.value("layers_held", -1), 0) << d.dump();
  EXPECT_EQ(d.value("layers_copied", -1), 1);
  EXPECT_GE(d.value("layer_bytes", uint64_t{0}), 16 * kMiB) << "the base's data went";
  EXPECT_LT(d.value("layer_bytes", uint64_t{0}), kDisk) << "its holes did not";
  // The copy went to a name of its own; the destination's own file is untouched.
  auto id = helper::layer_content_id(path("base.raw"), false);
  ASSERT_TRUE(id.ok()) << id.error().message;
  std::string copy = "base.raw." + id->id.hex().substr(0, 16);
  expect_linked_to(copy);
  EXPECT_EQ(digest(dst(copy)), digest(path("base.raw"))) << "the copied base is the source's";
  EXPECT_EQ(digest(dst("base.raw")), theirs);
}

// --- hostile chain fields against the real `kvmig receive --disk` ---

TEST_F(DiskChainMigration, HostileChainFieldsEndTheReceiveWithOneLine) {
  REQUIRE_GUEST();
  Child d = receiver();
  auto conn = helper::connect(*helper::parse_endpoint("unix:" + path("mig.sock")), {});
  ASSERT_TRUE(conn.ok()) << conn.error().message;
  helper::Hello h;
  h.migration_id = "chain-fault";
  h.vcpus = 1;
  h.memory.ranges.push_back({0, 256 * kMiB});
  h.streams = 1;
  h.features = helper::kFeatureDisks;
  ASSERT_TRUE(helper::send_message(*conn->control, helper::kWireVersion, helper::MsgType::hello, helper::encode(h)).ok());
  auto ack = helper::read_message(*conn->control, 0, {});
  ASSERT_TRUE(ack.ok() && ack->type() == helper::MsgType::hello_ack);
  helper::DisksMsg disks;
  disks.disks.push_back({8 * kMiB, 0, 65536, {}});
  disks.disks[0].lower.push_back({8 * kMiB, 0, helper::LayerId{1, 2}, "../../escape.raw"});
  ASSERT_TRUE(
      helper::send_message(*conn->control, helper::kWireVersion, helper::MsgType::disks, helper::encode(disks)).ok());
  while (helper::read_message(*conn->control, 0, {}).ok()) {
  }
  EXPECT_EQ(d.wait(20s).value_or(-1), 1);
  std::string err = read_text(path("recv.err"));
  EXPECT_NE(err.find("[malformed]"), std::string::npos) << err;
  EXPECT_NE(err.find("contains '/'"), std::string::npos) << err;
  EXPECT_NE(::access(dst("top.raw").c_str(), F_OK), 0) << "nothing created";
  EXPECT_NE(::access(path("escape.raw").c_str(), F_OK), 0);
}

}  // namespace
}  // namespace kvmig::testing
