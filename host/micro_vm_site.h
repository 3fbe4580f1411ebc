// MicroVmSite: one micro-VM process's handle on its host's site (docs/control-plane.md,
// "Wiring"). `kvmig vm run --site` registers its VM here as running, with its control
// socket, so `kvmig status`/`recover` can reach it; `kvmig receive --site` hands it to the
// migration session as its SessionEvents, so the records and the placeholder are written
// at the steps helper/session_events.h fixes. Either process then hands it to its migrate
// command as SourceEvents, so a VM that leaves records source_released here.
//
// The site must exist (`kvmig site init DIR`): a mistyped --site that quietly created a new,
// empty site would hold records that no `kvmig status --site` ever reads, and an absent
// record reads as "not migrated" -- recovery would then resume a VM that runs elsewhere.
//
// One SQLite connection, used from the main thread (register, arrival, exit) and from a
// control-socket thread (release): every call takes the mutex.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "helper/session_events.h"
#include "host/migration_recorder.h"
#include "host/placeholder_registry.h"
#include "host/site_db.h"
#include "host/site_records.h"
#include "host/vm_holder.h"

namespace kvmig::host {

// A UUID's 16 bytes (as HELLO carries them) from its text; errors name the text.
Result<std::array<uint8_t, 16>> uuid_bytes(std::string_view text);

class MicroVmSite : public helper::SessionEvents, public helper::SourceEvents {
 public:
  static Result<std::unique_ptr<MicroVmSite>> open(const std::string& dir);

  // Source: this process runs `uuid`, answering on `control`. Refused when another live
  // process runs a VM with that UUID here, or the UUID is an incoming placeholder.
  Result<void> register_running(const std::string& uuid, const std::string& name, const std::string& control);
  // Destination, once the received VM runs and its control socket is open.
  Result<void> set_control(const std::string& control);
  // The process ends: a VM registered as running by this process is forgotten (a VM that
  // arrived keeps its completed placeholder: it is the status checker's evidence).
  void leave();

  // The VM this process runs (canonical text), once registered or received; empty before.
  std::string uuid();
  const std::string& dir() const { return db_->dir(); }

  // Destination (helper/session_events.h): recorded through MigrationRecorder.
  Result<void> on_started(const helper::SessionVm& vm) override;
  Result<void> on_round(const helper::SessionVm& vm) override;
  // After the tag is durable, the fault point `destination:tagged` (helper/fault_point.h): the
  // vCPUs have not run yet.
  Result<void> on_completed(const helper::SessionVm& vm) override;
  Result<void> on_aborted(const helper::SessionVm& vm, const std::string& reason) override;
  // Source: source_released recorded. The running row stays until the process ends (leave()),
  // so a paused copy whose migrate-finish never came (its `kvmig migrate` died) is still found
  // and ended by `kvmig recover`; after that the UUID may come back here by migration.
  Result<void> on_released(const helper::SessionVm& vm) override;

 private:
  explicit MicroVmSite(std::unique_ptr<SiteDb> db);

  std::mutex mu_;
  std::unique_ptr<SiteDb> db_;
  SiteRecords records_;
  MicroVmRegistry registry_;
  MigrationRecorder recorder_;
  std::string uuid_;
  std::string control_;
  // This process's hold on its VM at the site (host/vm_holder.h): from registration (source)
  // or from the migration-started record (destination) to the process's end. It is how the
  // status checker tells a dead copy from one that has not opened its control socket yet.
  VmHolder holder_;
};

}  // namespace kvmig::host
