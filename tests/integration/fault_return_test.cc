// Regression: `kvmig recover` must match the source copy by migration id, not by UUID alone.
// A VM moves A -> B (m1), then back B -> A (m2), and m2's source is killed -9 after COMMIT:
// the VM runs at A again, by m2. Recovering m1 afterwards (destination B, source A) finds a
// live VM with the same UUID at A -- but it is not m1's source copy (that one was released
// long ago): it is the VM itself, come back. Matching by UUID alone destroyed it.
#include <gtest/gtest.h>

#include "tests/integration/fault_harness.h"

namespace kvmig::testing {
namespace {

class ReturnedVm : public FaultBed {};

TEST_F(ReturnedVm, RecoverOfTheFirstMigrationLeavesTheVmThatCameBackAlone) {
  REQUIRE_FAULT_GUEST();
  start_group(1);
  if (HasFatalFailure()) return;
  GroupVm& vm = vms_[0];
  // A -> B, undisturbed.
  start_receiver(vm, "unix:" + path("a.mig"));
  if (HasFatalFailure()) return;
  start_migrate(vm, "unix:" + path("a.mig"), "m1");
  ASSERT_EQ(vm.migrate.wait(60s), 0) << why(vm);

  // B -> A, its source (B's receiver process, running the VM) killed after COMMIT.
  Child back = spawn_env({KVMIG_BINARY, "receive", "--listen", "unix:" + path("back.mig"), "--console",
                          path("back.console"), "--control", path("back.ctl"), "--site", src_site()},
                         {"KVMIG_FAULT=destination:commit:stop"}, path("back.out"), path("back.err"));
  ASSERT_TRUE(wait_until([&] { return read_text(path("back.err")).find("listening on") != std::string::npos; }, 20s));
  Child m2 = spawn({KVMIG_BINARY, "migrate", path("a.dst.ctl"), "--to", "unix:" + path("back.mig"), "--migration",
                    "m2", "--json"},
                   path("m2.out"), path("m2.err"));
  ASSERT_TRUE(wait_until([&] { return is_stopped(back.pid); }, 30s)) << read_text(path("back.err"));
  vm.receiver.kill9();
  ::kill(back.pid, SIGCONT);
  ASSERT_TRUE(wait_until([&] { return guest_report(path("back.console")).passes.size() > 1; }, 20s))
      << read_text(path("back.err"));

  auto status = [&](const std::string& dst, const std::string& src, const std::string& id) {
    CmdRun r = kvmig({"status", "--site", dst, "--source-site", src, "--migration", id, "--json"});
    auto j = nlohmann::json::parse(r.out, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << r.out << r.err;
    return j.is_discarded() ? nlohmann::json() : j["vms"][0];
  };
  auto m2_status = status(src_site(), dst_site(), "m2");
  EXPECT_EQ(m2_status["verdict"], "migrated") << m2_status.dump();
  CmdRun rec2 = kvmig({"recover", "--site", src_site(), "--source-site", dst_site(), "--migration", "m2"});
  EXPECT_EQ(rec2.status, 0) << rec2.out << rec2.err;

  // m1: B received the VM (completed), A sent it -- and A now runs the VM again, by m2.
  auto m1_status = status(dst_site(), src_site(), "m1");
  EXPECT_EQ(m1_status["verdict"], "migrated") << m1_status.dump();
  EXPECT_EQ(m1_status["source"]["state"], "other-copy") << m1_status.dump();
  CmdRun rec1 = kvmig({"recover", "--site", dst_site(), "--source-site", src_site(), "--migration", "m1", "--json"});
  EXPECT_EQ(rec1.status, 0) << rec1.out << rec1.err;
  EXPECT_EQ(rec1.out.find("destroyed"), std::string::npos) << rec1.out;

  auto stats = host::control_request(path("back.ctl"), {{"cmd", "stats"}});
  ASSERT_TRUE(stats.ok()) << "the VM that came back was destroyed: " << stats.error().message;
  EXPECT_FALSE(stats->value("paused", true));
  EXPECT_FALSE(back.poll());
  auto before = guest_report(path("back.console")).passes.size();
  EXPECT_TRUE(wait_until([&] { return guest_report(path("back.console")).passes.size() > before; }, 20s));
  guest::Report r = guest_report(path("back.console"));
  EXPECT_TRUE(r.corrupt.empty() && r.errors.empty()) << read_text(path("back.console"));
  for (const auto& p : r.passes) EXPECT_EQ(p.errors, 0u);
  EXPECT_TRUE(m2.wait(30s).has_value());
}

}  // namespace
}  // namespace kvmig::testing
