// host/site_db schema steps on real SQLite files made by an older kvmig: a version-1 site
// (as kvmig 1 left it, with or without the libvirt hook's table made outside the versioning)
// opens at the current version with every row kept; a step that fails changes nothing.
#include "host/site_db.h"

#include <sqlite3.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "host/libvirt_hook.h"
#include "host/site_records.h"

namespace {

using namespace kvmig::host;
namespace fs = std::filesystem;

// Schema version 1 exactly as it shipped (host/site_db.cc, step 0 -> 1): a frozen copy, so
// that a change to the shipped step shows up here as a file kvmig can no longer open.
constexpr const char* kVersion1 = R"sql(
  CREATE TABLE site_meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
  CREATE TABLE records(
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    migration_id TEXT NOT NULL CHECK(length(migration_id) BETWEEN 1 AND 64),
    vm_uuid      TEXT NOT NULL CHECK(length(vm_uuid) = 36),
    kind         TEXT NOT NULL CHECK(kind IN ('migration_started', 'placeholder_created',
                      'migration_completed', 'aborted', 'source_released')),
    at_ms        INTEGER NOT NULL,
    detail       TEXT NOT NULL DEFAULT '');
  CREATE INDEX records_by_migration ON records(migration_id, vm_uuid);
  CREATE INDEX records_by_vm ON records(vm_uuid);
  CREATE TABLE vms(
    uuid         TEXT PRIMARY KEY CHECK(length(uuid) = 36),
    name         TEXT NOT NULL,
    state        TEXT NOT NULL CHECK(state IN ('placeholder', 'completed', 'running')),
    migration_id TEXT,
    control      TEXT NOT NULL DEFAULT '',
    created_ms   INTEGER NOT NULL,
    completed_ms INTEGER);
  INSERT INTO site_meta VALUES ('site_id', '0f0e0d0c-0b0a-4908-8706-050403020100');
  INSERT INTO records(migration_id, vm_uuid, kind, at_ms)
    VALUES ('m-old', '6b1c4a8e-3f5d-4e2a-9c7b-1d2e3f4a5b61', 'migration_started', 11);
  PRAGMA user_version = 1;
)sql";

// The table the version-1 hook made on first use (IF NOT EXISTS, outside the versioning).
constexpr const char* kVersion1HookTable = R"sql(
  CREATE TABLE IF NOT EXISTS libvirt_events(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    migration_id TEXT NOT NULL CHECK(length(migration_id) BETWEEN 1 AND 64),
    vm_uuid TEXT NOT NULL CHECK(length(vm_uuid) = 36),
    domain TEXT NOT NULL, op TEXT NOT NULL, subop TEXT NOT NULL, at_ms INTEGER NOT NULL);
  CREATE INDEX IF NOT EXISTS libvirt_events_by_migration ON libvirt_events(migration_id);
  INSERT INTO libvirt_events(migration_id, vm_uuid, domain, op, subop, at_ms)
    VALUES ('m-old', '6b1c4a8e-3f5d-4e2a-9c7b-1d2e3f4a5b61', 'vm1', 'prepare', 'begin', 12);
)sql";

class SiteDbTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = (fs::temp_directory_path() / ("kvmig-site-db-test-" + std::to_string(::getpid()) + "-" +
                                         ::testing::UnitTest::GetInstance()->current_test_info()->name()))
               .string();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes DIR/site.db with plain SQLite, as another kvmig would have.
  void make_file(const std::string& sql) {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open((dir_ + "/" + SiteDb::kFileName).c_str(), &db), SQLITE_OK);
    char* msg = nullptr;
    int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &msg);
    std::string err = msg ? msg : "";
    sqlite3_free(msg);
    sqlite3_close(db);
    ASSERT_EQ(rc, SQLITE_OK) << err;
  }

  std::string query(SiteDb& db, const char* sql) {
    auto s = db.prepare(sql);
    EXPECT_TRUE(s.ok()) << s.error().message;
    if (!s.ok()) return "(error)";
    auto row = (*s)->step();
    std::string out = row.ok() && *row ? (*s)->text(0) : "(none)";
    (*s)->reset();
    return out;
  }

  std::string dir_;
};

TEST_F(SiteDbTest, VersionOneSiteGainsTheHookTableAndKeepsItsRecords) {
  make_file(kVersion1);
  auto db = SiteDb::open(dir_, false);
  ASSERT_TRUE(db.ok()) << db.error().message;
  EXPECT_EQ((*db)->schema_version(), 2);
  EXPECT_EQ(query(**db, "PRAGMA user_version"), "2");
  EXPECT_EQ((*db)->site_id(), "0f0e0d0c-0b0a-4908-8706-050403020100") << "the site's id must survive the step";
  EXPECT_EQ(query(**db, "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'libvirt_events'"),
            "libvirt_events_by_migration");
  SiteRecords records(**db);
  auto old = records.has(RecordKind::migration_started, "m-old", "6b1c4a8e-3f5d-4e2a-9c7b-1d2e3f4a5b61");
  ASSERT_TRUE(old.ok()) << old.error().message;
  EXPECT_TRUE(*old);

  // The hook writes and reads its table with no set-up of its own.
  HookEvent e{"m-new", "6b1c4a8e-3f5d-4e2a-9c7b-1d2e3f4a5b62", "vm2", "started", "begin", 20};
  ASSERT_TRUE(record_hook_event(**db, e).ok());
  auto events = hook_events(**db, "m-new");
  ASSERT_TRUE(events.ok()) << events.error().message;
  ASSERT_EQ(events->size(), 1u);
  EXPECT_EQ((*events)[0].op, "started");
  EXPECT_EQ((*events)[0].at_ms, 20);
  // Its CHECKs are the schema's: a bad UUID is refused by the database itself.
  e.vm_uuid = "short";
  EXPECT_FALSE(record_hook_event(**db, e).ok());
}

TEST_F(SiteDbTest, VersionOneSiteWhoseHookMadeTheTableKeepsItsEvents) {
  make_file(std::string(kVersion1) + kVersion1HookTable);
  auto db = SiteDb::open(dir_, false);
  ASSERT_TRUE(db.ok()) << db.error().message;
  EXPECT_EQ((*db)->schema_version(), 2);
  auto events = hook_events(**db, "m-old");
  ASSERT_TRUE(events.ok()) << events.error().message;
  ASSERT_EQ(events->size(), 1u);
  EXPECT_EQ((*events)[0].op, "prepare");
  EXPECT_EQ((*events)[0].at_ms, 12);
  db->reset();
  // Opening again applies nothing.
  auto again = SiteDb::open(dir_, false);
  ASSERT_TRUE(again.ok()) << again.error().message;
  EXPECT_EQ(hook_events(**again, "")->size(), 1u);
}

TEST_F(SiteDbTest, FailedStepLeavesTheFileAtItsVersion) {
  // A table of that name but another shape: step 2 cannot index it, so nothing changes.
  make_file(std::string(kVersion1) + "CREATE TABLE libvirt_events(x INTEGER);");
  auto db = SiteDb::open(dir_, false);
  ASSERT_FALSE(db.ok());
  EXPECT_NE(db.error().message.find("schema step 1 -> 2"), std::string::npos) << db.error().message;
  sqlite3* raw = nullptr;
  ASSERT_EQ(sqlite3_open((dir_ + "/" + SiteDb::kFileName).c_str(), &raw), SQLITE_OK);
  sqlite3_stmt* s = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(raw, "PRAGMA user_version", -1, &s, nullptr), SQLITE_OK);
  ASSERT_EQ(sqlite3_step(s), SQLITE_ROW);
  EXPECT_EQ(sqlite3_column_int(s, 0), 1);
  sqlite3_finalize(s);
  sqlite3_close(raw);
}

TEST_F(SiteDbTest, NewSiteIsMadeAtTheCurrentVersionWithTheHookTable) {
  auto db = SiteDb::open(dir_ + "/new", true);
  ASSERT_TRUE(db.ok()) << db.error().message;
  EXPECT_EQ((*db)->schema_version(), SiteDb::kSchemaVersion);
  auto events = hook_events(**db, "");
  ASSERT_TRUE(events.ok()) << events.error().message;
  EXPECT_TRUE(events->empty());
}

}  // namespace
