// `kvmig vm save` and `kvmig vm restore`, and the control-socket commands they rely on.
#pragma once

#include <CLI/CLI.hpp>

#include "host/control_server.h"
#include "host/micro_vm_site.h"
#include "host/migrate_command.h"
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

// What --uuid, --name and --site give a VM that runs here (`vm run`, `vm restore`).
struct VmSite {
  std::string uuid;  // canonical; random when a site needs one and --uuid gave none
  std::string name, dir;
  std::unique_ptr<host::MicroVmSite> site;  // null without --site
  host::MigrateIdentity identity;           // what migrations of this VM record
};

// Checks and opens them before any VM is built; on bad input prints one line and exits 125.
VmSite open_vm_site(const std::string& uuid, const std::string& name, const std::string& site_dir,
                    bool no_control);

// Opens the control socket (CONTROL, or the default path unless NO_CONTROL) and registers the
// VM at its site under the socket's absolute path, so `kvmig status`/`recover` reach it from
// anywhere. The default location may be unwritable for an unprivileged user: then the VM still
// runs, unless --control named it or a site must reach it (one line, exit 125).
void start_control(host::ControlServer& control, const std::string& path, bool no_control, bool verbose,
                   VmSite& vm_site);

// Attaches each --disk "PATH[,block=SIZE]" to MACHINE, in order (disk 0, 1, ..); on a bad
// spec or image prints one line and exits with 125.
void attach_disks(kvm::Machine& machine, const std::vector<std::string>& specs);
// "; disk N: R reads, W writes, ..." counters for --verbose.
void print_disk_stats(kvm::Machine& machine);

}  // namespace kvmig::cli
