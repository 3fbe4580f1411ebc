// The fault matrix's two gaps that only a process's liveness closes (docs/control-plane.md):
//
// TaggedKill: the destinations of a group are killed -9 between their completion tag and
// their first vCPU run (KVMIG_FAULT=destination:tagged). The records alone say "migrated",
// while the only copy of each VM is its paused source: plain `kvmig recover` used to destroy
// it. Now status says in doubt ("destination copy is gone; it may never have run"), recover
// destroys nothing, and `recover --resume-source` fences each tagged placeholder and resumes
// each source: every VM runs exactly once, its guest verifying with no error. A VM of the same
// group that arrived and runs reads migrated, and once its destination process is killed too,
// still migrated, "not running": it ended after the move.
//
// StaleSourceEntry: a source process killed -9 after its VM moved away (released, before
// migrate-finish) left its `running` registry row behind, and the VM could never come back.
// Now the move back succeeds; a source process that is alive still refuses it.
#include <gtest/gtest.h>

#include "host/placeholder_registry.h"
#include "host/site_db.h"
#include "tests/integration/fault_harness.h"

namespace kvmig::testing {
namespace {

class TaggedKill : public FaultBed {};

TEST_F(TaggedKill, DestinationKilledBetweenTagAndFirstRunLosesNoVm) {
  REQUIRE_FAULT_GUEST();
  const std::string id = "tagged";
  start_group(4);
  if (HasFatalFailure()) return;
  GroupVm& a = vms_[0];  // undisturbed
  for (size_t i = 0; i < vms_.size(); ++i) {
    std::vector<std::string> env;
    if (i > 0) env = {"KVMIG_FAULT=destination:tagged:stop"};
    start_receiver(vms_[i], "unix:" + path(vms_[i].tag + ".mig"), env);
    if (HasFatalFailure()) return;
  }
  for (GroupVm& vm : vms_) start_migrate(vm, "unix:" + path(vm.tag + ".mig"), id);
  for (size_t i = 1; i < vms_.size(); ++i)
    ASSERT_TRUE(wait_until([&] { return is_stopped(vms_[i].receiver.pid); }, 30s)) << why(vms_[i]);
  for (size_t i = 1; i < vms_.size(); ++i) vms_[i].receiver.kill9();

  EXPECT_EQ(a.migrate.wait(60s), 0) << why(a);
  for (size_t i = 1; i < vms_.size(); ++i)
    EXPECT_EQ(vms_[i].migrate.wait(60s), 3) << "in doubt after COMMIT\n" << why(vms_[i]);

  std::map<std::string, std::string> reasons;
  auto got = verdicts(id, 3, &reasons);
  EXPECT_EQ(got[a.uuid], "migrated") << reasons[a.uuid];
  EXPECT_NE(reasons[a.uuid].find("destination copy is alive"), std::string::npos) << reasons[a.uuid];
  for (size_t i = 1; i < vms_.size(); ++i) {
    EXPECT_EQ(got[vms_[i].uuid], "in-doubt") << reasons[vms_[i].uuid];
    EXPECT_NE(reasons[vms_[i].uuid].find("destination copy is gone; it may never have run"), std::string::npos)
        << reasons[vms_[i].uuid];
  }

  // Plain recover destroys nothing: every source copy is still there, paused.
  CmdRun rec = recover(id);
  EXPECT_EQ(rec.status, 3) << rec.out << rec.err;
  EXPECT_EQ(rec.out.find("destroyed"), std::string::npos) << rec.out;
  for (size_t i = 1; i < vms_.size(); ++i) {
    EXPECT_FALSE(vms_[i].source.poll()) << why(vms_[i]);
    auto s = host::control_request(path(vms_[i].tag + ".ctl"), {{"cmd", "stats"}});
    ASSERT_TRUE(s.ok()) << why(vms_[i]);
    EXPECT_TRUE(s->value("paused", false));
  }

  // --resume-source is refused for a VM whose destination copy is alive.
  CmdRun refused = kvmig({"recover", "--site", dst_site(), "--source-site", src_site(), "--migration", id,
                          "--resume-source", "--vm", a.uuid});
  EXPECT_EQ(refused.status, 3) << refused.out << refused.err;
  EXPECT_NE(refused.out.find("--resume-source refused"), std::string::npos) << refused.out;

  std::vector<std::string> args{"recover", "--site", dst_site(), "--source-site", src_site(), "--migration", id,
                                "--resume-source", "--json"};
  for (size_t i = 1; i < vms_.size(); ++i) args.insert(args.end(), {"--vm", vms_[i].uuid});
  CmdRun resumed = kvmig(args);
  EXPECT_EQ(resumed.status, 0) << resumed.out << resumed.err;
  auto rj = nlohmann::json::parse(resumed.out, nullptr, false);
  ASSERT_FALSE(rj.is_discarded()) << resumed.out << resumed.err;
  EXPECT_EQ(rj["vms"].size(), vms_.size() - 1) << "only the VMs named";
  for (const auto& vm : rj["vms"]) EXPECT_EQ(vm["done"].size(), 2u) << vm.dump();

  expect_runs_once_at(a, "destination");
  for (size_t i = 1; i < vms_.size(); ++i) expect_runs_once_at(vms_[i], "source");

  // The fence reads "not migrated", and plain recover then has nothing left to change.
  reasons.clear();
  got = verdicts(id, 0, &reasons);
  for (size_t i = 1; i < vms_.size(); ++i) {
    EXPECT_EQ(got[vms_[i].uuid], "not-migrated") << reasons[vms_[i].uuid];
    EXPECT_NE(reasons[vms_[i].uuid].find("fenced"), std::string::npos) << reasons[vms_[i].uuid];
  }
  CmdRun again = recover(id);
  EXPECT_EQ(again.status, 0) << again.out << again.err;
  EXPECT_EQ(again.out.find("resumed"), std::string::npos) << again.out;
  for (size_t i = 1; i < vms_.size(); ++i) EXPECT_EQ(running_copies(vms_[i]), 1) << why(vms_[i]);

  // a's VM ends after the move (its process killed): migrated still, and said not to run.
  a.receiver.kill9();
  reasons.clear();
  got = verdicts(id, 0, &reasons);
  EXPECT_EQ(got[a.uuid], "migrated") << reasons[a.uuid];
  EXPECT_NE(reasons[a.uuid].find("destination copy is not running"), std::string::npos) << reasons[a.uuid];
}

class StaleSourceEntry : public FaultBed {};

TEST_F(StaleSourceEntry, DeadSourceRowGivesWayToTheVmComingBackALiveOneDoesNot) {
  REQUIRE_FAULT_GUEST();
  start_group(2);
  if (HasFatalFailure()) return;
  GroupVm &x = vms_[0], &y = vms_[1];
  // A -> B; each `kvmig migrate` killed while its destination holds COMMIT, so each source
  // copy stays, released and paused, waiting for a migrate-finish that never comes.
  for (GroupVm& vm : vms_) {
    start_receiver(vm, "unix:" + path(vm.tag + ".mig"), {"KVMIG_FAULT=destination:commit:stop"});
    if (HasFatalFailure()) return;
    start_migrate(vm, "unix:" + path(vm.tag + ".mig"), "out");
  }
  for (GroupVm& vm : vms_) {
    ASSERT_TRUE(wait_until([&] { return is_stopped(vm.receiver.pid); }, 30s)) << why(vm);
    vm.migrate.kill9();
    ::kill(vm.receiver.pid, SIGCONT);
  }
  for (GroupVm& vm : vms_) ASSERT_TRUE(wait_until([&] { return source_phase(vm) == "done"; }, 30s)) << why(vm);
  x.source.kill9();  // x's old source process dies; its `running` row stays at A
  {
    auto db = host::SiteDb::open(src_site(), false);
    ASSERT_TRUE(db.ok());
    host::MicroVmRegistry reg(**db);
    auto row = reg.find(x.uuid);
    ASSERT_TRUE(row.ok() && *row);
    EXPECT_EQ((*row)->state, host::VmEntryState::running) << "the stale row this test is about";
  }

  auto move_back = [&](GroupVm& vm, Child& receiver) {
    assign(receiver, spawn_env({KVMIG_BINARY, "receive", "--listen", "unix:" + path(vm.tag + ".back"), "--console",
                                path(vm.tag + ".back.console"), "--control", path(vm.tag + ".back.ctl"), "--site",
                                src_site()},
                               {}, path(vm.tag + ".back.out"), path(vm.tag + ".back.err")));
    EXPECT_TRUE(wait_until(
        [&] { return read_text(path(vm.tag + ".back.err")).find("listening on") != std::string::npos; }, 20s));
    return kvmig({"migrate", path(vm.tag + ".dst.ctl"), "--to",
                  "unix:" + path(vm.tag + ".back"), "--migration", "back-" + vm.tag, "--json"});
  };
  Child x_back, y_back;
  CmdRun xr = move_back(x, x_back);
  EXPECT_EQ(xr.status, 0) << xr.out << xr.err << read_text(path("a.back.err"));
  ASSERT_TRUE(wait_until([&] { return guest_report(path("a.back.console")).passes.size() > 1; }, 30s))
      << read_text(path("a.back.err"));
  guest::Report r = guest_report(path("a.back.console"));
  EXPECT_TRUE(r.corrupt.empty() && r.errors.empty()) << read_text(path("a.back.console"));
  for (const auto& p : r.passes) EXPECT_EQ(p.errors, 0u);
  auto stats = host::control_request(path("a.back.ctl"), {{"cmd", "stats"}});
  ASSERT_TRUE(stats.ok()) << stats.error().message;
  EXPECT_FALSE(stats->value("paused", true));

  // y's old source process lives (paused, released): its row is not replaced, the move back
  // fails before anything moved, and y runs on at B.
  CmdRun yr = move_back(y, y_back);
  EXPECT_NE(yr.status, 0) << yr.out << yr.err;
  EXPECT_TRUE(y_back.wait(30s).has_value());
  EXPECT_NE(read_text(path("b.back.err")).find("already runs"), std::string::npos) << read_text(path("b.back.err"));
  auto ys = host::control_request(path("b.dst.ctl"), {{"cmd", "stats"}});
  ASSERT_TRUE(ys.ok()) << ys.error().message;
  EXPECT_FALSE(ys->value("paused", true)) << "y runs on at B";
  EXPECT_FALSE(y.source.poll()) << "y's old source copy is left alone";
}

}  // namespace
}  // namespace kvmig::testing
