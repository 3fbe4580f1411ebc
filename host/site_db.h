// SiteDb: a site's embedded SQLite database (DIR/site.db), the one place where the records
// that decide where a VM is are kept. WAL so that `kvmig status` reads while a migration
// writes; synchronous=FULL so that a committed record survives a crash of the writer or of
// the machine (docs/control-plane.md has the schema and why each choice was made).
// The schema is versioned with PRAGMA user_version and migrated forward step by step when
// opened; a database from a newer kvmig is refused rather than misread.
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "base/result.h"

namespace kvmig::host {

// A prepared statement, reset and rebound for each use. Owned by its SiteDb's cache.
class Statement {
 public:
  Statement(sqlite3* db, sqlite3_stmt* stmt) : db_(db), stmt_(stmt) {}
  ~Statement() { sqlite3_finalize(stmt_); }
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;

  Statement& bind(int index, std::string_view text);
  Statement& bind(int index, int64_t value);
  Statement& bind_null(int index);
  // true: a row is ready; false: done. Errors carry the statement's SQL.
  Result<bool> step();
  // Runs to completion (for INSERT/UPDATE/DELETE); returns the rows changed.
  Result<int> run();
  std::string text(int column) const;
  int64_t integer(int column) const;
  bool is_null(int column) const;
  void reset();

 private:
  sqlite3* db_;
  sqlite3_stmt* stmt_;
  Error bind_error_;
  bool bind_failed_ = false;
};

// How hard a commit waits for the disk. `full` for every record that decides where a VM is;
// `relaxed` (WAL + synchronous=NORMAL: consistent, may lose the last commits on power loss)
// only for bulk loads that can be redone, such as benchmark seeding.
enum class Durability { full, relaxed };

class SiteDb {
 public:
  static constexpr int kSchemaVersion = 2;
  static constexpr const char* kFileName = "site.db";

  // Opens DIR/site.db, creating DIR and the database when `create` (a site that does not
  // exist yet is an error otherwise: a typo in --site must not read as "no records").
  static Result<std::unique_ptr<SiteDb>> open(const std::string& dir, bool create);
  ~SiteDb();
  SiteDb(const SiteDb&) = delete;
  SiteDb& operator=(const SiteDb&) = delete;

  const std::string& dir() const { return dir_; }
  // This site's id (a UUID made when the site was created).
  const std::string& site_id() const { return site_id_; }
  int schema_version() const { return version_; }

  Result<void> exec(const char* sql);
  // The statement for `sql`, prepared once per connection and reset before it is handed out.
  Result<Statement*> prepare(const char* sql);
  bool in_transaction() const { return sqlite3_get_autocommit(db_) == 0; }
  Error error(const std::string& what) const;

 private:
  SiteDb() = default;
  Result<void> migrate();

  sqlite3* db_ = nullptr;
  std::string dir_;
  std::string site_id_;
  int version_ = 0;
  std::map<std::string, std::unique_ptr<Statement>> statements_;
};

// A write transaction: BEGIN IMMEDIATE (takes the write lock at once, so two writers never
// deadlock on an upgrade), committed by commit(), rolled back when destroyed uncommitted.
// Inside another transaction it joins that one: the outer commit decides.
class Transaction {
 public:
  explicit Transaction(SiteDb& db, Durability durability = Durability::full);
  ~Transaction();
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  // The error of BEGIN, if any: check before writing.
  Result<void> begun() const;
  Result<void> commit();

 private:
  SiteDb& db_;
  Durability durability_;
  bool owner_ = false;
  bool done_ = false;
  Result<void> begin_;
};

}  // namespace kvmig::host
