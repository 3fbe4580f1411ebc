#include "host/site_records.h"

#include <uuid/uuid.h>

#include <cctype>
#include <chrono>

namespace kvmig::host {

namespace {

constexpr std::array<std::pair<RecordKind, std::string_view>, 5> kKindNames = {{
    {RecordKind::migration_started, "migration_started"},
    {RecordKind::placeholder_created, "placeholder_created"},
    {RecordKind::migration_completed, "migration_completed"},
    {RecordKind::aborted, "aborted"},
    {RecordKind::source_released, "source_released"},
}};

}  // namespace

std::string_view record_kind_name(RecordKind kind) {
  for (const auto& [k, name] : kKindNames)
    if (k == kind) return name;
  return "unknown";
}

std::optional<RecordKind> record_kind_from_name(std::string_view name) {
  for (const auto& [k, n] : kKindNames)
    if (n == name) return k;
  return std::nullopt;
}

Result<std::string> canonical_uuid(std::string_view text) {
  if (text.size() != 36) return Error{"'" + std::string(text) + "' is not a UUID (want 8-4-4-4-12 hex digits)"};
  std::string copy(text);
  uuid_t u;
  if (uuid_parse(copy.c_str(), u) != 0) return Error{"'" + copy + "' is not a UUID (want 8-4-4-4-12 hex digits)"};
  char out[37];
  uuid_unparse_lower(u, out);
  return std::string(out);
}

std::string uuid_text(const std::array<uint8_t, 16>& bytes) {
  char out[37];
  uuid_unparse_lower(bytes.data(), out);
  return out;
}

std::string random_uuid() {
  uuid_t u;
  uuid_generate(u);
  char out[37];
  uuid_unparse_lower(u, out);
  return out;
}

Result<void> check_migration_id(std::string_view id) {
  if (id.empty() || id.size() > 64) return Error{"migration id must be 1..64 characters"};
  for (char c : id)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-'))
      return Error{"migration id '" + std::string(id) + "': only letters, digits, '.', '_' and '-'"};
  return ok();
}

int64_t now_ms() {
  using namespace std::chrono;
  return duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
}

Result<int64_t> SiteRecords::append(RecordKind kind, std::string_view migration_id, std::string_view vm_uuid,
                                    std::string_view detail, int64_t at_ms) {
  KVMIG_TRY(check_migration_id(migration_id));
  KVMIG_ASSIGN(std::string uuid, canonical_uuid(vm_uuid));
  Transaction tx(db_);
  KVMIG_TRY(tx.begun());
  KVMIG_ASSIGN(Statement * s, db_.prepare("INSERT INTO records(migration_id, vm_uuid, kind, at_ms, detail) "
                                          "VALUES (?1, ?2, ?3, ?4, ?5)"));
  s->bind(1, migration_id).bind(2, uuid).bind(3, record_kind_name(kind)).bind(4, at_ms ? at_ms : now_ms());
  s->bind(5, detail);
  if (auto r = s->run(); !r.ok())
    return std::move(r.error().prefix(std::string("recording ") + std::string(record_kind_name(kind)) + " of " + uuid));
  int64_t seq = 0;
  KVMIG_ASSIGN(Statement * last, db_.prepare("SELECT last_insert_rowid()"));
  KVMIG_ASSIGN(bool row, last->step());
  if (row) seq = last->integer(0);
  last->reset();
  if (auto r = tx.commit(); !r.ok())
    return std::move(r.error().prefix(std::string("committing ") + std::string(record_kind_name(kind)) + " of " + uuid));
  return seq;
}

Result<bool> SiteRecords::has(RecordKind kind, std::string_view migration_id, std::string_view vm_uuid) {
  KVMIG_ASSIGN(Statement * s, db_.prepare("SELECT 1 FROM records WHERE migration_id = ?1 AND vm_uuid = ?2 "
                                          "AND kind = ?3 LIMIT 1"));
  s->bind(1, migration_id).bind(2, vm_uuid).bind(3, record_kind_name(kind));
  auto row = s->step();
  s->reset();
  return row;
}

Result<std::vector<Record>> SiteRecords::collect(Statement& s) {
  std::vector<Record> out;
  for (;;) {
    auto row = s.step();
    if (!row.ok()) {
      s.reset();
      return std::move(row.error());
    }
    if (!*row) break;
    Record r;
    r.seq = s.integer(0);
    r.migration_id = s.text(1);
    r.vm_uuid = s.text(2);
    auto kind = record_kind_from_name(s.text(3));
    if (!kind) {
      s.reset();
      return Error{"record " + std::to_string(r.seq) + ": unknown kind '" + s.text(3) + "'"};
    }
    r.kind = *kind;
    r.at_ms = s.integer(4);
    r.detail = s.text(5);
    out.push_back(std::move(r));
  }
  s.reset();
  return out;
}

Result<std::vector<Record>> SiteRecords::for_migration(std::string_view migration_id) {
  KVMIG_ASSIGN(Statement * s, db_.prepare("SELECT seq, migration_id, vm_uuid, kind, at_ms, detail FROM records "
                                          "WHERE migration_id = ?1 ORDER BY seq"));
  s->bind(1, migration_id);
  return collect(*s);
}

Result<std::vector<Record>> SiteRecords::all() {
  KVMIG_ASSIGN(Statement * s,
               db_.prepare("SELECT seq, migration_id, vm_uuid, kind, at_ms, detail FROM records ORDER BY seq"));
  return collect(*s);
}

Result<std::vector<std::string>> SiteRecords::migrations() {
  KVMIG_ASSIGN(Statement * s, db_.prepare("SELECT migration_id FROM records GROUP BY migration_id ORDER BY MIN(seq)"));
  std::vector<std::string> out;
  for (;;) {
    auto row = s->step();
    if (!row.ok() || !*row) {
      s->reset();
      if (!row.ok()) return std::move(row.error());
      break;
    }
    out.push_back(s->text(0));
  }
  return out;
}

}  // namespace kvmig::host
