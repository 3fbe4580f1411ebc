// MigrationRecorder: the site-side half of helper::SessionEvents. What a destination does at
// each step (started -> placeholder -> completed / aborted) and what a source does once its
// copy is gone (released), each durable before the call returns. helper/session_events.h
// says when the session must call each one.
//
// Order, and why:
//   started:   the migration_started record (durable) first, then the placeholder, then
//              placeholder_created. A crash in between leaves "started, no placeholder":
//              not migrated, nothing to undo but the record.
//   completed: the placeholder's completed tag and the migration_completed record in one
//              transaction when the store lives in the site database (micro-VMs); for a store
//              outside it (libvirt metadata) the tag first, then the record, so a record never
//              claims a completion the placeholder does not carry.
//   aborted:   removal of the untagged placeholder and the aborted record, together.
#pragma once

#include <string>

#include "helper/session_events.h"
#include "host/placeholder_registry.h"
#include "host/site_records.h"

namespace kvmig::host {

class MigrationRecorder : public helper::SessionEvents, public helper::SourceEvents {
 public:
  // `store_in_site_db`: the store writes to records' own database (MicroVmRegistry on the
  // same SiteDb), so a tag and its record can share one transaction.
  // What the completion and the abort need at most, with SQLite's WAL: a few pages, with
  // a wide margin.
  static constexpr uint64_t kMinFreeBytes = 256 << 10;

  MigrationRecorder(SiteRecords& records, PlaceholderStore& store, bool store_in_site_db)
      : records_(records), store_(store), same_db_(store_in_site_db) {}

  Result<void> on_started(const helper::SessionVm& vm) override;
  // Room left on the site's file system for the completion (statvfs: cheap enough for the
  // switch-over); an error below kMinFreeBytes.
  Result<void> on_round(const helper::SessionVm& vm) override;
  Result<void> on_completed(const helper::SessionVm& vm) override;
  Result<void> on_aborted(const helper::SessionVm& vm, const std::string& reason) override;
  // Source site: records source_released. (The caller destroys the VM first.)
  Result<void> on_released(const helper::SessionVm& vm) override;

  // The same steps by text UUID, for the CLI and recovery.
  Result<void> started(const std::string& migration_id, const std::string& uuid, const std::string& name);
  Result<void> completed(const std::string& migration_id, const std::string& uuid);
  // Fences the destination: the placeholder is removed and `aborted` recorded, unless the
  // placeholder is tagged completed (then an error: the VM is the real one there).
  Result<void> aborted(const std::string& migration_id, const std::string& uuid, const std::string& reason);
  Result<void> released(const std::string& migration_id, const std::string& uuid);

 private:
  SiteRecords& records_;
  PlaceholderStore& store_;
  bool same_db_;
};

}  // namespace kvmig::host
