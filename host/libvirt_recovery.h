// Status and recovery of libvirt domains after a fault in `kvmig migrate-domain`: the generic
// decision (host/status_checker.h) and plan (host/recovery.h), with what only libvirt knows
// added to both. The source's domains are a SourceActions (LibvirtSource), the destination's
// placeholders are LibvirtPlaceholders, and the records are the same MigrationRecorder's.
//
// What libvirt adds, and why:
//   - libvirt's peer-to-peer migration runs inside the source libvirtd: killing the kvmig
//     process that asked for it does not stop it. So a "not migrated" source may still have
//     an outgoing job; recovery aborts that job (virDomainAbortJob) before it fences the
//     destination, and looks again afterwards (the job may have finished meanwhile).
//   - An incoming domain (active, this migration's mark, never tagged) is partial state:
//     destroyed, then undefined by the fence, but only while the source copy is verified
//     active with no job (so the source holds the whole VM).
//   - libvirt stops the source copy when its migration finishes, before kvmig can tag the
//     placeholder (there is no step between libvirt's Finish and Confirm). A source shut off
//     (with reason "migrated", or whatever the reason once the destination's domain is active
//     with no incoming job left) and an untagged, active domain of this migration at the
//     destination is "handed over": the seed's answer is not "migrated" (no tag), but the
//     only copy of the VM is the paused destination domain, so resuming the source is
//     impossible and removing the destination would lose the VM. `kvmig status` says in
//     doubt, with that reason; `kvmig recover` completes the migration there (tag, record,
//     resume at the destination, source definition undefined, released): nothing is
//     destroyed, and no copy but that one can run.
//   - "migrated" may leave the arrived domain paused (never resumed) and the source's
//     definition shut off but defined: recovery resumes the one and undefines the other.
//   - "migrated" whose domain no longer runs at the destination (its QEMU ended after the
//     hand-over): the VM runs nowhere. Recovery reports it and never destroys a source copy
//     that still runs or is paused then (it would be the only one left).
//   - The source's libvirtd may be down (killed): its copies' state is unknown. The verdict
//     comes from the destination as ever, but an untagged active domain there is then in
//     doubt (it may be a hand-over the source can no longer confirm), and nothing is resumed
//     or destroyed on the source's behalf.
//   - A domain is matched on migration id and UUID, not UUID alone: at the destination only a
//     domain carrying this migration's kvmig mark is touched; at the source, a domain with
//     the UUID is this migration's source copy only if the source did not record it released
//     for this migration and it is not a placeholder (marked, untagged) of any migration.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "host/libvirt_conn.h"
#include "host/libvirt_placeholder.h"
#include "host/migration_recorder.h"
#include "host/recovery.h"

namespace kvmig::host {

// What libvirt says about one domain of a migration beyond the generic facts.
struct DomainFacts {
  bool source_job = false;           // an outgoing migration job still runs at the source
  bool source_leftover = false;      // the source copy is shut off but still defined there
  bool source_migrated_off = false;  // ... shut off by libvirt's migration (SHUTOFF_MIGRATED)
  bool dest_active = false;          // this migration's domain at the destination runs or is paused
  bool dest_paused = false;
  bool dest_defined = false;         // this migration's domain is defined at the destination
  // ... active with no incoming job: libvirt's Finish took it (an incoming migration that fails
  // ends its QEMU), so it holds the whole VM. The destination's own evidence of a hand-over,
  // which outlives a restart of the source's libvirtd (that forgets why a domain is shut off).
  bool dest_arrived = false;
};

struct DomainStatus {
  VmStatus status;  // the verdict as `kvmig status` reports it
  DomainFacts facts;
  bool handed_over = false;  // see above: recover completes the migration at the destination
};

// The generic verdict with libvirt's facts applied (the hand-over case). Pure.
DomainStatus decide_domain(VmStatus generic, const DomainFacts& facts);

enum class DomainStep {
  abort_source_job,    // virDomainAbortJob at the source, then look again
  destroy_incoming,    // virDomainDestroy of the untagged incoming domain at the destination
  fence_destination,   // placeholder undefined, aborted recorded
  resume_source,
  tag_completed,       // the placeholder's completed event, then the record
  destroy_source,      // destroyed and undefined at the source
  undefine_source,     // the shut-off source definition undefined
  record_released,
  resume_destination,
};
std::string_view domain_step_name(DomainStep step);

struct DomainPlan {
  std::vector<DomainStep> steps;
  std::string problem;  // non-empty: what recovery cannot make true (reported)
};
// Built on plan_recovery() (host/recovery.h), with libvirt's steps added. Pure.
DomainPlan plan_domain(const DomainStatus& status);

// The source's libvirtd and site: the source copies of a migration's domains.
class LibvirtSource : public SourceActions {
 public:
  // `unreachable`: why the source's libvirtd could not be opened (`conn` is then empty); every
  // copy's state is then unknown, and its site still says what it released.
  LibvirtSource(const LibvirtConn& conn, SiteRecords& records, std::string unreachable = "")
      : conn_(conn), records_(records), unreachable_(std::move(unreachable)) {}
  std::string_view kind() const override { return "libvirt"; }
  Result<SourceFacts> inspect(const std::string& migration_id, const std::string& uuid) override;
  Result<void> resume(const std::string& uuid) override;
  // Destroys the domain if it runs, then undefines it.
  Result<void> destroy(const std::string& uuid) override;

  // inspect() and libvirt's own facts of the source copy (source_* fields of DomainFacts).
  Result<SourceFacts> inspect(const std::string& migration_id, const std::string& uuid, DomainFacts& facts);
  // Aborts the domain's outgoing job and waits (up to `wait_ms`) until it has ended.
  Result<void> abort_job(const std::string& uuid, int wait_ms);

 private:
  const LibvirtConn& conn_;
  SiteRecords& records_;
  std::string unreachable_;
};

// Both sites of a libvirt migration, as `kvmig status` / `kvmig recover` reach them.
struct LibvirtSites {
  SiteRecords& dest_records;
  const LibvirtConn& dest;
  SiteRecords& source_records;
  const LibvirtConn& source;
  std::string source_error = {};  // non-empty: `source` is not open, and why
};

// The status of every domain of `migration_id` (and of `extra_vms`, which the destination may
// never have recorded).
Result<std::vector<DomainStatus>> read_domain_status(LibvirtSites& sites, const std::string& migration_id,
                                                     const std::vector<std::string>& extra_vms = {});

// Carries out plan_domain(status), stopping at the first failing step; after aborting a
// source job it reads the domain's status again and plans once more.
RecoveryOutcome recover_domain(const DomainStatus& status, LibvirtSites& sites);

}  // namespace kvmig::host
