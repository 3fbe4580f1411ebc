// Site records on real SQLite files: schema, durability across kill -9 of the writer, the
// recorder's steps, fencing between a late destination and `kvmig recover`, and recovery
// acting on a source VM through a real control socket.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <string>

#include "host/control_server.h"
#include "host/migration_recorder.h"
#include "host/placeholder_registry.h"
#include "host/recovery.h"
#include "host/site_db.h"
#include "host/site_records.h"
#include "test_util.h"

namespace kvmig::host {
namespace {

const std::string kVm1 = "6f1e8a52-1111-4c2b-9d3e-0123456789ab";
const std::string kVm2 = "6f1e8a52-2222-4c2b-9d3e-0123456789ab";
const std::string kVm3 = "6f1e8a52-3333-4c2b-9d3e-0123456789ab";

class SiteTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = test::make_temp_dir("kvmig-site");
    ASSERT_FALSE(root_.empty());
  }
  void TearDown() override { std::filesystem::remove_all(root_); }
  std::unique_ptr<SiteDb> open(const std::string& name, bool create = true) {
    auto db = SiteDb::open(root_ + "/" + name, create);
    EXPECT_TRUE(db.ok()) << db.error().message;
    return db.ok() ? std::move(*db) : nullptr;
  }
  std::string pragma(SiteDb& db, const char* sql) {
    auto s = db.prepare(sql);
    EXPECT_TRUE(s.ok());
    auto row = (*s)->step();
    EXPECT_TRUE(row.ok() && *row);
    std::string v = (*s)->text(0);
    (*s)->reset();
    return v;
  }
  std::string root_;
};

TEST_F(SiteTest, CreatesVersionedWalSchemaWithDurableCommits) {
  auto db = open("a");
  ASSERT_TRUE(db);
  EXPECT_EQ(db->schema_version(), SiteDb::kSchemaVersion);
  EXPECT_EQ(pragma(*db, "PRAGMA journal_mode"), "wal");
  EXPECT_EQ(pragma(*db, "PRAGMA synchronous"), "2");  // FULL
  EXPECT_EQ(pragma(*db, "PRAGMA user_version"), std::to_string(SiteDb::kSchemaVersion));
  std::string id = db->site_id();
  EXPECT_TRUE(canonical_uuid(id).ok()) << id;
  db.reset();
  auto again = open("a", false);
  ASSERT_TRUE(again);
  EXPECT_EQ(again->site_id(), id);
}

TEST_F(SiteTest, RefusesMissingSiteAndNewerSchema) {
  auto missing = SiteDb::open(root_ + "/nope", false);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.error().message.find("no site.db"), std::string::npos) << missing.error().message;

  auto db = open("b");
  ASSERT_TRUE(db->exec("PRAGMA user_version = 99").ok());
  db.reset();
  auto newer = SiteDb::open(root_ + "/b", false);
  ASSERT_FALSE(newer.ok());
  EXPECT_NE(newer.error().message.find("newer than this kvmig"), std::string::npos) << newer.error().message;
}

TEST_F(SiteTest, RecordsCheckInputAndReadBackInOrder) {
  auto db = open("r");
  SiteRecords rec(*db);
  EXPECT_FALSE(rec.append(RecordKind::migration_started, "m1", "not-a-uuid").ok());
  EXPECT_FALSE(rec.append(RecordKind::migration_started, "bad id", kVm1).ok());
  EXPECT_FALSE(rec.append(RecordKind::migration_started, std::string(65, 'a'), kVm1).ok());
  auto s1 = rec.append(RecordKind::migration_started, "m1", "6F1E8A52-1111-4C2B-9D3E-0123456789AB", "", 1000);
  ASSERT_TRUE(s1.ok()) << s1.error().message;
  ASSERT_TRUE(rec.append(RecordKind::migration_started, "m1", kVm2).ok());
  ASSERT_TRUE(rec.append(RecordKind::aborted, "m2", kVm3, "link cut").ok());
  auto all = rec.all();
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 3u);
  EXPECT_EQ((*all)[0].vm_uuid, kVm1);  // stored canonical, lower case
  EXPECT_EQ((*all)[0].at_ms, 1000);
  EXPECT_EQ((*all)[2].detail, "link cut");
  auto m1 = rec.for_migration("m1");
  ASSERT_TRUE(m1.ok());
  EXPECT_EQ(m1->size(), 2u);
  auto migs = rec.migrations();
  ASSERT_TRUE(migs.ok());
  EXPECT_EQ(*migs, (std::vector<std::string>{"m1", "m2"}));
  EXPECT_TRUE(*rec.has(RecordKind::migration_started, "m1", kVm2));
  EXPECT_FALSE(*rec.has(RecordKind::migration_completed, "m1", kVm2));
}

// The writer commits record after record and reports each committed seq on a pipe; the
// test kills it with SIGKILL mid-stream. Every seq it reported must be in the file.
TEST_F(SiteTest, CommittedRecordsSurviveKillOfTheWriter) {
  std::string dir = root_ + "/crash";
  ASSERT_TRUE(open("crash"));  // created by the parent, written by the child
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(fds[0]);
    auto db = SiteDb::open(dir, false);
    if (!db.ok()) ::_exit(2);
    SiteRecords rec(**db);
    for (int64_t i = 0;; ++i) {
      auto seq = rec.append(RecordKind::migration_started, "crash-" + std::to_string(i), kVm1);
      if (!seq.ok()) ::_exit(3);
      int64_t v = *seq;
      if (::write(fds[1], &v, sizeof v) != sizeof v) ::_exit(4);
    }
  }
  ::close(fds[1]);
  int64_t last = 0, v = 0;
  for (int n = 0; n < 50 && ::read(fds[0], &v, sizeof v) == sizeof v; ++n) last = v;
  ASSERT_EQ(::kill(child, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status)) << "writer ended on its own with " << status;
  while (::read(fds[0], &v, sizeof v) == sizeof v) last = v;  // reported before the kill
  ::close(fds[0]);
  ASSERT_GE(last, 50);

  auto db = SiteDb::open(dir, false);
  ASSERT_TRUE(db.ok()) << db.error().message;
  SiteRecords rec(**db);
  auto all = rec.all();
  ASSERT_TRUE(all.ok()) << all.error().message;
  ASSERT_GE(static_cast<int64_t>(all->size()), last);
  for (int64_t i = 0; i < last; ++i) {
    EXPECT_EQ((*all)[i].seq, i + 1);
    EXPECT_EQ((*all)[i].migration_id, "crash-" + std::to_string(i));
  }
}

TEST_F(SiteTest, PlaceholdersKeepOneVmPerUuid) {
  auto db = open("p");
  MicroVmRegistry reg(*db);
  ASSERT_TRUE(reg.create(kVm1, "web", "m1").ok());
  EXPECT_TRUE(reg.create(kVm1, "web", "m1").ok()) << "repeat of the same migration";
  auto clash = reg.create(kVm1, "web", "m2");
  ASSERT_FALSE(clash.ok());
  EXPECT_NE(clash.error().message.find("already here"), std::string::npos);
  ASSERT_TRUE(reg.register_running(kVm2, "db", "/run/x.sock").ok());
  EXPECT_FALSE(reg.create(kVm2, "db", "m1").ok()) << "a local VM is not a placeholder";

  EXPECT_FALSE(reg.mark_completed(kVm1, "m2").ok()) << "another migration's tag";
  ASSERT_TRUE(reg.mark_completed(kVm1, "m1").ok());
  EXPECT_TRUE(reg.mark_completed(kVm1, "m1").ok());
  auto removed = reg.remove(kVm1, "m1");
  ASSERT_FALSE(removed.ok()) << "a completed VM must not be removed";
  auto p = reg.find(kVm1);
  ASSERT_TRUE(p.ok() && *p);
  EXPECT_TRUE((*p)->completed());
  EXPECT_GT((*p)->completed_ms, 0);
  auto list = reg.list();
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(list->size(), 2u);
}

TEST_F(SiteTest, RecorderStepsGiveTheSeedsVerdicts) {
  auto db = open("dest");
  SiteRecords rec(*db);
  MicroVmRegistry reg(*db);
  MigrationRecorder dest(rec, reg, true);
  // A group of three: one completes, one aborts, one stops after started.
  for (const auto& vm : {kVm1, kVm2, kVm3}) ASSERT_TRUE(dest.started("g1", vm, "").ok());
  ASSERT_TRUE(dest.completed("g1", kVm1).ok());
  ASSERT_TRUE(dest.aborted("g1", kVm2, "disk full").ok());
  auto st = read_status(rec, reg, nullptr, "g1");
  ASSERT_TRUE(st.ok()) << st.error().message;
  ASSERT_EQ(st->size(), 3u);
  std::map<std::string, Verdict> by_vm;
  for (const auto& s : *st) by_vm[s.vm_uuid] = s.verdict;
  EXPECT_EQ(by_vm[kVm1], Verdict::migrated);
  EXPECT_EQ(by_vm[kVm2], Verdict::not_migrated);
  EXPECT_EQ(by_vm[kVm3], Verdict::not_migrated);
  auto p2 = reg.find(kVm2);
  ASSERT_TRUE(p2.ok());
  EXPECT_FALSE(*p2) << "an aborted placeholder is removed";
  EXPECT_FALSE(dest.started("g1", kVm2, "").ok()) << "an aborted migration cannot start again";
}

// Recovery (one connection) fences while the destination (another connection) is about to
// complete: whichever commits first wins, and the loser is refused.
TEST_F(SiteTest, FencedMigrationCannotCompleteLate) {
  auto dest_db = open("dest");
  auto recover_db = open("dest", false);
  SiteRecords rec_a(*dest_db), rec_b(*recover_db);
  MicroVmRegistry reg_a(*dest_db), reg_b(*recover_db);
  MigrationRecorder destination(rec_a, reg_a, true), recovery(rec_b, reg_b, true);
  ASSERT_TRUE(destination.started("m1", kVm1, "").ok());
  ASSERT_TRUE(recovery.aborted("m1", kVm1, "recovered").ok());
  auto late = destination.completed("m1", kVm1);
  ASSERT_FALSE(late.ok());
  EXPECT_NE(late.error().message.find("aborted"), std::string::npos) << late.error().message;

  ASSERT_TRUE(destination.started("m2", kVm2, "").ok());
  ASSERT_TRUE(destination.completed("m2", kVm2).ok());
  EXPECT_FALSE(recovery.aborted("m2", kVm2, "recovered").ok()) << "a completed VM is not fenced";
}

// A stand-in source VM: a real control socket answering stats/resume/stop as `kvmig vm run`.
class FakeSourceVm {
 public:
  explicit FakeSourceVm(const std::string& path, bool paused) : paused_(paused) {
    server_.register_command("stats", [this](const nlohmann::json&) -> Result<nlohmann::json> {
      return nlohmann::json{{"paused", paused_.load()}};
    });
    server_.register_command("resume", [this](const nlohmann::json&) -> Result<nlohmann::json> {
      paused_ = false;
      return nlohmann::json{{"paused", false}};
    });
    server_.register_command("stop", [this](const nlohmann::json&) -> Result<nlohmann::json> {
      stopped_ = true;
      return nlohmann::json{{"stopping", true}};
    });
    auto r = server_.start(path);
    EXPECT_TRUE(r.ok()) << r.error().message;
  }
  bool paused() const { return paused_; }
  bool stopped() const { return stopped_; }

 private:
  std::atomic<bool> paused_;
  std::atomic<bool> stopped_{false};
  ControlServer server_;
};

TEST_F(SiteTest, RecoverResumesNotMigratedAndDestroysMigrated) {
  auto dest_db = open("dest");
  auto src_db = open("src");
  SiteRecords dest_rec(*dest_db), src_rec(*src_db);
  MicroVmRegistry dest_reg(*dest_db), src_reg(*src_db);
  MigrationRecorder dest(dest_rec, dest_reg, true), src(src_rec, src_reg, true);
  MicroVmSource source(src_rec, src_reg);

  // Both VMs paused at the source after COMMIT; only vm1's completion reached the disk.
  FakeSourceVm vm1(root_ + "/vm1.sock", true), vm2(root_ + "/vm2.sock", true);
  ASSERT_TRUE(src_reg.register_running(kVm1, "one", root_ + "/vm1.sock").ok());
  ASSERT_TRUE(src_reg.register_running(kVm2, "two", root_ + "/vm2.sock").ok());
  ASSERT_TRUE(dest.started("g", kVm1, "one").ok());
  ASSERT_TRUE(dest.started("g", kVm2, "two").ok());
  ASSERT_TRUE(dest.completed("g", kVm1).ok());

  auto st = read_status(dest_rec, dest_reg, &source, "g");
  ASSERT_TRUE(st.ok()) << st.error().message;
  ASSERT_EQ(st->size(), 2u);
  for (const VmStatus& s : *st) {
    EXPECT_EQ(s.source.state, SourceState::paused) << s.source.detail;
    RecoveryOutcome o = recover_vm(s, dest, source, src);
    EXPECT_TRUE(o.problem.empty()) << o.problem;
  }
  EXPECT_TRUE(vm1.stopped());
  EXPECT_FALSE(vm2.stopped());
  EXPECT_FALSE(vm2.paused()) << "not migrated: the source runs on";
  EXPECT_TRUE(*src_rec.has(RecordKind::source_released, "g", kVm1));
  EXPECT_FALSE(*src_reg.find(kVm1)) << "released VM left the source registry";
  EXPECT_TRUE(*dest_rec.has(RecordKind::aborted, "g", kVm2));
  EXPECT_FALSE(*dest_reg.find(kVm2));

  // A second pass finds everything true already and changes nothing.
  auto again = read_status(dest_rec, dest_reg, &source, "g");
  ASSERT_TRUE(again.ok());
  for (const VmStatus& s : *again) {
    RecoveryOutcome o = recover_vm(s, dest, source, src);
    EXPECT_TRUE(o.problem.empty()) << s.vm_uuid << ": " << o.problem;
  }
}

TEST_F(SiteTest, InDoubtIsNeverActedOn) {
  auto dest_db = open("dest");
  auto src_db = open("src");
  SiteRecords dest_rec(*dest_db), src_rec(*src_db);
  MicroVmRegistry dest_reg(*dest_db), src_reg(*src_db);
  MigrationRecorder dest(dest_rec, dest_reg, true), src(src_rec, src_reg, true);
  MicroVmSource source(src_rec, src_reg);
  FakeSourceVm vm(root_ + "/vm.sock", true);
  ASSERT_TRUE(src_reg.register_running(kVm1, "one", root_ + "/vm.sock").ok());
  // Records say completed, but no placeholder: contradictory, so in doubt.
  ASSERT_TRUE(dest_rec.append(RecordKind::migration_started, "g", kVm1).ok());
  ASSERT_TRUE(dest_rec.append(RecordKind::migration_completed, "g", kVm1).ok());
  auto st = read_status(dest_rec, dest_reg, &source, "g");
  ASSERT_TRUE(st.ok());
  ASSERT_EQ(st->size(), 1u);
  EXPECT_EQ((*st)[0].verdict, Verdict::in_doubt);
  RecoveryOutcome o = recover_vm((*st)[0], dest, source, src);
  EXPECT_FALSE(o.problem.empty());
  EXPECT_TRUE(o.done.empty());
  EXPECT_TRUE(vm.paused());
  EXPECT_FALSE(vm.stopped());
}

TEST_F(SiteTest, GoneSourceIsReportedNotResumed) {
  auto dest_db = open("dest");
  auto src_db = open("src");
  SiteRecords dest_rec(*dest_db), src_rec(*src_db);
  MicroVmRegistry dest_reg(*dest_db), src_reg(*src_db);
  MicroVmSource source(src_rec, src_reg);
  ASSERT_TRUE(src_reg.register_running(kVm1, "one", root_ + "/dead.sock").ok());
  auto f = source.inspect("g", kVm1);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->state, SourceState::gone) << f->detail;
}

}  // namespace
}  // namespace kvmig::host
