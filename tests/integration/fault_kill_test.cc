// The fault matrix, kill -9 half (issue 5, item 7), for micro-VMs: one group of four VMs moved
// under one migration id, each phase once. In the group, VM a is the control (it migrates
// undisturbed); at the phase, b's destination (`kvmig receive`) is killed, c's source (the VM's
// own process, which runs the source session) is killed, and d's `kvmig migrate` command is
// killed. Then `kvmig status` must give each VM its verdict, and after `kvmig recover` each VM
// runs exactly once -- except c before COMMIT: its only copy was the killed process, so it
// runs nowhere, and status and recover must say exactly that and the destination must not
// have started it.
//
// Phases (helper/fault_point.h): hello = the destination recorded migration_started and the
// placeholder, HELLO_ACK not sent; precopy = the source sent its first round, the second not
// begun; ready = the source read READY, COMMIT not sent; commit = the destination read COMMIT,
// completion not recorded.
#include <gtest/gtest.h>

#include "tests/integration/fault_harness.h"

namespace kvmig::testing {
namespace {

class KillMatrix : public FaultBed, public ::testing::WithParamInterface<std::string> {};

TEST_P(KillMatrix, EveryVmOfTheGroupEndsWhereStatusSays) {
  REQUIRE_FAULT_GUEST();
  const std::string phase = GetParam();
  const std::string id = "kill-" + phase;
  const bool source_stops = phase == "precopy" || phase == "ready";
  std::vector<std::vector<std::string>> env(4);
  for (int i = 1; i < 4; ++i)
    if (source_stops) env[i] = {"KVMIG_FAULT=source:" + phase + ":stop"};
  start_group(4, env);
  if (HasFatalFailure()) return;
  GroupVm &a = vms_[0], &b = vms_[1], &c = vms_[2], &d = vms_[3];
  for (int i = 0; i < 4; ++i) {
    std::vector<std::string> renv;
    if (i > 0 && (phase == "hello" || phase == "commit")) renv = {"KVMIG_FAULT=destination:" + phase + ":stop"};
    start_receiver(vms_[i], "unix:" + path(vms_[i].tag + ".mig"), renv);
    if (HasFatalFailure()) return;
  }
  for (GroupVm& vm : vms_) start_migrate(vm, "unix:" + path(vm.tag + ".mig"), id);

  // Every faulted VM at the phase, held there.
  for (GroupVm* vm : {&b, &c, &d}) {
    Child& held = source_stops ? vm->source : vm->receiver;
    ASSERT_TRUE(wait_until([&] { return is_stopped(held.pid); }, 30s)) << why(*vm);
  }
  auto go_on = [&](GroupVm& vm) { ::kill((source_stops ? vm.source : vm.receiver).pid, SIGCONT); };
  b.receiver.kill9();
  if (source_stops) go_on(b);
  c.source.kill9();
  if (!source_stops) go_on(c);
  d.migrate.kill9();
  go_on(d);

  EXPECT_EQ(a.migrate.wait(60s), 0) << why(a);
  const bool committed = phase == "ready" || phase == "commit";
  EXPECT_EQ(b.migrate.wait(60s), committed ? 3 : 1) << "3: in doubt after COMMIT; 1: failed before\n" << why(b);
  EXPECT_TRUE(c.migrate.wait(60s).has_value()) << why(c);
  // d's session goes on without its command and completes; its source copy stays paused.
  ASSERT_TRUE(wait_until([&] { return source_phase(d) == "done"; }, 60s)) << why(d);
  // c's destination ends by itself: with the aborted migration, or running the VM (commit).
  if (phase != "commit") {
    EXPECT_EQ(c.receiver.wait(60s), 1) << why(c);
  }

  std::map<std::string, std::string> reasons;
  auto got = verdicts(id, 0, &reasons);
  EXPECT_EQ(got[a.uuid], "migrated") << reasons[a.uuid];
  EXPECT_EQ(got[b.uuid], "not-migrated") << reasons[b.uuid];
  EXPECT_EQ(got[c.uuid], phase == "commit" ? "migrated" : "not-migrated") << reasons[c.uuid];
  EXPECT_EQ(got[d.uuid], "migrated") << reasons[d.uuid];

  CmdRun rec = recover(id);
  const bool c_lost = phase != "commit";
  EXPECT_EQ(rec.status, c_lost ? 3 : 0) << rec.out << rec.err;
  auto rj = nlohmann::json::parse(rec.out, nullptr, false);
  ASSERT_FALSE(rj.is_discarded()) << rec.out << rec.err;
  for (const auto& vm : rj["vms"]) {
    std::string problem = vm["problem"].get<std::string>();
    if (vm["vm_uuid"] == c.uuid && c_lost)
      EXPECT_NE(problem.find("runs nowhere"), std::string::npos) << vm.dump();
    else
      EXPECT_EQ(problem, "") << vm.dump();
  }

  expect_runs_once_at(a, "destination");
  expect_runs_once_at(b, "source");
  if (c_lost) {
    EXPECT_EQ(running_copies(c), 0) << "the destination must not start a VM whose source died before COMMIT";
    EXPECT_FALSE(c.receiver.poll() && c.receiver.status == 0) << why(c);
  } else {
    expect_runs_once_at(c, "destination");
  }
  expect_runs_once_at(d, "destination");
  EXPECT_TRUE(d.source.wait(10s).has_value()) << "recover ends d's paused source copy";
  // Recovery is idempotent: a second run changes nothing and finds nothing more to do.
  auto again = verdicts(id, 0);
  EXPECT_EQ(again, got);
}

// Regression: the source site unregistered a VM at DONE, while its copy still existed, paused,
// waiting for `kvmig migrate` to send migrate-finish. With that command killed, `kvmig recover`
// found no registry row, read the copy as gone and left it paused for good.
class KilledMigrateCommand : public FaultBed {};

TEST_F(KilledMigrateCommand, RecoverEndsThePausedSourceCopyItLeftBehind) {
  REQUIRE_FAULT_GUEST();
  start_group(1);
  if (HasFatalFailure()) return;
  GroupVm& vm = vms_[0];
  start_receiver(vm, "unix:" + path("a.mig"), {"KVMIG_FAULT=destination:commit:stop"});
  if (HasFatalFailure()) return;
  start_migrate(vm, "unix:" + path("a.mig"), "orphan");
  ASSERT_TRUE(wait_until([&] { return is_stopped(vm.receiver.pid); }, 30s)) << why(vm);
  vm.migrate.kill9();
  ::kill(vm.receiver.pid, SIGCONT);
  ASSERT_TRUE(wait_until([&] { return source_phase(vm) == "done"; }, 30s)) << why(vm);
  auto stats = host::control_request(path("a.ctl"), {{"cmd", "stats"}});
  ASSERT_TRUE(stats.ok());
  EXPECT_TRUE(stats->value("paused", false)) << "the released copy waits, paused, for migrate-finish";

  std::map<std::string, std::string> reasons;
  EXPECT_EQ(verdicts("orphan", 0, &reasons), all("migrated"));
  EXPECT_NE(reasons[vm.uuid].find("source copy still exists (paused)"), std::string::npos) << reasons[vm.uuid];
  CmdRun rec = recover("orphan");
  EXPECT_EQ(rec.status, 0) << rec.out << rec.err;
  EXPECT_NE(rec.out.find("source copy destroyed"), std::string::npos) << rec.out;
  EXPECT_EQ(vm.source.wait(10s), 0) << "recover ends the paused copy";
  expect_runs_once_at(vm, "destination");
}

INSTANTIATE_TEST_SUITE_P(Phases, KillMatrix, ::testing::Values("hello", "precopy", "ready", "commit"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace kvmig::testing
