#include "host/migration_recorder.h"

#include <sys/statvfs.h>

#include <optional>

namespace kvmig::host {

Result<void> MigrationRecorder::on_started(const helper::SessionVm& vm) {
  return started(vm.migration_id, uuid_text(vm.uuid), vm.name);
}

Result<void> MigrationRecorder::on_round(const helper::SessionVm&) {
  struct statvfs st {};
  const std::string& dir = records_.db().dir();
  if (::statvfs(dir.c_str(), &st) != 0) return Error::from_errno("statvfs " + dir);
  uint64_t free = static_cast<uint64_t>(st.f_bavail) * st.f_frsize;
  if (free < kMinFreeBytes)
    return Error{"site " + dir + " has " + std::to_string(free) + " bytes free, too little to record the completion"};
  return ok();
}

Result<void> MigrationRecorder::on_completed(const helper::SessionVm& vm) {
  return completed(vm.migration_id, uuid_text(vm.uuid));
}

Result<void> MigrationRecorder::on_aborted(const helper::SessionVm& vm, const std::string& reason) {
  return aborted(vm.migration_id, uuid_text(vm.uuid), reason);
}

Result<void> MigrationRecorder::on_released(const helper::SessionVm& vm) {
  return released(vm.migration_id, uuid_text(vm.uuid));
}

Result<void> MigrationRecorder::started(const std::string& migration_id, const std::string& uuid_in,
                                        const std::string& name) {
  KVMIG_ASSIGN(std::string uuid, canonical_uuid(uuid_in));
  // The check and the record commit together, so `kvmig recover` fencing this migration
  // and a late destination starting it cannot both succeed.
  Transaction tx(records_.db());
  KVMIG_TRY(tx.begun());
  KVMIG_ASSIGN(bool fenced, records_.has(RecordKind::aborted, migration_id, uuid));
  if (fenced)
    return Error{"migration " + migration_id + " of " + uuid + " was aborted here: start it again with a new id"};
  KVMIG_ASSIGN(bool have, records_.has(RecordKind::migration_started, migration_id, uuid));
  if (!have) KVMIG_TRY(records_.append(RecordKind::migration_started, migration_id, uuid, name));
  // A store in this database joins the transaction: record and placeholder appear together.
  // One outside it (libvirt) must not be called while the site's write lock is held.
  if (!same_db_) KVMIG_TRY(tx.commit());
  if (auto r = store_.create(uuid, name, migration_id); !r.ok())
    return std::move(r.error().prefix("migration " + migration_id));
  KVMIG_ASSIGN(bool noted, records_.has(RecordKind::placeholder_created, migration_id, uuid));
  if (!noted) KVMIG_TRY(records_.append(RecordKind::placeholder_created, migration_id, uuid, store_.kind()));
  return tx.commit();
}

Result<void> MigrationRecorder::completed(const std::string& migration_id, const std::string& uuid_in) {
  KVMIG_ASSIGN(std::string uuid, canonical_uuid(uuid_in));
  KVMIG_ASSIGN(bool started, records_.has(RecordKind::migration_started, migration_id, uuid));
  if (!started) return Error{"migration " + migration_id + ": " + uuid + " has no migration-started record here"};
  if (same_db_) {
    Transaction tx(records_.db());
    KVMIG_TRY(tx.begun());
    KVMIG_ASSIGN(bool fenced, records_.has(RecordKind::aborted, migration_id, uuid));
    if (fenced) return Error{"migration " + migration_id + " of " + uuid + " was aborted here: the VM must not run"};
    KVMIG_TRY(store_.mark_completed(uuid, migration_id));
    KVMIG_ASSIGN(bool done, records_.has(RecordKind::migration_completed, migration_id, uuid));
    if (!done) KVMIG_TRY(records_.append(RecordKind::migration_completed, migration_id, uuid));
    return tx.commit();
  }
  KVMIG_TRY(store_.mark_completed(uuid, migration_id));
  KVMIG_ASSIGN(bool done, records_.has(RecordKind::migration_completed, migration_id, uuid));
  if (!done) KVMIG_TRY(records_.append(RecordKind::migration_completed, migration_id, uuid));
  return ok();
}

Result<void> MigrationRecorder::aborted(const std::string& migration_id, const std::string& uuid_in,
                                        const std::string& reason) {
  KVMIG_ASSIGN(std::string uuid, canonical_uuid(uuid_in));
  // A placeholder outside the database (libvirt) is removed first: a crash after it leaves
  // "started, no placeholder", which already reads as not migrated.
  std::optional<Transaction> tx;
  if (same_db_) {
    tx.emplace(records_.db());
    KVMIG_TRY(tx->begun());
  }
  KVMIG_TRY(store_.remove(uuid, migration_id));
  KVMIG_ASSIGN(bool have, records_.has(RecordKind::aborted, migration_id, uuid));
  if (!have) KVMIG_TRY(records_.append(RecordKind::aborted, migration_id, uuid, reason));
  return tx ? tx->commit() : ok();
}

Result<void> MigrationRecorder::released(const std::string& migration_id, const std::string& uuid_in) {
  KVMIG_ASSIGN(std::string uuid, canonical_uuid(uuid_in));
  KVMIG_ASSIGN(bool have, records_.has(RecordKind::source_released, migration_id, uuid));
  if (!have) KVMIG_TRY(records_.append(RecordKind::source_released, migration_id, uuid));
  return ok();
}

}  // namespace kvmig::host
