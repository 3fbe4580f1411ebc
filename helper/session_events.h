// SessionEvents: what a migration session tells the control plane at the steps that decide
// where a VM is. helper/ cannot include host/ (dependencies flow host -> helper -> kvm), so the
// session calls this interface and host/migration_recorder.h implements it on a site's records.
//
// The destination session calls, for each VM it receives, in this order:
//   on_started   after HELLO is checked and before HELLO_ACK: nothing has moved yet. It
//                writes the durable migration-started record and creates the placeholder.
//                An error here ends the session with ERROR: the source runs on.
//   on_round     after each memory round is in (pre-copy, and the switch-over's last: keep
//                it cheap, it may fall in the downtime). It checks the site can still record
//                the completion (room on its disk); an error ends the session before READY,
//                so the source runs on, instead of failing the completion after COMMIT.
//   on_completed after COMMIT is read and BEFORE the VM's vCPUs start. It durably tags the
//                placeholder with the migration-completed event. Only once it returned ok may
//                the VM run here; on error the VM must not run (answer ERROR, discard it): the
//                source stays paused, in doubt, until `kvmig recover` reads "not migrated".
//   on_aborted   on any failure after on_started succeeded and before on_completed
//                succeeded. It removes the placeholder and records the abort. Its own error
//                is only reported: the status checker treats an untagged placeholder as "not
//                migrated" anyway.
// The source calls on_released once DONE has arrived and its copy is stopped for good.
// A failing call must not be retried blindly by the session: every call is idempotent for the
// same (migration id, VM), so retrying is safe, but the session has a deadline to keep.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "base/result.h"

namespace kvmig::helper {

// One VM of a (group) migration, as the destination learns it from HELLO.
struct SessionVm {
  std::string migration_id;       // [A-Za-z0-9._-], 1..64; one id may cover several VMs
  std::array<uint8_t, 16> uuid{};  // the VM's UUID: the placeholder takes the same one
  std::string name;               // empty: the placeholder is named after the UUID
};

class SessionEvents {
 public:
  virtual ~SessionEvents() = default;
  virtual Result<void> on_started(const SessionVm& vm) = 0;
  virtual Result<void> on_round(const SessionVm& vm) = 0;
  virtual Result<void> on_completed(const SessionVm& vm) = 0;
  virtual Result<void> on_aborted(const SessionVm& vm, const std::string& reason) = 0;
};

class SourceEvents {
 public:
  virtual ~SourceEvents() = default;
  virtual Result<void> on_released(const SessionVm& vm) = 0;
};

}  // namespace kvmig::helper
