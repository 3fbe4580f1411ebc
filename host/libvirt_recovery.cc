#include "host/libvirt_recovery.h"

#include <libvirt/virterror.h>

#include <chrono>
#include <thread>

#include "host/libvirt_migration.h"

namespace kvmig::host {

namespace {

bool own_placeholder(const VmStatus& st) {
  return st.destination.placeholder && st.destination.placeholder->migration_id == st.migration_id;
}

bool source_holds_copy(const VmStatus& st) {
  return st.source.state == SourceState::running || st.source.state == SourceState::paused;
}

DomainStep domain_step(RecoveryStep step) {
  switch (step) {
    case RecoveryStep::fence_destination: return DomainStep::fence_destination;
    case RecoveryStep::resume_source: return DomainStep::resume_source;
    case RecoveryStep::destroy_source: return DomainStep::destroy_source;
    case RecoveryStep::record_released: return DomainStep::record_released;
  }
  return DomainStep::fence_destination;
}

}  // namespace

DomainStatus decide_domain(VmStatus generic, const DomainFacts& f) {
  DomainStatus out{std::move(generic), f, false};
  VmStatus& st = out.status;
  if (st.verdict != Verdict::not_migrated) return out;
  const bool untagged = own_placeholder(st) && !st.destination.placeholder->completed();
  if (untagged && f.dest_active && (f.source_migrated_off || f.dest_arrived) &&
      st.source.state == SourceState::gone && !st.destination.aborted) {
    st.verdict = Verdict::in_doubt;
    st.reason =
        "libvirt handed the domain over (the source copy was shut off by its migration) but the placeholder was "
        "never tagged completed: the only copy is " +
        std::string(f.dest_paused ? "paused" : "active") +
        " at the destination; `kvmig recover` completes the migration there";
    out.handed_over = true;
    return out;
  }
  // "Not migrated" would invite resuming a source that may hold nothing: the only copy may be
  // the untagged one at the destination (its source libvirtd down, or its QEMU gone).
  if (untagged && f.dest_active && !source_holds_copy(st)) {
    st.verdict = Verdict::in_doubt;
    st.reason = "an untagged domain of this migration is " + std::string(f.dest_paused ? "paused" : "active") +
                " at the destination and the source copy is " + std::string(source_state_name(st.source.state)) +
                " (" + st.source.detail + "): it may be the only copy";
    return out;
  }
  if (f.source_job) st.reason += "; libvirt's migration job still runs at the source (recover aborts it first)";
  return out;
}

std::string_view domain_step_name(DomainStep step) {
  switch (step) {
    case DomainStep::abort_source_job: return "source migration job aborted";
    case DomainStep::destroy_incoming: return "incoming domain destroyed at the destination";
    case DomainStep::fence_destination: return "placeholder removed, aborted recorded at the destination";
    case DomainStep::resume_source: return "source resumed";
    case DomainStep::tag_completed: return "placeholder tagged completed, completion recorded";
    case DomainStep::destroy_source: return "source copy destroyed and undefined";
    case DomainStep::undefine_source: return "shut-off source definition undefined";
    case DomainStep::record_released: return "source released recorded";
    case DomainStep::resume_destination: return "destination domain resumed";
  }
  return "unknown";
}

DomainPlan plan_domain(const DomainStatus& ds) {
  DomainPlan plan;
  const VmStatus& st = ds.status;
  const DomainFacts& f = ds.facts;
  if (ds.handed_over) {
    plan.steps.push_back(DomainStep::tag_completed);
    if (f.source_leftover) plan.steps.push_back(DomainStep::undefine_source);
    if (!st.source.released) plan.steps.push_back(DomainStep::record_released);
    if (f.dest_paused) plan.steps.push_back(DomainStep::resume_destination);
    return plan;
  }
  RecoveryPlan generic = plan_recovery(st);
  switch (st.verdict) {
    case Verdict::in_doubt: plan.problem = generic.problem; return plan;
    case Verdict::not_migrated:
      // The job may finish (and stop the source) at any moment: nothing else until it is gone.
      if (f.source_job) {
        plan.steps.push_back(DomainStep::abort_source_job);
        return plan;
      }
      if (f.dest_active) {
        if (!source_holds_copy(st)) {
          plan.problem = "an untagged domain of this migration is active at the destination while the source copy is " +
                         std::string(source_state_name(st.source.state)) + " (" + st.source.detail +
                         "): it may be the only copy, nothing done";
          return plan;
        }
        plan.steps.push_back(DomainStep::destroy_incoming);
      }
      for (RecoveryStep s : generic.steps) plan.steps.push_back(domain_step(s));
      plan.problem = generic.problem;
      return plan;
    case Verdict::migrated:
      // The tag says the VM was handed over, but its domain no longer runs there: the VM runs
      // nowhere, or (started again by hand) only at the source, which must then stay.
      if (f.dest_defined && !f.dest_active) {
        if (source_holds_copy(st)) {
          plan.problem = "migrated, but the domain does not run at the destination while the source copy is " +
                         std::string(source_state_name(st.source.state)) + ": nothing destroyed";
          return plan;
        }
        if (f.source_leftover && st.source.state == SourceState::gone) plan.steps.push_back(DomainStep::undefine_source);
        if (!st.source.released && st.source.state != SourceState::unknown)
          plan.steps.push_back(DomainStep::record_released);
        plan.problem = "migrated, but the domain no longer runs at the destination (its QEMU ended after the "
                       "hand-over): it runs nowhere; starting it again is a reboot, an operator's call";
        return plan;
      }
      for (RecoveryStep s : generic.steps) {
        if (s == RecoveryStep::record_released && f.source_leftover && st.source.state == SourceState::gone)
          plan.steps.push_back(DomainStep::undefine_source);
        plan.steps.push_back(domain_step(s));
      }
      plan.problem = generic.problem;
      // Resumed last, once no source copy can run; never while the source's state is unknown.
      if (f.dest_paused && plan.problem.empty()) plan.steps.push_back(DomainStep::resume_destination);
      return plan;
  }
  return plan;
}

Result<SourceFacts> LibvirtSource::inspect(const std::string& migration_id, const std::string& uuid) {
  DomainFacts unused;
  return inspect(migration_id, uuid, unused);
}

Result<SourceFacts> LibvirtSource::inspect(const std::string& migration_id, const std::string& uuid,
                                           DomainFacts& facts) {
  SourceFacts s;
  KVMIG_ASSIGN(s.released, records_.has(RecordKind::source_released, migration_id, uuid));
  if (!unreachable_.empty()) {
    s.detail = "the source's libvirtd cannot be reached: " + unreachable_;
    return s;
  }
  // A daemon that dies while it is asked: the copy's state is unknown, not an error.
  auto found = conn_.by_uuid(uuid);
  if (!found.ok()) {
    s.detail = found.error().message;
    return s;
  }
  LibvirtDomain dom = std::move(*found);
  if (!dom) {
    s.state = SourceState::gone;
    s.detail = "no domain with this UUID at " + conn_.uri();
    return s;
  }
  KVMIG_ASSIGN(std::optional<KvmigMark> mark, LibvirtPlaceholders::mark_of(dom));
  // Matched on migration and UUID: a domain that is some migration's placeholder here, or that
  // came back after this migration released its copy, is not this migration's source copy.
  if (mark && (!mark->has("completed") || mark->migration_id == migration_id)) {
    s.state = SourceState::other;
    s.detail = "the domain with this UUID here arrived by migration " + mark->migration_id +
               ", it is not this migration's source copy";
    return s;
  }
  if (s.released) {
    s.state = SourceState::other;
    s.detail = "released for this migration; domain " + dom.name() + " here now is another copy";
    return s;
  }
  int state = 0, reason = 0;
  if (virDomainGetState(dom.get(), &state, &reason, 0) < 0) return libvirt_error("virDomainGetState " + dom.name());
  switch (state) {
    case VIR_DOMAIN_RUNNING:
    case VIR_DOMAIN_BLOCKED:
    case VIR_DOMAIN_SHUTDOWN: s.state = SourceState::running; break;
    case VIR_DOMAIN_PAUSED: s.state = SourceState::paused; break;
    case VIR_DOMAIN_SHUTOFF:
    case VIR_DOMAIN_CRASHED:
      s.state = SourceState::gone;
      facts.source_leftover = true;
      facts.source_migrated_off = state == VIR_DOMAIN_SHUTOFF && reason == VIR_DOMAIN_SHUTOFF_MIGRATED;
      s.detail = "domain " + dom.name() + " is defined but " +
                 (facts.source_migrated_off ? "shut off by its migration"
                                            : state == VIR_DOMAIN_CRASHED ? "crashed" : "shut off");
      return s;
    default: s.detail = "domain " + dom.name() + " is in libvirt state " + std::to_string(state); return s;
  }
  auto job = job_stats(dom, false);
  if (!job.ok()) {
    s.state = SourceState::unknown;
    s.detail = job.error().message;
    return s;
  }
  if (job->job_type != VIR_DOMAIN_JOB_NONE) {
    const JobStat* op = job->find(VIR_DOMAIN_JOB_OPERATION);
    facts.source_job = !op || op->number == VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT;
    if (facts.source_job) s.detail = "an outgoing migration job runs";
  }
  return s;
}

Result<void> LibvirtSource::resume(const std::string& uuid) {
  KVMIG_ASSIGN(LibvirtDomain dom, conn_.by_uuid(uuid));
  if (!dom) return Error{"resume " + uuid + ": no such domain at " + conn_.uri()};
  KVMIG_ASSIGN(int state, dom.state());
  if (state == VIR_DOMAIN_RUNNING) return ok();
  if (virDomainResume(dom.get()) < 0) return libvirt_error("virDomainResume " + dom.name() + " at " + conn_.uri());
  return ok();
}

Result<void> LibvirtSource::destroy(const std::string& uuid) {
  KVMIG_ASSIGN(LibvirtDomain dom, conn_.by_uuid(uuid));
  if (!dom) return ok();
  KVMIG_ASSIGN(std::optional<KvmigMark> mark, LibvirtPlaceholders::mark_of(dom));
  if (mark && !mark->has("completed"))
    return Error{"domain " + dom.name() + " at " + conn_.uri() + " is the placeholder of migration " +
                 mark->migration_id + ": not a source copy, not destroyed"};
  KVMIG_ASSIGN(bool active, dom.active());
  if (active && virDomainDestroy(dom.get()) < 0) return libvirt_error("virDomainDestroy " + dom.name() + " at " + conn_.uri());
  int persistent = virDomainIsPersistent(dom.get());
  if (persistent < 0) {
    // A transient domain is gone once destroyed.
    if (!libvirt_error_is(VIR_ERR_NO_DOMAIN)) return libvirt_error("virDomainIsPersistent " + dom.name());
    virResetLastError();
    return ok();
  }
  if (persistent && virDomainUndefineFlags(dom.get(), VIR_DOMAIN_UNDEFINE_KEEP_NVRAM) < 0)
    return libvirt_error("virDomainUndefineFlags " + dom.name() + " at " + conn_.uri());
  return ok();
}

Result<void> LibvirtSource::abort_job(const std::string& uuid, int wait_ms) {
  KVMIG_ASSIGN(LibvirtDomain dom, conn_.by_uuid(uuid));
  if (!dom) return ok();
  // "No job" (it finished meanwhile) is not an error: the caller looks again.
  if (virDomainAbortJob(dom.get()) < 0 && !libvirt_error_is(VIR_ERR_OPERATION_INVALID))
    return libvirt_error("virDomainAbortJob " + dom.name() + " at " + conn_.uri());
  virResetLastError();
  for (int waited = 0;; waited += 100) {
    auto job = job_stats(dom, false);
    if (!job.ok() || job->job_type == VIR_DOMAIN_JOB_NONE) return ok();
    if (waited >= wait_ms) return Error{"the migration job of " + dom.name() + " at " + conn_.uri() + " did not end"};
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

namespace {

// This migration's domain at the destination (empty if the domain there is not marked with it).
Result<LibvirtDomain> incoming(const LibvirtConn& dest, const std::string& migration_id, const std::string& uuid,
                               std::optional<KvmigMark>& mark) {
  KVMIG_ASSIGN(LibvirtDomain dom, dest.by_uuid(uuid));
  if (!dom) return dom;
  KVMIG_ASSIGN(mark, LibvirtPlaceholders::mark_of(dom));
  if (!mark || mark->migration_id != migration_id) return LibvirtDomain();
  return dom;
}

Result<void> destination_facts(const LibvirtConn& dest, const std::string& migration_id, const std::string& uuid,
                               DomainFacts& f) {
  std::optional<KvmigMark> mark;
  KVMIG_ASSIGN(LibvirtDomain dom, incoming(dest, migration_id, uuid, mark));
  if (!dom) return ok();
  f.dest_defined = true;
  KVMIG_ASSIGN(f.dest_active, dom.active());
  if (f.dest_active) {
    int state = 0, reason = 0;
    if (virDomainGetState(dom.get(), &state, &reason, 0) < 0) return libvirt_error("virDomainGetState " + dom.name());
    f.dest_paused = state == VIR_DOMAIN_PAUSED;
    // Arrived: not paused for an incoming migration, and no job left. libvirt may refuse job
    // statistics in the middle of an incoming migration: then it has not arrived.
    if (!(f.dest_paused && reason == VIR_DOMAIN_PAUSED_MIGRATION)) {
      auto job = job_stats(dom, false);
      f.dest_arrived = job.ok() && job->job_type == VIR_DOMAIN_JOB_NONE;
    }
  }
  return ok();
}

Result<void> run_step(DomainStep step, const VmStatus& st, LibvirtSites& sites) {
  const std::string& m = st.migration_id;
  const std::string& uuid = st.vm_uuid;
  LibvirtSource source(sites.source, sites.source_records);
  LibvirtPlaceholders dest_store(sites.dest), source_store(sites.source);
  MigrationRecorder dest_recorder(sites.dest_records, dest_store, false);
  MigrationRecorder source_recorder(sites.source_records, source_store, false);
  std::optional<KvmigMark> mark;
  switch (step) {
    case DomainStep::abort_source_job: return source.abort_job(uuid, 30000);
    case DomainStep::destroy_incoming: {
      KVMIG_ASSIGN(LibvirtDomain dom, incoming(sites.dest, m, uuid, mark));
      if (!dom) return ok();
      if (mark->has("completed")) return Error{"the destination's domain is tagged completed: not destroyed"};
      KVMIG_ASSIGN(bool active, dom.active());
      if (active && virDomainDestroy(dom.get()) < 0)
        return libvirt_error("virDomainDestroy " + dom.name() + " at " + sites.dest.uri());
      return ok();
    }
    case DomainStep::fence_destination: return dest_recorder.aborted(m, uuid, "recovered: not migrated");
    case DomainStep::resume_source: return source.resume(uuid);
    case DomainStep::tag_completed: return dest_recorder.completed(m, uuid);
    case DomainStep::destroy_source:
    case DomainStep::undefine_source: return source.destroy(uuid);
    case DomainStep::record_released: return source_recorder.released(m, uuid);
    case DomainStep::resume_destination: {
      KVMIG_ASSIGN(LibvirtDomain dom, incoming(sites.dest, m, uuid, mark));
      if (!dom || !mark->has("completed")) return Error{"no domain of this migration tagged completed at " + sites.dest.uri()};
      KVMIG_ASSIGN(int state, dom.state());
      if (state == VIR_DOMAIN_PAUSED && virDomainResume(dom.get()) < 0)
        return libvirt_error("virDomainResume " + dom.name() + " at " + sites.dest.uri());
      return ok();
    }
  }
  return ok();
}

}  // namespace

Result<std::vector<DomainStatus>> read_domain_status(LibvirtSites& sites, const std::string& migration_id,
                                                     const std::vector<std::string>& extra_vms) {
  std::vector<Record> records;
  if (migration_id.empty()) {
    KVMIG_ASSIGN(records, sites.dest_records.all());
  } else {
    KVMIG_ASSIGN(records, sites.dest_records.for_migration(migration_id));
  }
  LibvirtPlaceholders dest_store(sites.dest);
  KVMIG_ASSIGN(std::vector<Placeholder> placeholders, dest_store.list());
  LibvirtSource source(sites.source, sites.source_records, sites.source_error);
  std::vector<DomainStatus> out;
  for (auto& [key, dest] : gather_destination(records, placeholders, migration_id, extra_vms)) {
    DomainFacts f;
    SourceFacts src;
    if (auto s = source.inspect(key.first, key.second, f); s.ok())
      src = std::move(*s);
    else
      src.detail = s.error().message;
    if (auto r = destination_facts(sites.dest, key.first, key.second, f); !r.ok()) {
      dest.readable = false;
      dest.read_error = r.error().message;
    }
    out.push_back(decide_domain(check_vm(key.first, key.second, dest, src), f));
  }
  return out;
}

RecoveryOutcome recover_domain(const DomainStatus& first, LibvirtSites& sites) {
  RecoveryOutcome out{first.status, {}, {}};
  DomainStatus ds = first;
  for (int round = 0; round < 2; ++round) {
    DomainPlan plan = plan_domain(ds);
    bool look_again = false;
    for (DomainStep step : plan.steps) {
      if (auto r = run_step(step, ds.status, sites); !r.ok()) {
        out.problem = std::string(domain_step_name(step)) + " failed: " + r.error().message;
        return out;
      }
      out.done.emplace_back(domain_step_name(step));
      if (step == DomainStep::abort_source_job) {
        look_again = true;
        break;
      }
    }
    if (!look_again) {
      out.problem = plan.problem;
      return out;
    }
    // The aborted job's incoming domain is being torn down at the destination meanwhile; a
    // domain that changes under libvirt's listing can fail a read. Ask again for a while.
    auto again = read_domain_status(sites, ds.status.migration_id, {ds.status.vm_uuid});
    for (int tries = 0; !again.ok() && tries < 20; ++tries) {
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
      again = read_domain_status(sites, ds.status.migration_id, {ds.status.vm_uuid});
    }
    if (!again.ok()) {
      out.problem = "reading the status again after aborting the job: " + again.error().message;
      return out;
    }
    bool found = false;
    for (DomainStatus& d : *again)
      if (d.status.vm_uuid == ds.status.vm_uuid) ds = std::move(d), found = true;
    if (!found) {
      out.problem = "the domain's status vanished after aborting its job";
      return out;
    }
    out.status = ds.status;
  }
  out.problem = "libvirt's migration job of the domain still runs after it was aborted: nothing more done";
  return out;
}

}  // namespace kvmig::host
