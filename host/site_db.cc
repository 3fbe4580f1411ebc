#include "host/site_db.h"

#include <sys/stat.h>
#include <uuid/uuid.h>

#include <cerrno>
#include <filesystem>
#include <vector>

namespace kvmig::host {

namespace {

// Schema steps: kMigrations[i] brings a database from user_version i to i + 1. Append only;
// never edit a step that has shipped (docs/control-plane.md describes the tables).
const std::vector<const char*> kMigrations = {
    // 0 -> 1: records, the micro-VM registry, the site's own id.
    R"sql(
      CREATE TABLE site_meta(
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL);
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
    )sql",
    // 1 -> 2: what libvirt did with the domains kvmig moves, as the libvirt hook saw it
    // (host/libvirt_hook.h). IF NOT EXISTS because kvmig at version 1 made this very table
    // on the hook's first use, outside the versioning: such a site keeps its rows.
    R"sql(
      CREATE TABLE IF NOT EXISTS libvirt_events(
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,
        migration_id TEXT NOT NULL CHECK(length(migration_id) BETWEEN 1 AND 64),
        vm_uuid      TEXT NOT NULL CHECK(length(vm_uuid) = 36),
        domain       TEXT NOT NULL,
        op           TEXT NOT NULL,
        subop        TEXT NOT NULL,
        at_ms        INTEGER NOT NULL);
      CREATE INDEX IF NOT EXISTS libvirt_events_by_migration ON libvirt_events(migration_id);
    )sql",
};

std::string new_uuid() {
  uuid_t u;
  uuid_generate(u);
  char text[37];
  uuid_unparse_lower(u, text);
  return text;
}

}  // namespace

Statement& Statement::bind(int index, std::string_view text) {
  // An empty string_view may have no data pointer, which SQLite would store as NULL.
  const char* data = text.data() ? text.data() : "";
  int rc = sqlite3_bind_text(stmt_, index, data, static_cast<int>(text.size()), SQLITE_TRANSIENT);
  if (rc != SQLITE_OK && !bind_failed_) {
    bind_failed_ = true;
    bind_error_ = Error{std::string("sqlite bind ") + std::to_string(index) + ": " + sqlite3_errstr(rc)};
  }
  return *this;
}

Statement& Statement::bind(int index, int64_t value) {
  int rc = sqlite3_bind_int64(stmt_, index, value);
  if (rc != SQLITE_OK && !bind_failed_) {
    bind_failed_ = true;
    bind_error_ = Error{std::string("sqlite bind ") + std::to_string(index) + ": " + sqlite3_errstr(rc)};
  }
  return *this;
}

Statement& Statement::bind_null(int index) {
  sqlite3_bind_null(stmt_, index);
  return *this;
}

Result<bool> Statement::step() {
  if (bind_failed_) return bind_error_;
  int rc = sqlite3_step(stmt_);
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  std::string sql = sqlite3_sql(stmt_);
  if (sql.size() > 60) sql = sql.substr(0, 60) + "...";
  return Error{"sqlite: " + std::string(sqlite3_errmsg(db_)) + " (in: " + sql + ")"};
}

Result<int> Statement::run() {
  for (;;) {
    KVMIG_ASSIGN(bool row, step());
    if (!row) break;
  }
  return sqlite3_changes(db_);
}

std::string Statement::text(int column) const {
  const unsigned char* t = sqlite3_column_text(stmt_, column);
  return t ? std::string(reinterpret_cast<const char*>(t), sqlite3_column_bytes(stmt_, column)) : std::string();
}

int64_t Statement::integer(int column) const { return sqlite3_column_int64(stmt_, column); }
bool Statement::is_null(int column) const { return sqlite3_column_type(stmt_, column) == SQLITE_NULL; }

void Statement::reset() {
  sqlite3_reset(stmt_);
  sqlite3_clear_bindings(stmt_);
  bind_failed_ = false;
}

Result<std::unique_ptr<SiteDb>> SiteDb::open(const std::string& dir, bool create) {
  if (dir.empty()) return Error{"site directory: empty path"};
  std::error_code ec;
  if (create) {
    std::filesystem::create_directories(dir, ec);
    if (ec) return Error{"site " + dir + ": cannot create: " + ec.message(), ec.value()};
  }
  std::string path = dir + "/" + kFileName;
  struct stat st;
  if (!create && ::stat(path.c_str(), &st) != 0)
    return Error::from_errno("site " + dir + ": no " + kFileName + " (not a kvmig site?)");

  std::unique_ptr<SiteDb> db(new SiteDb());
  db->dir_ = dir;
  int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_FULLMUTEX | (create ? SQLITE_OPEN_CREATE : 0);
  int rc = sqlite3_open_v2(path.c_str(), &db->db_, flags, nullptr);
  if (rc != SQLITE_OK)
    return Error{"site " + dir + ": opening " + path + ": " + (db->db_ ? sqlite3_errmsg(db->db_) : sqlite3_errstr(rc))};
  // A writer (the destination's session) and `kvmig recover` may meet on the lock: wait.
  sqlite3_busy_timeout(db->db_, 10000);
  KVMIG_TRY(db->exec("PRAGMA journal_mode=WAL"));
  KVMIG_TRY(db->exec("PRAGMA synchronous=FULL"));
  KVMIG_TRY(db->exec("PRAGMA foreign_keys=ON"));
  if (auto r = db->migrate(); !r.ok()) return std::move(r.error().prefix("site " + dir));
  KVMIG_ASSIGN(Statement * s, db->prepare("SELECT value FROM site_meta WHERE key = 'site_id'"));
  KVMIG_ASSIGN(bool row, s->step());
  if (!row) return Error{"site " + dir + ": site_meta has no site_id"};
  db->site_id_ = s->text(0);
  s->reset();
  return db;
}

SiteDb::~SiteDb() {
  statements_.clear();
  if (db_) sqlite3_close(db_);
}

Result<void> SiteDb::exec(const char* sql) {
  char* msg = nullptr;
  int rc = sqlite3_exec(db_, sql, nullptr, nullptr, &msg);
  if (rc == SQLITE_OK) return ok();
  std::string text = msg ? msg : sqlite3_errstr(rc);
  sqlite3_free(msg);
  std::string head = sql;
  if (head.size() > 60) head = head.substr(0, 60) + "...";
  return Error{"sqlite: " + text + " (in: " + head + ")"};
}

Result<Statement*> SiteDb::prepare(const char* sql) {
  auto it = statements_.find(sql);
  if (it != statements_.end()) {
    it->second->reset();
    return it->second.get();
  }
  sqlite3_stmt* stmt = nullptr;
  int rc = sqlite3_prepare_v3(db_, sql, -1, SQLITE_PREPARE_PERSISTENT, &stmt, nullptr);
  if (rc != SQLITE_OK) return error(std::string("preparing ") + sql);
  auto owned = std::make_unique<Statement>(db_, stmt);
  Statement* raw = owned.get();
  statements_.emplace(sql, std::move(owned));
  return raw;
}

Error SiteDb::error(const std::string& what) const { return Error{"sqlite: " + what + ": " + sqlite3_errmsg(db_)}; }

Result<void> SiteDb::migrate() {
  Transaction tx(*this);
  KVMIG_TRY(tx.begun());
  KVMIG_ASSIGN(Statement * v, prepare("PRAGMA user_version"));
  KVMIG_ASSIGN(bool row, v->step());
  int version = row ? static_cast<int>(v->integer(0)) : 0;
  v->reset();
  if (version > kSchemaVersion)
    return Error{"schema version " + std::to_string(version) + " is newer than this kvmig's (" +
                 std::to_string(kSchemaVersion) + "): upgrade kvmig"};
  for (int step = version; step < kSchemaVersion; ++step) {
    if (auto r = exec(kMigrations[step]); !r.ok())
      return std::move(r.error().prefix("schema step " + std::to_string(step) + " -> " + std::to_string(step + 1)));
    if (step == 0) {
      KVMIG_ASSIGN(Statement * s, prepare("INSERT INTO site_meta(key, value) VALUES ('site_id', ?1)"));
      KVMIG_TRY(s->bind(1, new_uuid()).run());
    }
  }
  // PRAGMA takes no parameters; the value is our own integer.
  std::string set = "PRAGMA user_version = " + std::to_string(kSchemaVersion);
  if (version != kSchemaVersion) KVMIG_TRY(exec(set.c_str()));
  KVMIG_TRY(tx.commit());
  version_ = kSchemaVersion;
  return ok();
}

Transaction::Transaction(SiteDb& db, Durability durability) : db_(db), durability_(durability) {
  if (db_.in_transaction()) return;  // joins the outer transaction
  owner_ = true;
  if (durability_ == Durability::relaxed) (void)db_.exec("PRAGMA synchronous=NORMAL");
  begin_ = db_.exec("BEGIN IMMEDIATE");
  if (!begin_.ok()) done_ = true;
}

Transaction::~Transaction() {
  if (owner_ && !done_) (void)db_.exec("ROLLBACK");
  if (owner_ && durability_ == Durability::relaxed) (void)db_.exec("PRAGMA synchronous=FULL");
}

Result<void> Transaction::begun() const { return begin_; }

Result<void> Transaction::commit() {
  if (!owner_) return ok();
  if (done_) return begin_;  // committed already (ok), or BEGIN failed (its error)
  auto r = db_.exec("COMMIT");
  if (!r.ok()) return r;
  done_ = true;
  return ok();
}

}  // namespace kvmig::host
