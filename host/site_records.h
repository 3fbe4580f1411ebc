// SiteRecords: the append-only log of migration events at one site. Each record names the
// migration (one id may cover a group of VMs), the VM by UUID, what happened and when.
// Written with synchronous=FULL: once append() returned, the record survives kill -9 of the
// writer and a power cut; that is what lets the status checker trust an absent record.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "host/site_db.h"

namespace kvmig::host {

enum class RecordKind {
  migration_started,    // destination, before any data of the VM moves
  placeholder_created,  // destination, the placeholder VM with the same UUID exists
  migration_completed,  // destination, the placeholder is tagged: the VM may run here
  aborted,              // destination, the migration of this VM ended without completing
  source_released,      // source, its copy of the VM is destroyed and its resources freed
};

std::string_view record_kind_name(RecordKind kind);
std::optional<RecordKind> record_kind_from_name(std::string_view name);

struct Record {
  int64_t seq = 0;  // order of writing at this site
  std::string migration_id;
  std::string vm_uuid;  // canonical lower-case text, 36 characters
  RecordKind kind = RecordKind::migration_started;
  int64_t at_ms = 0;  // wall-clock time, ms since the epoch
  std::string detail;
};

// UUIDs, checked with libuuid. Canonical form: lower-case 8-4-4-4-12.
Result<std::string> canonical_uuid(std::string_view text);
std::string uuid_text(const std::array<uint8_t, 16>& bytes);
std::string random_uuid();
// Migration ids as the wire protocol allows them: [A-Za-z0-9._-], 1..64.
Result<void> check_migration_id(std::string_view id);
int64_t now_ms();

class SiteRecords {
 public:
  explicit SiteRecords(SiteDb& db) : db_(db) {}
  SiteDb& db() { return db_; }

  // Checks the id and UUID, then writes and commits (durably unless inside a transaction,
  // whose commit then decides). Returns the record's seq.
  Result<int64_t> append(RecordKind kind, std::string_view migration_id, std::string_view vm_uuid,
                         std::string_view detail = {}, int64_t at_ms = 0);
  // Whether (migration, vm) has a record of that kind.
  Result<bool> has(RecordKind kind, std::string_view migration_id, std::string_view vm_uuid);
  Result<std::vector<Record>> for_migration(std::string_view migration_id);
  Result<std::vector<Record>> all();
  // Distinct migration ids, oldest first.
  Result<std::vector<std::string>> migrations();

 private:
  Result<std::vector<Record>> collect(Statement& s);
  SiteDb& db_;
};

}  // namespace kvmig::host
