// Status and recovery after a fault: read what the destination site and the source say about
// each VM of a migration, decide with the status checker, then make each answer true on
// both sites (`kvmig status`, `kvmig recover`):
//   not migrated -> fence the destination first (placeholder removed, `aborted` recorded,
//                   so a late destination can no longer complete), then resume the source
//                   if it is paused;
//   migrated     -> destroy the source's copy, then record it released;
//   in doubt     -> nothing is destroyed or resumed; the reason is reported.
// What is done to a VM goes through SourceActions (micro-VMs now, libvirt domains later) and
// MigrationRecorder/PlaceholderStore (the destination's placeholders).
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "host/migration_recorder.h"
#include "host/placeholder_registry.h"
#include "host/site_records.h"
#include "host/status_checker.h"

namespace kvmig::host {

// The source's copy of a VM, whatever runs it.
class SourceActions {
 public:
  virtual ~SourceActions() = default;
  virtual std::string_view kind() const = 0;
  // The copy's state and whether the source recorded it released for this migration. An
  // error only when the source's own records cannot be read.
  virtual Result<SourceFacts> inspect(const std::string& migration_id, const std::string& uuid) = 0;
  virtual Result<void> resume(const std::string& uuid) = 0;
  // Ends the copy for good and frees its registration; a copy already gone is not an error.
  virtual Result<void> destroy(const std::string& uuid) = 0;
};

// Micro-VMs at a source site: the site's VM registry gives each VM's control socket; pause,
// resume and stop go through it (host/control_server.h).
class MicroVmSource : public SourceActions {
 public:
  MicroVmSource(SiteRecords& records, MicroVmRegistry& registry) : records_(records), registry_(registry) {}
  std::string_view kind() const override { return "microvm"; }
  Result<SourceFacts> inspect(const std::string& migration_id, const std::string& uuid) override;
  Result<void> resume(const std::string& uuid) override;
  Result<void> destroy(const std::string& uuid) override;

 private:
  Result<std::string> control_of(const std::string& uuid);
  SiteRecords& records_;
  MicroVmRegistry& registry_;
};

// The status of every VM of `migration_id` (empty: of every migration the destination
// recorded), `extra_vms` added to it. `source` may be null: the source state is then unknown.
Result<std::vector<VmStatus>> read_status(SiteRecords& destination, PlaceholderStore& placeholders,
                                          SourceActions* source, const std::string& migration_id,
                                          const std::vector<std::string>& extra_vms = {});
// When the destination site cannot be read at all: every named VM is in doubt.
std::vector<VmStatus> unreadable_status(const std::string& migration_id, const std::vector<std::string>& vms,
                                        const std::string& why);

// What recovery does to one VM: a pure function of its status, unit-tested.
enum class RecoveryStep { fence_destination, resume_source, destroy_source, record_released };
std::string_view recovery_step_name(RecoveryStep step);
struct RecoveryPlan {
  std::vector<RecoveryStep> steps;
  std::string problem;  // non-empty: what recovery cannot make true (reported, exit non-zero)
};
RecoveryPlan plan_recovery(const VmStatus& status);

struct RecoveryOutcome {
  VmStatus status;
  std::vector<std::string> done;  // steps carried out, in order
  std::string problem;            // empty when the VM now runs exactly once, where the verdict says
};

// Carries out plan_recovery(status). Stops at the first failing step: a failed fence never
// goes on to resume the source.
RecoveryOutcome recover_vm(const VmStatus& status, MigrationRecorder& destination, SourceActions& source,
                           MigrationRecorder& source_recorder);

// `kvmig recover --resume-source`, the operator's answer to one in-doubt case: the destination
// tagged its placeholder completed, its process is gone (host/vm_holder.h), the source never got
// DONE and holds the paused copy. The destination may have died before its first vCPU run or
// just after it (the vCPUs start before DONE is sent), so no automatic path takes it; an
// operator who knows the destination side (or accepts the VM going back to its switch-over
// state) resumes the source. Empty: allowed; otherwise why not. Pure.
std::string resume_source_refusal(const VmStatus& status);
// Carries it out: with the destination's holder lock taken (no process can take the VM there
// meanwhile), the tagged placeholder is removed and `aborted` recorded in one transaction, so
// no destination can complete or run this migration any more; only then the source resumes.
RecoveryOutcome resume_source_vm(const VmStatus& status, SiteRecords& destination, MicroVmRegistry& destination_store,
                                 SourceActions& source);

}  // namespace kvmig::host
