#include "host/status_checker.h"

#include <unordered_map>

namespace kvmig::host {

std::string_view verdict_name(Verdict v) {
  switch (v) {
    case Verdict::migrated: return "migrated";
    case Verdict::not_migrated: return "not-migrated";
    case Verdict::in_doubt: return "in-doubt";
  }
  return "in-doubt";
}

std::string_view source_state_name(SourceState s) {
  switch (s) {
    case SourceState::unknown: return "unknown";
    case SourceState::running: return "running";
    case SourceState::paused: return "paused";
    case SourceState::gone: return "gone";
    case SourceState::other: return "other-copy";
  }
  return "unknown";
}

std::string_view copy_liveness_name(CopyLiveness c) {
  switch (c) {
    case CopyLiveness::unknown: return "unknown";
    case CopyLiveness::alive: return "alive";
    case CopyLiveness::gone: return "gone";
  }
  return "unknown";
}

namespace {

VmStatus verdict(VmStatus st, Verdict v, std::string reason) {
  st.verdict = v;
  st.reason = std::move(reason);
  return st;
}

}  // namespace

VmStatus check_vm(const std::string& migration_id, const std::string& vm_uuid, const DestinationFacts& d,
                  const SourceFacts& s) {
  VmStatus st{migration_id, vm_uuid, Verdict::in_doubt, {}, s, d};
  if (!d.readable)
    return verdict(std::move(st), Verdict::in_doubt, "destination site unreadable: " + d.read_error);

  // The placeholder counts only if it is this migration's: a VM with the same UUID that came
  // by another migration (or lives there) says nothing about this one.
  const bool own_placeholder = d.placeholder && d.placeholder->migration_id == migration_id;
  const bool tagged = own_placeholder && d.placeholder->completed();

  // Step 1: the migration-started record, written before any data of the VM moved.
  if (!d.started) {
    if (own_placeholder)
      return verdict(std::move(st), Verdict::in_doubt,
                     "placeholder of this migration without a migration-started record: records inconsistent");
    if (s.released)
      return verdict(std::move(st), Verdict::in_doubt,
                     "the source released its copy, but the destination never recorded this migration");
    return verdict(std::move(st), Verdict::not_migrated,
                   "no migration-started record at the destination: nothing of the VM moved");
  }
  // Step 2: a placeholder with the same UUID.
  if (!own_placeholder) {
    // `kvmig recover --resume-source` removed a tagged placeholder whose copy it found gone and
    // recorded the abort after the completion, in one transaction, before resuming the source.
    if (d.completed_record && d.aborted_after_completion && !s.released && !s.got_done)
      return verdict(std::move(st), Verdict::not_migrated,
                     "the destination's tagged copy was found gone and fenced (aborted after completion): "
                     "the source copy is the VM");
    if (d.completed_record || s.released)
      return verdict(std::move(st), Verdict::in_doubt,
                     std::string(d.completed_record ? "completion recorded" : "the source released its copy") +
                         ", but no placeholder with this UUID at the destination");
    std::string why = "migration started, but no placeholder with this UUID at the destination";
    if (d.placeholder)
      why += " (a VM with this UUID there belongs to " +
             (d.placeholder->migration_id.empty() ? std::string("no migration") : "migration " + d.placeholder->migration_id) +
             ")";
    else if (d.aborted)
      why += " (aborted and removed)";
    return verdict(std::move(st), Verdict::not_migrated, why);
  }
  // Step 3: the placeholder carries the migration-completed event.
  if (!tagged) {
    if (d.completed_record)
      return verdict(std::move(st), Verdict::in_doubt,
                     "completion recorded, but the placeholder does not carry the completed event");
    if (s.released)
      return verdict(std::move(st), Verdict::in_doubt,
                     "the source released its copy, but the placeholder was never tagged completed");
    return verdict(std::move(st), Verdict::not_migrated,
                   "placeholder not tagged completed: the VM never ran at the destination");
  }
  if (d.aborted)
    return verdict(std::move(st), Verdict::in_doubt, "both aborted and completed are recorded for this VM");
  std::string why = "migration-started record, placeholder, completed event";
  if (d.copy == CopyLiveness::gone) {
    // The process that received this migration has ended. DONE is sent only after the vCPUs
    // start, so a source that got it proves the VM ran there: it ended after the move.
    if (s.released || s.got_done)
      return verdict(std::move(st), Verdict::migrated,
                     why + "; the destination copy is not running (the VM ended after the move: nothing to resume)" +
                         (s.state == SourceState::running || s.state == SourceState::paused
                              ? "; the source copy still exists (" + std::string(source_state_name(s.state)) +
                                    "): recover destroys it"
                              : std::string()));
    // Without DONE the destination may have died before its first vCPU run, or just after it
    // (the vCPUs start before DONE is sent): the records cannot tell, so nothing is automatic.
    // A control socket on the row was registered after the VM ran: then it did run.
    const bool ran = !d.placeholder->control.empty();
    std::string gone = ran ? "destination copy is gone; it ran (its control socket was registered), but the "
                             "source never got DONE"
                           : "destination copy is gone; it may never have run (tagged completed, its process "
                             "ended, the source never got DONE)";
    switch (s.state) {
      case SourceState::paused:
        return verdict(std::move(st), Verdict::in_doubt,
                       gone + "; the source holds the paused copy: `kvmig recover --resume-source` resumes it" +
                           (ran ? " (the VM then goes back to the switch-over)" : ""));
      case SourceState::running:
        return verdict(std::move(st), Verdict::in_doubt, gone + "; the source copy runs (resumed by hand?)");
      case SourceState::gone:
        return verdict(std::move(st), Verdict::in_doubt, gone + "; the source copy is gone too: the VM runs nowhere");
      case SourceState::other:
        return verdict(std::move(st), Verdict::in_doubt, gone + "; the VM at the source is not this migration's copy");
      case SourceState::unknown:
        return verdict(std::move(st), Verdict::in_doubt,
                       gone + "; the source copy's state is unknown" +
                           (s.detail.empty() ? std::string() : " (" + s.detail + ")"));
    }
  }
  if (d.copy == CopyLiveness::alive) why += "; the destination copy is alive";
  if (s.state == SourceState::running || s.state == SourceState::paused)
    why += "; the source copy still exists (" + std::string(source_state_name(s.state)) + "): recover destroys it";
  return verdict(std::move(st), Verdict::migrated, why);
}

nlohmann::json to_json(const VmStatus& st) {
  nlohmann::json placeholder = nullptr;
  if (const auto& p = st.destination.placeholder)
    placeholder = {{"uuid", p->uuid},
                   {"name", p->name},
                   {"migration_id", p->migration_id},
                   {"state", vm_entry_state_name(p->state)},
                   {"created_ms", p->created_ms},
                   {"completed_ms", p->completed_ms}};
  return {{"migration_id", st.migration_id},
          {"vm_uuid", st.vm_uuid},
          {"verdict", verdict_name(st.verdict)},
          {"reason", st.reason},
          {"destination",
           {{"readable", st.destination.readable},
            {"started", st.destination.started},
            {"placeholder", placeholder},
            {"completed_record", st.destination.completed_record},
            {"aborted", st.destination.aborted},
            {"copy", copy_liveness_name(st.destination.copy)},
            {"copy_detail", st.destination.copy_detail}}},
          {"source",
           {{"state", source_state_name(st.source.state)},
            {"released", st.source.released},
            {"got_done", st.source.got_done},
            {"detail", st.source.detail}}}};
}

std::map<VmKey, DestinationFacts> gather_destination(const std::vector<Record>& records,
                                                     const std::vector<Placeholder>& placeholders,
                                                     const std::string& only_migration,
                                                     const std::vector<std::string>& extra_vms) {
  std::map<VmKey, DestinationFacts> out;
  for (const Record& r : records) {
    if (!only_migration.empty() && r.migration_id != only_migration) continue;
    DestinationFacts& f = out[{r.migration_id, r.vm_uuid}];
    switch (r.kind) {  // in seq order: an abort after the completion is a fence of a tagged copy
      case RecordKind::migration_started: f.started = true; break;
      case RecordKind::migration_completed:
        f.completed_record = true;
        f.completed_ms = r.at_ms;
        break;
      case RecordKind::aborted:
        f.aborted = true;
        if (f.completed_record) f.aborted_after_completion = true;
        break;
      case RecordKind::placeholder_created:
      case RecordKind::source_released: break;
    }
  }
  if (!only_migration.empty())
    for (const std::string& vm : extra_vms) out.try_emplace({only_migration, vm});
  std::unordered_map<std::string, const Placeholder*> by_uuid;
  by_uuid.reserve(placeholders.size());
  for (const Placeholder& p : placeholders) by_uuid.emplace(p.uuid, &p);
  for (auto& [key, facts] : out) {
    auto it = by_uuid.find(key.second);
    if (it != by_uuid.end()) facts.placeholder = *it->second;
  }
  return out;
}

}  // namespace kvmig::host
