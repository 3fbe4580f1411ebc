// `kvmig vm save` and `kvmig vm restore`, and the control-socket commands they rely on.
#pragma once

#include <CLI/CLI.hpp>

#include "host/control_server.h"
#include "kvm/machine.h"

namespace kvmig::cli {

// Adds "save" and "restore" under the existing "vm" subcommand of APP (call after the one
// that creates "vm").
void add_vm_state_commands(CLI::App& app);

// Registers on a running VM's control socket:
//   {"cmd":"save","path":ABS_PATH,"keep_running":bool} pauses, saves, and resumes only if
//       keep_running and the VM was running; otherwise it stays paused. Replies with sizes.
//   {"cmd":"stop","status":N} ends the VM; `kvmig vm run/restore` then exits with N.
// `kvmig vm run` and `kvmig vm restore` both call this.
void register_state_commands(host::ControlServer& server, kvm::Machine& machine);

// Attaches each --disk "PATH[,block=SIZE]" to MACHINE, in order (disk 0, 1, ..); on a bad
// spec or image prints one line and exits with 125.
void attach_disks(kvm::Machine& machine, const std::vector<std::string>& specs);
// "; disk N: R reads, W writes, ..." counters for --verbose.
void print_disk_stats(kvm::Machine& machine);

}  // namespace kvmig::cli
