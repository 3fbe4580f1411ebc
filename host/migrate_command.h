// The control-socket commands that make a running VM's own process the migration source,
// so `kvmig migrate SOCK --to ADDR` needs no access to the VM's memory itself:
//   {"cmd":"migrate","to":"HOST:PORT"|"unix:PATH", "streams":N, "compress":"auto"|"on"|"off",
//    "verify":bool, "dirty_tracking":"bitmap"|"ring", "granularity":BYTES,
//    "max_downtime_ms":MS, "timeout_s":S, "migration_id":STR}  (all but "to" optional)
//      -> the report (helper/migration_report.h) with "result": completed|failed|in-doubt,
//         plus "migration_id" (made here when the request has none) and "vm_uuid".
//   {"cmd":"migrate-progress"} -> phase, iteration, transferred, remaining, dirty rate,
//      expected downtime and "migration_id" of the migration in progress (or of the last
//      one; "" if none): recovery tells this migration's source copy by it.
//   {"cmd":"migrate-finish"} -> after a completed migration only: ends this VM (status 0),
//      the destination's copy being the real one now. Sent by the CLI once it has the
//      report, so the report is never lost in the VM process's exit.
#pragma once

#include <array>
#include <cstdint>
#include <nlohmann/json.hpp>

#include "base/result.h"
#include "helper/migration_source.h"
#include "host/control_server.h"
#include "kvm/machine.h"

namespace kvmig::host {

// A fresh migration id, "mig-" and 16 hex digits (the form the session itself makes).
std::string new_migration_id();

// Checks every field of a "migrate" request; errors name the field.
Result<helper::SourceOptions> parse_migrate_request(const nlohmann::json& request);

// Who the VM is, for the session and the source site's records.
struct MigrateIdentity {
  std::array<uint8_t, 16> vm_uuid{};         // travels in HELLO; all zero: a random one per migration
  helper::SourceEvents* events = nullptr;    // e.g. host::MicroVmSite; must outlive the server
  std::string vm_name;                       // travels in HELLO: the destination's placeholder takes it
};

// Registers migrate, migrate-progress and migrate-finish for `machine`, which must outlive
// the server's use of them.
void register_migrate_commands(ControlServer& server, kvm::Machine& machine, MigrateIdentity identity = {});

}  // namespace kvmig::host
