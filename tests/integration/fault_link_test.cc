// The fault matrix, link-cut part (issue 5, item 7), for micro-VMs: a group of three VMs whose
// destinations (`kvmig receive`) live in a network namespace of their own, reached over TCP
// through a veth pair made by the test. At each phase the link goes down under all three;
// both sides must notice within the link timeout (TCP_USER_TIMEOUT and keepalive,
// helper/transport.h; KVMIG_LINK_TIMEOUT_MS=3000 here) rather than hang, `kvmig status` must
// say where each VM is, and after `kvmig recover` each runs exactly once.
#include <gtest/gtest.h>

#include "tests/integration/fault_harness.h"
#include "tests/test_util.h"

namespace kvmig::testing {
namespace {

const std::vector<std::string> kLinkTimeout = {"KVMIG_LINK_TIMEOUT_MS=3000"};

class LinkCut : public FaultBed, public ::testing::WithParamInterface<std::string> {
 protected:
  void SetUp() override {
    FaultBed::SetUp();
    if (::geteuid() != 0 || !kvmig::test::have_program("ip")) GTEST_SKIP() << "needs root and iproute2 for a netns";
    int n = static_cast<int>(::getpid() % 200) + 20;
    ns_ = "kvmig-f5-" + std::to_string(::getpid());
    host_if_ = "f5h" + std::to_string(::getpid());
    dest_if_ = "f5d" + std::to_string(::getpid());
    host_ip_ = "10.79." + std::to_string(n) + ".1";
    dest_ip_ = "10.79." + std::to_string(n) + ".2";
    auto sh = [](const std::string& cmd) {
      auto r = kvmig::test::run_shell(cmd);
      EXPECT_EQ(r.status, 0) << cmd << ": " << r.out;
    };
    sh("ip netns add " + ns_);
    made_ = true;
    sh("ip link add " + host_if_ + " type veth peer name " + dest_if_);
    sh("ip link set " + dest_if_ + " netns " + ns_);
    sh("ip addr add " + host_ip_ + "/24 dev " + host_if_ + " && ip link set " + host_if_ + " up");
    sh("ip netns exec " + ns_ + " sh -c 'ip addr add " + dest_ip_ + "/24 dev " + dest_if_ + " && ip link set " +
       dest_if_ + " up && ip link set lo up'");
  }
  void TearDown() override {
    FaultBed::TearDown();  // the receivers end before their namespace goes
    if (made_) {
      kvmig::test::run_shell("ip link del " + host_if_);
      kvmig::test::run_shell("ip netns del " + ns_);
    }
  }
  void cut() {
    auto r = kvmig::test::run_shell("ip link set " + host_if_ + " down");
    ASSERT_EQ(r.status, 0) << r.out;
  }

  std::string ns_, host_if_, dest_if_, host_ip_, dest_ip_;
  bool made_ = false;
};

TEST_P(LinkCut, BothSidesGiveUpAndEveryVmEndsWhereStatusSays) {
  REQUIRE_FAULT_GUEST();
  const std::string phase = GetParam();
  const std::string id = "cut-" + phase;
  const bool source_stops = phase == "precopy" || phase == "ready";
  std::vector<std::vector<std::string>> env(3, kLinkTimeout);
  if (source_stops)
    for (auto& e : env) e.push_back("KVMIG_FAULT=source:" + phase + ":stop");
  start_group(3, env);
  if (HasFatalFailure()) return;
  std::vector<std::string> renv = kLinkTimeout;
  if (!source_stops) renv.push_back("KVMIG_FAULT=destination:" + phase + ":stop");
  for (size_t i = 0; i < vms_.size(); ++i) {
    start_receiver(vms_[i], dest_ip_ + ":" + std::to_string(7301 + i), renv, {"ip", "netns", "exec", ns_});
    if (HasFatalFailure()) return;
  }
  for (size_t i = 0; i < vms_.size(); ++i)
    start_migrate(vms_[i], dest_ip_ + ":" + std::to_string(7301 + i), id);
  for (GroupVm& vm : vms_) {
    Child& held = source_stops ? vm.source : vm.receiver;
    ASSERT_TRUE(wait_until([&] { return is_stopped(held.pid); }, 30s)) << why(vm);
  }
  cut();
  auto t0 = std::chrono::steady_clock::now();
  for (GroupVm& vm : vms_) ::kill((source_stops ? vm.source : vm.receiver).pid, SIGCONT);

  // Both sides notice: every migrate command ends, and every receiver but a committed one.
  const bool committed = phase == "ready" || phase == "commit";
  for (GroupVm& vm : vms_) {
    EXPECT_EQ(vm.migrate.wait(30s), committed ? 3 : 1) << "3: in doubt after COMMIT; 1: failed\n" << why(vm);
    if (phase != "commit") {
      EXPECT_EQ(vm.receiver.wait(30s), 1) << why(vm);
    }
  }
  double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(waited, 20.0) << "the link timeout is 3 s";

  const std::string verdict = phase == "commit" ? "migrated" : "not-migrated";
  EXPECT_EQ(verdicts(id, 0), all(verdict));
  CmdRun rec = recover(id);
  EXPECT_EQ(rec.status, 0) << rec.out << rec.err;
  for (GroupVm& vm : vms_) expect_runs_once_at(vm, phase == "commit" ? "destination" : "source");
}

INSTANTIATE_TEST_SUITE_P(Phases, LinkCut, ::testing::Values("hello", "precopy", "ready", "commit"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace kvmig::testing
