// The control-socket commands that make a running VM's own process the migration source,
// so `kvmig migrate SOCK --to ADDR` needs no access to the VM's memory itself:
//   {"cmd":"migrate","to":"HOST:PORT"|"unix:PATH", "streams":N, "compress":bool,
//    "verify":bool, "dirty_tracking":"bitmap"|"ring", "granularity":BYTES,
//    "max_downtime_ms":MS, "timeout_s":S, "migration_id":STR}  (all but "to" optional)
//      -> the report (helper/migration_report.h) with "result": completed|failed|in-doubt.
//   {"cmd":"migrate-progress"} -> phase, iteration, transferred, remaining, dirty rate,
//      expected downtime of the migration in progress (or of the last one).
//   {"cmd":"migrate-finish"} -> after a completed migration only: ends this VM (status 0),
//      the destination's copy being the real one now. Sent by the CLI once it has the
//      report, so the report is never lost in the VM process's exit.
#pragma once

#include <nlohmann/json.hpp>

#include "base/result.h"
#include "helper/migration_source.h"
#include "host/control_server.h"
#include "kvm/machine.h"

namespace kvmig::host {

// Checks every field of a "migrate" request; errors name the field.
Result<helper::SourceOptions> parse_migrate_request(const nlohmann::json& request);

// Registers migrate, migrate-progress and migrate-finish for `machine`, which must outlive
// the server's use of them.
void register_migrate_commands(ControlServer& server, kvm::Machine& machine);

}  // namespace kvmig::host
