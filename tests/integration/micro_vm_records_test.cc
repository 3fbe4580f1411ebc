// Site records written by real micro-VM migrations, end to end through the kvmig binary:
// `vm run --site` registers the source VM, `receive --site` records started / placeholder /
// completed, `migrate --migration` records source_released, and `kvmig status` / `recover`
// read those records. Pins the wiring, not the checker's logic (tests/unit/status_checker_test).
#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "host/placeholder_registry.h"
#include "host/site_db.h"
#include "host/site_records.h"
#include "tests/integration/migration_harness.h"

namespace kvmig::testing {
namespace {

using namespace std::chrono_literals;

#define REQUIRE_GUEST()                                                                     \
  if (!have_kvm()) GTEST_SKIP() << "/dev/kvm is not available";                             \
  if (::access(guest64_path().c_str(), R_OK) != 0) GTEST_SKIP() << "test guest not built"

const std::string kVmA = "0b6c2f7e-a1a1-4d3c-8e2f-1234567890aa";
const std::string kVmB = "0b6c2f7e-b2b2-4d3c-8e2f-1234567890bb";
const std::string kVmC = "0b6c2f7e-c3c3-4d3c-8e2f-1234567890cc";

class MicroVmRecords : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kvmig-vmrec-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    ASSERT_EQ(kvmig({"site", "init", src_site()}).status, 0);
    ASSERT_EQ(kvmig({"site", "init", dst_site()}).status, 0);
  }
  void TearDown() override {
    if (!HasFailure() && !std::getenv("KVMIG_KEEP")) std::filesystem::remove_all(dir_);
    else std::fprintf(stderr, "kept %s\n", dir_.c_str());
  }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  std::string src_site() const { return path("src-site"); }
  std::string dst_site() const { return path("dst-site"); }

  // Runs the kvmig binary to completion.
  CmdRun kvmig(std::vector<std::string> args, std::chrono::seconds timeout = 60s) {
    static int n = 0;
    std::string tag = "cmd" + std::to_string(++n);
    args.insert(args.begin(), KVMIG_BINARY);
    return run_to_end(args, path(tag), timeout);
  }
  // `kvmig vm run --site SRC --uuid UUID` with the test guest; waits for its first pass.
  Child source(const std::string& tag, const std::string& uuid, const std::string& memory, const std::string& cmdline) {
    Child c = spawn({KVMIG_BINARY, "vm", "run", "--kernel", guest64_path(), "--memory", memory, "--cmdline", cmdline,
                     "--console", path(tag + ".console"), "--control", path(tag + ".ctl"), "--site", src_site(),
                     "--uuid", uuid, "--name", tag},
                    path(tag + ".vm.out"), path(tag + ".vm.err"));
    EXPECT_TRUE(wait_until([&] { return !guest_report(path(tag + ".console")).passes.empty() || c.poll(); }, 30s))
        << read_text(path(tag + ".vm.err"));
    return c;
  }
  Child receiver(const std::string& tag) {
    Child c = spawn({KVMIG_BINARY, "receive", "--listen", "unix:" + path(tag + ".mig"), "--console",
                     path(tag + ".dst.console"), "--control", path(tag + ".dst.ctl"), "--site", dst_site()},
                    path(tag + ".recv.out"), path(tag + ".recv.err"));
    EXPECT_TRUE(wait_until(
        [&] { return read_text(path(tag + ".recv.err")).find("listening on") != std::string::npos || c.poll(); }, 10s));
    return c;
  }
  std::vector<std::string> migrate_args(const std::string& tag, const std::string& id) {
    return {"migrate", path(tag + ".ctl"), "--to", "unix:" + path(tag + ".mig"), "--migration", id, "--json",
            "--max-downtime", "50"};
  }
  // status --json, as {uuid: verdict}.
  std::map<std::string, std::string> verdicts(const std::string& id, std::vector<std::string> vms = {},
                                              int want_status = 0) {
    std::vector<std::string> args{"status", "--site", dst_site(), "--source-site", src_site(), "--migration", id,
                                  "--json"};
    for (const auto& vm : vms) args.insert(args.end(), {"--vm", vm});
    CmdRun r = kvmig(args);
    EXPECT_EQ(r.status, want_status) << r.err;
    auto j = nlohmann::json::parse(r.out, nullptr, false);
    std::map<std::string, std::string> out;
    if (j.is_discarded() || !j.contains("vms")) {
      ADD_FAILURE() << "status printed no JSON: " << r.out << r.err;
      return out;
    }
    for (const auto& vm : j["vms"]) {
      EXPECT_EQ(vm["migration_id"], id);
      out[vm["vm_uuid"].get<std::string>()] = vm["verdict"].get<std::string>();
    }
    return out;
  }
  std::optional<host::Placeholder> registry_entry(const std::string& site, const std::string& uuid) {
    auto db = host::SiteDb::open(site, false);
    EXPECT_TRUE(db.ok());
    if (!db.ok()) return std::nullopt;
    host::MicroVmRegistry reg(**db);
    auto p = reg.find(uuid);
    EXPECT_TRUE(p.ok());
    return p.ok() ? *p : std::nullopt;
  }
  std::vector<std::string> record_kinds(const std::string& site, const std::string& id, const std::string& uuid) {
    auto db = host::SiteDb::open(site, false);
    EXPECT_TRUE(db.ok());
    if (!db.ok()) return {};
    host::SiteRecords records(**db);
    auto all = records.for_migration(id);
    EXPECT_TRUE(all.ok());
    std::vector<std::string> out;
    if (all.ok())
      for (const auto& r : *all)
        if (r.vm_uuid == uuid) out.emplace_back(host::record_kind_name(r.kind));
    return out;
  }
  bool guest_progresses(const std::string& console) {
    auto before = guest_report(console).passes.size();
    return wait_until([&] { return guest_report(console).passes.size() > before; }, 10s);
  }

  std::string dir_;
};

using Kinds = std::vector<std::string>;

TEST_F(MicroVmRecords, MigratedVmIsRecordedOnBothSitesAndReadsMigrated) {
  REQUIRE_GUEST();
  Child src = source("a", kVmA, "128M", "ws=16M pattern=seq rate=8 passes=0 report_ms=50");
  auto reg = registry_entry(src_site(), kVmA);
  ASSERT_TRUE(reg);
  EXPECT_EQ(reg->state, host::VmEntryState::running);
  EXPECT_EQ(reg->name, "a");
  EXPECT_EQ(reg->control, path("a.ctl"));

  Child dst = receiver("a");
  CmdRun mig = kvmig(migrate_args("a", "m1"));
  ASSERT_EQ(mig.status, 0) << mig.err << read_text(path("a.recv.err"));
  auto report = nlohmann::json::parse(mig.out);
  EXPECT_EQ(report["migration_id"], "m1");
  EXPECT_EQ(report["vm_uuid"], kVmA) << "the UUID given to vm run travels in HELLO";
  EXPECT_EQ(src.wait(10s), 0) << "the source VM ends once the destination runs it";
  EXPECT_TRUE(guest_progresses(path("a.dst.console")));

  EXPECT_EQ(record_kinds(dst_site(), "m1", kVmA), (Kinds{"migration_started", "placeholder_created", "migration_completed"}));
  EXPECT_EQ(record_kinds(src_site(), "m1", kVmA), (Kinds{"source_released"}));
  EXPECT_FALSE(registry_entry(src_site(), kVmA)) << "a released VM leaves the source registry";
  auto arrived = registry_entry(dst_site(), kVmA);
  ASSERT_TRUE(arrived);
  EXPECT_EQ(arrived->state, host::VmEntryState::completed);
  EXPECT_EQ(arrived->migration_id, "m1");
  EXPECT_EQ(arrived->name, "a") << "HELLO carries the VM's name to the placeholder";
  EXPECT_EQ(arrived->control, path("a.dst.ctl")) << "recovery and the next migration reach it there";

  EXPECT_EQ(verdicts("m1"), (std::map<std::string, std::string>{{kVmA, "migrated"}}));
  CmdRun again = kvmig({"recover", "--site", dst_site(), "--source-site", src_site(), "--migration", "m1"});
  EXPECT_EQ(again.status, 0) << again.out << again.err;
  EXPECT_TRUE(guest_progresses(path("a.dst.console"))) << "recovering a migrated VM leaves the arrived copy alone";

  (void)host::control_request(path("a.dst.ctl"), {{"cmd", "stop"}, {"status", 0}});
  EXPECT_EQ(dst.wait(20s), 0) << read_text(path("a.recv.err"));
  EXPECT_TRUE(registry_entry(dst_site(), kVmA)) << "the completed placeholder outlives the VM: it is the evidence";
}

TEST_F(MicroVmRecords, DestinationKilledInPrecopyReadsNotMigratedAndRecoverFences) {
  REQUIRE_GUEST();
  // 256 MiB of fresh pages: round 1 lasts long enough to catch the session in pre-copy.
  Child src = source("k", kVmA, "256M", "ws=64M pattern=random passes=0 report_ms=50");
  Child dst = receiver("k");
  Child mig = spawn({KVMIG_BINARY, "migrate", path("k.ctl"), "--to", "unix:" + path("k.mig"), "--migration", "m2",
                     "--json"},
                    path("k.mig.out"), path("k.mig.err"));
  ASSERT_TRUE(wait_until(
      [&] {
        auto p = host::control_request(path("k.ctl"), {{"cmd", "migrate-progress"}});
        return p.ok() && p->value("phase", std::string()) == "precopy";
      },
      20s));
  dst.kill9();
  EXPECT_EQ(mig.wait(30s), 1) << read_text(path("k.mig.err"));

  // The destination died between its started record and completion: an untagged placeholder.
  EXPECT_EQ(record_kinds(dst_site(), "m2", kVmA), (Kinds{"migration_started", "placeholder_created"}));
  auto ph = registry_entry(dst_site(), kVmA);
  ASSERT_TRUE(ph);
  EXPECT_EQ(ph->state, host::VmEntryState::placeholder);
  EXPECT_EQ(verdicts("m2"), (std::map<std::string, std::string>{{kVmA, "not-migrated"}}));

  CmdRun rec = kvmig({"recover", "--site", dst_site(), "--source-site", src_site(), "--migration", "m2", "--json"});
  EXPECT_EQ(rec.status, 0) << rec.out << rec.err;
  EXPECT_FALSE(registry_entry(dst_site(), kVmA)) << "recover removes the placeholder";
  EXPECT_EQ(record_kinds(dst_site(), "m2", kVmA), (Kinds{"migration_started", "placeholder_created", "aborted"}));
  auto still = registry_entry(src_site(), kVmA);
  ASSERT_TRUE(still) << "the source VM stays registered: it is the real one";
  EXPECT_EQ(still->state, host::VmEntryState::running);
  auto stats = host::control_request(path("k.ctl"), {{"cmd", "stats"}});
  ASSERT_TRUE(stats.ok()) << stats.error().message;
  EXPECT_FALSE(stats->value("paused", true));
  EXPECT_TRUE(guest_progresses(path("k.console"))) << "the source guest runs on";
  EXPECT_FALSE(src.poll());
  EXPECT_EQ(verdicts("m2"), (std::map<std::string, std::string>{{kVmA, "not-migrated"}}));
}

// Three VMs under one migration id; the third's destination never listens, so it never
// reaches the destination's records: status must still name it (given by --vm), per VM.
TEST_F(MicroVmRecords, GroupSharesOneMigrationIdWithAVerdictPerVm) {
  REQUIRE_GUEST();
  const std::string cmdline = "ws=8M pattern=seq rate=8 passes=0 report_ms=50";
  Child a = source("ga", kVmA, "64M", cmdline);
  Child b = source("gb", kVmB, "64M", cmdline);
  Child c = source("gc", kVmC, "64M", cmdline);
  Child ra = receiver("ga");
  Child rb = receiver("gb");
  CmdRun ma = kvmig(migrate_args("ga", "g1"));
  CmdRun mb = kvmig(migrate_args("gb", "g1"));
  CmdRun mc = kvmig(migrate_args("gc", "g1"));
  EXPECT_EQ(ma.status, 0) << ma.err;
  EXPECT_EQ(mb.status, 0) << mb.err;
  EXPECT_EQ(mc.status, 1) << mc.err;
  EXPECT_EQ(nlohmann::json::parse(mc.out, nullptr, false).value("migration_id", ""), "g1");

  EXPECT_EQ(verdicts("g1", {kVmC}),
            (std::map<std::string, std::string>{{kVmA, "migrated"}, {kVmB, "migrated"}, {kVmC, "not-migrated"}}));
  // Without --vm the destination knows only the two that reached it.
  EXPECT_EQ(verdicts("g1").size(), 2u);
  EXPECT_TRUE(guest_progresses(path("gc.console"))) << "the VM that did not move runs on at the source";
  EXPECT_TRUE(guest_progresses(path("ga.dst.console")));
  EXPECT_TRUE(guest_progresses(path("gb.dst.console")));
}

// `vm restore --site` registers the restored VM as `vm run --site` does: with its UUID and
// control socket, refused while another copy of that UUID runs there, and migrating on under
// that UUID with its records.
TEST_F(MicroVmRecords, RestoredVmIsRegisteredAndMigratesUnderItsUuid) {
  REQUIRE_GUEST();
  Child orig = spawn({KVMIG_BINARY, "vm", "run", "--kernel", guest64_path(), "--memory", "64M", "--cmdline",
                      "ws=8M pattern=seq rate=8 passes=0 report_ms=50", "--console", path("o.console"), "--control",
                      path("o.ctl")},
                     path("o.out"), path("o.err"));
  ASSERT_TRUE(wait_until([&] { return !guest_report(path("o.console")).passes.empty() || orig.poll(); }, 30s));
  CmdRun save = kvmig({"vm", "save", "--control", path("o.ctl"), "--output", path("o.state")});
  ASSERT_EQ(save.status, 0) << save.err;
  EXPECT_EQ(orig.wait(10s), 0);

  auto restore = [&](const std::string& tag) {
    return spawn({KVMIG_BINARY, "vm", "restore", path("o.state"), "--console", path(tag + ".console"), "--control",
                  path(tag + ".ctl"), "--site", src_site(), "--uuid", kVmA, "--name", "restored"},
                 path(tag + ".vm.out"), path(tag + ".vm.err"));
  };
  Child r = restore("r");
  ASSERT_TRUE(wait_until([&] { return guest_report(path("r.console")).passes.size() > 1 || r.poll(); }, 30s))
      << read_text(path("r.vm.err"));
  auto reg = registry_entry(src_site(), kVmA);
  ASSERT_TRUE(reg);
  EXPECT_EQ(reg->state, host::VmEntryState::running);
  EXPECT_EQ(reg->name, "restored");
  EXPECT_EQ(reg->control, path("r.ctl"));

  Child twin = restore("twin");
  EXPECT_EQ(twin.wait(30s), 125) << "a second copy of a running UUID is refused";
  EXPECT_NE(read_text(path("twin.vm.err")).find("already runs"), std::string::npos) << read_text(path("twin.vm.err"));
  EXPECT_EQ(registry_entry(src_site(), kVmA)->control, path("r.ctl")) << "the refused twin leaves the row alone";

  Child dst = receiver("r");
  CmdRun mig = kvmig(migrate_args("r", "m-restored"));
  ASSERT_EQ(mig.status, 0) << mig.err << read_text(path("r.recv.err"));
  EXPECT_EQ(nlohmann::json::parse(mig.out)["vm_uuid"], kVmA);
  EXPECT_EQ(r.wait(10s), 0);
  EXPECT_EQ(record_kinds(src_site(), "m-restored", kVmA), (Kinds{"source_released"}));
  EXPECT_FALSE(registry_entry(src_site(), kVmA));
  EXPECT_EQ(verdicts("m-restored"), (std::map<std::string, std::string>{{kVmA, "migrated"}}));
  EXPECT_TRUE(guest_progresses(path("r.dst.console")));
}

TEST_F(MicroVmRecords, BadSiteOrUuidIsRefusedBeforeAnythingRuns) {
  CmdRun missing = kvmig({"receive", "--listen", "unix:" + path("x.mig"), "--site", path("no-such-site")});
  EXPECT_EQ(missing.status, 125);
  EXPECT_NE(missing.err.find("site init"), std::string::npos) << missing.err;
  CmdRun bad_uuid = kvmig({"vm", "run", "--kernel", guest64_path(), "--uuid", "not-a-uuid", "--site", src_site()});
  EXPECT_EQ(bad_uuid.status, 125);
  EXPECT_NE(bad_uuid.err.find("--uuid"), std::string::npos) << bad_uuid.err;
  CmdRun bad_id = kvmig({"migrate", path("none.ctl"), "--to", "unix:" + path("x.mig"), "--migration", "no spaces"});
  EXPECT_EQ(bad_id.status, 125);
  EXPECT_NE(bad_id.err.find("--migration"), std::string::npos) << bad_id.err;
  CmdRun restore_bad = kvmig({"vm", "restore", path("none.state"), "--site", src_site(), "--uuid", "nope"});
  EXPECT_EQ(restore_bad.status, 125);
  EXPECT_NE(restore_bad.err.find("--uuid"), std::string::npos) << restore_bad.err;
  CmdRun restore_nosite = kvmig({"vm", "restore", path("none.state"), "--site", path("no-such-site")});
  EXPECT_EQ(restore_nosite.status, 125);
  EXPECT_NE(restore_nosite.err.find("site init"), std::string::npos) << restore_nosite.err;
}

}  // namespace
}  // namespace kvmig::testing
