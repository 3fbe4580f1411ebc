// VmHolder: which process holds a VM at a site, and whether that process still lives.
//
// The records say what happened; they cannot say whether the process that runs a VM is still
// there. That matters twice (docs/control-plane.md): a destination killed between its completion
// tag and its first vCPU run leaves records that read "migrated" while the only copy is the
// paused source; and a source process killed after its VM moved away leaves a `running` row
// that would block the VM's return. A control socket does not answer that question: the
// receiving process opens its socket only once the VM runs, so "no answer" cannot tell "dead"
// from "about to run".
//
// So every process that holds a VM at a site (`vm run --site` from registration, `receive
// --site` from the migration-started record on) keeps an open file description of
// SITE/holders/UUID with an OFD write lock on it (fcntl F_OFD_SETLK), and writes into it who
// it is. The kernel drops the lock when the process ends, kill -9 included, and keeps it while
// the process is merely stopped (SIGSTOP): a stopped destination is still a destination that
// may run. Anyone can test the lock without taking it (F_OFD_GETLK), so probing never races a
// holder. The files are never unlinked (unlinking a lock file races with a process opening it).
// Linux >= 3.15 (OFD locks); the probe must run on the site's host (a lock on a network file
// system says nothing reliable).
#pragma once

#include <string>

#include "base/fd.h"
#include "base/result.h"

namespace kvmig::host {

class VmHolder {
 public:
  VmHolder() = default;
  // Takes SITE/holders/UUID for this process. `migration_id` is the migration that brought the
  // VM here (empty for a VM started here). Fails when a live process holds it already: one
  // UUID, one live process per site.
  static Result<VmHolder> take(const std::string& site_dir, const std::string& uuid,
                               const std::string& migration_id);
  bool held() const { return fd_.valid(); }
  // Lets go (the process goes on, the VM is no longer its).
  void release() { fd_.reset(); }

 private:
  explicit VmHolder(Fd fd) : fd_(std::move(fd)) {}
  Fd fd_;
};

struct HolderProbe {
  enum State { unknown, alive, gone } state = unknown;
  std::string migration_id;  // what the holder wrote (alive or gone): the migration that brought it
  long pid = 0;              // what the holder wrote
  std::string detail;        // one line for status reasons
};

// Tests SITE/holders/UUID without taking it. No file: unknown (a kvmig that predates holders,
// or a VM that never had a process at this site).
HolderProbe probe_holder(const std::string& site_dir, const std::string& uuid);

// Takes the lock only if nobody holds it, for as long as the returned Fd lives: recovery holds
// it while it fences a copy it found gone, so no process can take the VM meanwhile. An error
// (EAGAIN) when a process holds it.
Result<Fd> lock_if_gone(const std::string& site_dir, const std::string& uuid);

// For a VM with no holder file (a process of a kvmig before holders): true only when nobody
// listens on its control socket (connect: ENOENT or ECONNREFUSED). Only connects, sends
// nothing: a stopped process still accepts (its backlog) and so reads as alive.
bool control_socket_dead(const std::string& path);

}  // namespace kvmig::host
