// The fault matrix, disk-full part (issue 5, item 7), for micro-VMs: the destination site (its
// SQLite database) lives on a 1 MiB tmpfs in a private mount namespace of this test (its
// children, the kvmig processes, see it too; nothing outside does, and it goes with the test).
// A group of three VMs; at each phase the tmpfs is filled up, so the destination cannot record.
//   hello, precopy: the migration must fail before COMMIT and the source run on by itself
//     (the destination checks it can still record before it sends READY);
//   ready, commit: COMMIT is sent (or read) already, so the completion cannot be recorded
//     after it: the VM must not run at the destination, the source stays paused, in doubt,
//     and status reads "not migrated" from the untagged placeholder. Recovery resumes a source
//     only once its fence is written: on the full disk that may work (SQLite reuses WAL pages
//     it holds) or fail safely (nothing resumed); with room again it always works.
#include <fcntl.h>
#include <sched.h>
#include <sys/mount.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "tests/integration/fault_harness.h"

namespace kvmig::testing {
namespace {

class DiskFull : public FaultBed, public ::testing::WithParamInterface<std::string> {
 protected:
  std::string dst_site() const override { return path("disk/dst-site"); }
  void prepare_sites() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root for a private mount namespace with a tmpfs";
    ASSERT_EQ(::unshare(CLONE_NEWNS), 0) << std::strerror(errno);
    ASSERT_EQ(::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr), 0) << std::strerror(errno);
    std::filesystem::create_directories(path("disk"));
    ASSERT_EQ(::mount("kvmig-f5-disk", path("disk").c_str(), "tmpfs", 0, "size=1m,mode=0700"), 0)
        << std::strerror(errno);
    mounted_ = true;
  }
  void TearDown() override {
    if (mounted_) ::umount2(path("disk").c_str(), MNT_DETACH);  // lazily: receivers may hold it
    FaultBed::TearDown();
  }
  // Writes a filler file until the tmpfs has no block left.
  void fill() {
    int fd = ::open(path("disk/filler").c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
    ASSERT_GE(fd, 0);
    std::vector<char> block(4096, 'x');
    while (::write(fd, block.data(), block.size()) > 0) {
    }
    EXPECT_EQ(errno, ENOSPC);
    ::close(fd);
  }
  void make_room() { std::filesystem::remove(path("disk/filler")); }

  bool mounted_ = false;
};

TEST_P(DiskFull, NothingRunsTwiceAndRecoveryWaitsForSpace) {
  REQUIRE_FAULT_GUEST();
  const std::string phase = GetParam();
  const std::string id = "full-" + phase;
  const bool source_stops = phase == "precopy" || phase == "ready";
  std::vector<std::vector<std::string>> env(3);
  if (source_stops)
    for (auto& e : env) e.push_back("KVMIG_FAULT=source:" + phase + ":stop");
  start_group(3, env);
  if (HasFatalFailure()) return;
  std::vector<std::string> renv;
  if (phase == "commit") renv.push_back("KVMIG_FAULT=destination:commit:stop");
  for (GroupVm& vm : vms_) {
    start_receiver(vm, "unix:" + path(vm.tag + ".mig"), renv);
    if (HasFatalFailure()) return;
  }
  if (phase == "hello") fill();
  for (GroupVm& vm : vms_) start_migrate(vm, "unix:" + path(vm.tag + ".mig"), id);
  if (phase != "hello") {
    for (GroupVm& vm : vms_) {
      Child& held = source_stops ? vm.source : vm.receiver;
      ASSERT_TRUE(wait_until([&] { return is_stopped(held.pid); }, 30s)) << why(vm);
    }
    fill();
    for (GroupVm& vm : vms_) ::kill((source_stops ? vm.source : vm.receiver).pid, SIGCONT);
  }

  const bool committed = phase == "ready" || phase == "commit";
  for (GroupVm& vm : vms_) {
    EXPECT_EQ(vm.migrate.wait(60s), committed ? 3 : 1) << "3: in doubt after COMMIT; 1: failed before\n" << why(vm);
    EXPECT_EQ(vm.receiver.wait(30s), 1) << "the destination never runs a VM it could not record\n" << why(vm);
    EXPECT_EQ(running_copies(vm), committed ? 0 : 1) << why(vm);
  }
  EXPECT_EQ(verdicts(id, 0), all("not-migrated"));

  if (committed) {
    // Still full. SQLite may fit the fence into WAL pages it already holds (the WAL is reused
    // from its start after a checkpoint); where it cannot, recovery fails and resumes nothing.
    CmdRun first = recover(id);
    EXPECT_TRUE(first.status == 0 || first.status == 3) << first.out << first.err;
    auto j = nlohmann::json::parse(first.out, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << first.out << first.err;
    for (const auto& r : j["vms"])
      for (GroupVm& vm : vms_)
        if (r["vm_uuid"] == vm.uuid)
          EXPECT_EQ(running_copies(vm), r["problem"].get<std::string>().empty() ? 1 : 0)
              << "resumed only once its fence is written\n" << r.dump();
  }
  make_room();
  CmdRun rec = recover(id);
  EXPECT_EQ(rec.status, 0) << rec.out << rec.err;
  for (GroupVm& vm : vms_) expect_runs_once_at(vm, "source");
  EXPECT_EQ(verdicts(id, 0), all("not-migrated"));
}

INSTANTIATE_TEST_SUITE_P(Phases, DiskFull, ::testing::Values("hello", "precopy", "ready", "commit"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace kvmig::testing
