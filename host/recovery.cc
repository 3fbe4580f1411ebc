#include "host/recovery.h"

#include <cerrno>

#include "host/control_server.h"
#include "host/vm_holder.h"

namespace kvmig::host {

Result<std::string> MicroVmSource::control_of(const std::string& uuid) {
  KVMIG_ASSIGN(std::optional<Placeholder> vm, registry_.find(uuid));
  if (!vm) return Error{"vm " + uuid + ": not in the source site's registry"};
  if (vm->control.empty()) return Error{"vm " + uuid + ": no control socket registered at the source"};
  return vm->control;
}

Result<SourceFacts> MicroVmSource::inspect(const std::string& migration_id, const std::string& uuid) {
  SourceFacts f;
  KVMIG_ASSIGN(f.released, records_.has(RecordKind::source_released, migration_id, uuid));
  KVMIG_ASSIGN(std::optional<Placeholder> vm, registry_.find(uuid));
  if (!vm) {
    f.state = SourceState::gone;
    f.detail = "not in the source site's registry";
    return f;
  }
  if (vm->control.empty()) {
    f.detail = "no control socket registered";
    return f;
  }
  auto reply = control_request(vm->control, {{"cmd", "stats"}});
  if (!reply.ok()) {
    // No socket file, or nobody listening on it: the VM's process has ended.
    int e = reply.error().sys_errno;
    f.state = (e == ENOENT || e == ECONNREFUSED) ? SourceState::gone : SourceState::unknown;
    f.detail = reply.error().message;
    return f;
  }
  if (!reply->value("ok", false) || !reply->contains("paused") || !(*reply)["paused"].is_boolean()) {
    f.detail = "unexpected stats reply from " + vm->control;
    return f;
  }
  f.state = (*reply)["paused"].get<bool>() ? SourceState::paused : SourceState::running;
  // The UUID alone does not say it is this migration's copy: the VM may have left for the
  // destination and come back by a later migration. The copy that sent `migration_id` says
  // so (migrate-progress names its last outgoing migration); a copy that never sent it is
  // another one. A process too old to say is taken for this migration's copy.
  auto progress = control_request(vm->control, {{"cmd", "migrate-progress"}});
  const bool names_it = progress.ok() && progress->contains("migration_id") && (*progress)["migration_id"].is_string();
  if (names_it && (*progress)["migration_id"].get<std::string>() == migration_id)
    f.got_done = progress->value("phase", std::string()) == "done";  // DONE read (release may have failed)
  if (names_it && (*progress)["migration_id"].get<std::string>() != migration_id) {
    std::string sent = (*progress)["migration_id"].get<std::string>();
    f.detail = "a VM with this UUID runs here (" + std::string(source_state_name(f.state)) + "), " +
               (sent.empty() ? std::string("never a source") : "last sent by migration " + sent) +
               ": not this migration's copy";
    f.state = SourceState::other;
  }
  return f;
}

Result<void> MicroVmSource::resume(const std::string& uuid) {
  KVMIG_ASSIGN(std::string control, control_of(uuid));
  KVMIG_ASSIGN(nlohmann::json reply, control_request(control, {{"cmd", "resume"}}));
  if (!reply.value("ok", false))
    return Error{"resume " + uuid + ": " + reply.value("error", std::string("refused"))};
  return ok();
}

Result<void> MicroVmSource::destroy(const std::string& uuid) {
  KVMIG_ASSIGN(std::optional<Placeholder> vm, registry_.find(uuid));
  if (!vm) return ok();
  if (!vm->control.empty()) {
    auto reply = control_request(vm->control, {{"cmd", "stop"}, {"status", 0}});
    if (reply.ok() && !reply->value("ok", false))
      return Error{"stop " + uuid + ": " + reply->value("error", std::string("refused"))};
    int e = reply.ok() ? 0 : reply.error().sys_errno;
    // A process that closes the socket while stopping is fine; one we cannot ask is not.
    if (!reply.ok() && e != ENOENT && e != ECONNREFUSED && e != 0 && e != ECONNRESET && e != EPIPE)
      return Error{"stop " + uuid + ": " + reply.error().message};
  }
  KVMIG_TRY(registry_.unregister(uuid));
  return ok();
}

Result<std::vector<VmStatus>> read_status(SiteRecords& destination, PlaceholderStore& placeholders,
                                          SourceActions* source, const std::string& migration_id,
                                          const std::vector<std::string>& extra_vms) {
  std::vector<Record> records;
  if (migration_id.empty()) {
    KVMIG_ASSIGN(records, destination.all());
  } else {
    KVMIG_ASSIGN(records, destination.for_migration(migration_id));
  }
  KVMIG_ASSIGN(std::vector<Placeholder> all, placeholders.list());
  auto facts = gather_destination(records, all, migration_id, extra_vms);
  std::vector<VmStatus> out;
  out.reserve(facts.size());
  for (auto& [key, dest] : facts) {
    // Liveness matters only for a tagged placeholder of this migration: one probe each.
    if (dest.placeholder && dest.placeholder->migration_id == key.first && dest.placeholder->completed()) {
      HolderProbe h = probe_holder(destination.db().dir(), key.second);
      dest.copy_detail = h.detail;
      if (h.state == HolderProbe::gone) {
        dest.copy = CopyLiveness::gone;
      } else if (h.state == HolderProbe::alive) {
        // Held by a process that names another migration: not this migration's copy, and not
        // proof that it is gone either.
        dest.copy = h.migration_id.empty() || h.migration_id == key.first ? CopyLiveness::alive : CopyLiveness::unknown;
      }
    }
    SourceFacts src;
    if (source) {
      auto s = source->inspect(key.first, key.second);
      if (s.ok())
        src = *s;
      else
        src.detail = s.error().message;
    } else {
      src.detail = "source not asked";
    }
    out.push_back(check_vm(key.first, key.second, dest, src));
  }
  return out;
}

std::vector<VmStatus> unreadable_status(const std::string& migration_id, const std::vector<std::string>& vms,
                                        const std::string& why) {
  std::vector<VmStatus> out;
  DestinationFacts d;
  d.readable = false;
  d.read_error = why;
  for (const std::string& vm : vms) out.push_back(check_vm(migration_id, vm, d, SourceFacts{}));
  return out;
}

std::string_view recovery_step_name(RecoveryStep step) {
  switch (step) {
    case RecoveryStep::fence_destination: return "placeholder removed, aborted recorded at the destination";
    case RecoveryStep::resume_source: return "source resumed";
    case RecoveryStep::destroy_source: return "source copy destroyed";
    case RecoveryStep::record_released: return "source released recorded";
  }
  return "unknown";
}

RecoveryPlan plan_recovery(const VmStatus& st) {
  RecoveryPlan plan;
  switch (st.verdict) {
    case Verdict::in_doubt:
      plan.problem = "in doubt, nothing done: " + st.reason;
      return plan;
    case Verdict::not_migrated:
      // Fence even without a started record: a destination that is merely slow must find
      // the aborted record and refuse to start this migration later.
      plan.steps.push_back(RecoveryStep::fence_destination);
      switch (st.source.state) {
        case SourceState::paused: plan.steps.push_back(RecoveryStep::resume_source); break;
        case SourceState::running: break;
        case SourceState::gone:
          plan.problem = "not migrated, and the source copy is gone: the VM runs nowhere";
          break;
        case SourceState::other: break;  // the VM runs at the source as a later copy: leave it
        case SourceState::unknown:
          plan.problem = "not migrated, but the source copy's state is unknown (" + st.source.detail +
                         "): resume it by hand if it is paused";
          break;
      }
      return plan;
    case Verdict::migrated:
      if (st.source.state == SourceState::running || st.source.state == SourceState::paused)
        plan.steps.push_back(RecoveryStep::destroy_source);
      else if (st.source.state == SourceState::unknown)
        plan.problem = "migrated, but the source copy's state is unknown (" + st.source.detail +
                       "): make sure it is destroyed";
      if (!st.source.released && st.source.state != SourceState::unknown)
        plan.steps.push_back(RecoveryStep::record_released);
      return plan;
  }
  return plan;
}

RecoveryOutcome recover_vm(const VmStatus& st, MigrationRecorder& destination, SourceActions& source,
                           MigrationRecorder& source_recorder) {
  RecoveryOutcome out{st, {}, {}};
  RecoveryPlan plan = plan_recovery(st);
  for (RecoveryStep step : plan.steps) {
    Result<void> r;
    switch (step) {
      case RecoveryStep::fence_destination:
        r = destination.aborted(st.migration_id, st.vm_uuid, "recovered: not migrated");
        break;
      case RecoveryStep::resume_source: r = source.resume(st.vm_uuid); break;
      case RecoveryStep::destroy_source: r = source.destroy(st.vm_uuid); break;
      case RecoveryStep::record_released: r = source_recorder.released(st.migration_id, st.vm_uuid); break;
    }
    if (!r.ok()) {
      out.problem = std::string(recovery_step_name(step)) + " failed: " + r.error().message;
      return out;
    }
    out.done.emplace_back(recovery_step_name(step));
  }
  out.problem = plan.problem;
  return out;
}

std::string resume_source_refusal(const VmStatus& st) {
  const DestinationFacts& d = st.destination;
  if (st.verdict != Verdict::in_doubt) return "not in doubt (" + std::string(verdict_name(st.verdict)) + "): use plain `kvmig recover`";
  if (!d.readable) return "the destination site is unreadable";
  if (!d.placeholder || d.placeholder->migration_id != st.migration_id || !d.placeholder->completed())
    return "no tagged placeholder of this migration at the destination";
  if (d.copy != CopyLiveness::gone)
    return "the destination copy is not known gone (" + std::string(copy_liveness_name(d.copy)) + ")";
  if (st.source.released || st.source.got_done) return "the source got DONE: the VM ran at the destination";
  if (st.source.state != SourceState::paused)
    return "the source does not hold a paused copy of this migration (" + std::string(source_state_name(st.source.state)) + ")";
  return {};
}

RecoveryOutcome resume_source_vm(const VmStatus& st, SiteRecords& destination, MicroVmRegistry& store,
                                 SourceActions& source) {
  RecoveryOutcome out{st, {}, {}};
  out.problem = resume_source_refusal(st);
  if (!out.problem.empty()) {
    out.problem = "--resume-source refused: " + out.problem;
    return out;
  }
  auto fence = [&]() -> Result<void> {
    // Nobody may take the VM at the destination while it is fenced; lock_if_gone fails if a
    // live process holds it after all (the status was read a moment ago).
    KVMIG_ASSIGN(Fd hold, lock_if_gone(destination.db().dir(), st.vm_uuid));
    Transaction tx(destination.db());
    KVMIG_TRY(tx.begun());
    KVMIG_ASSIGN(bool removed, store.revoke_completed(st.vm_uuid, st.migration_id));
    if (!removed) return Error{"the tagged placeholder changed meanwhile: read the status again"};
    KVMIG_TRY(destination.append(RecordKind::aborted, st.migration_id, st.vm_uuid,
                                 "recovered: tagged copy gone, source resumed by the operator"));
    return tx.commit();
  };
  if (auto r = fence(); !r.ok()) {
    out.problem = "fencing the destination's tagged placeholder failed: " + r.error().message;
    return out;
  }
  out.done.emplace_back("tagged placeholder removed, aborted recorded at the destination");
  if (auto r = source.resume(st.vm_uuid); !r.ok()) {
    out.problem = std::string(recovery_step_name(RecoveryStep::resume_source)) + " failed: " + r.error().message;
    return out;
  }
  out.done.emplace_back(recovery_step_name(RecoveryStep::resume_source));
  return out;
}

}  // namespace kvmig::host
