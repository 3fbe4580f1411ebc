// The control-socket commands every running micro-VM answers: pause, resume, stats.
#pragma once

#include <nlohmann/json.hpp>

#include "host/control_server.h"
#include "kvm/machine.h"

namespace kvmig::host {

nlohmann::json stats_to_json(const kvm::MachineStats& stats);

// Registers "pause", "resume" and "stats" for `machine`, which must outlive the server's use.
void register_machine_commands(ControlServer& server, kvm::Machine& machine);

}  // namespace kvmig::host
