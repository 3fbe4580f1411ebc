#include "host/placeholder_registry.h"

#include "host/site_records.h"
#include "host/vm_holder.h"

namespace kvmig::host {

namespace {

constexpr const char* kColumns = "uuid, name, COALESCE(migration_id, ''), state, created_ms, "
                                 "COALESCE(completed_ms, 0), control";

std::optional<VmEntryState> state_from_name(const std::string& name) {
  if (name == "placeholder") return VmEntryState::placeholder;
  if (name == "completed") return VmEntryState::completed;
  if (name == "running") return VmEntryState::running;
  return std::nullopt;
}

Result<Placeholder> read_row(Statement& s) {
  Placeholder p;
  p.uuid = s.text(0);
  p.name = s.text(1);
  p.migration_id = s.text(2);
  auto state = state_from_name(s.text(3));
  if (!state) return Error{"vms row " + p.uuid + ": unknown state '" + s.text(3) + "'"};
  p.state = *state;
  p.created_ms = s.integer(4);
  p.completed_ms = s.integer(5);
  p.control = s.text(6);
  return p;
}

}  // namespace

std::string_view vm_entry_state_name(VmEntryState state) {
  switch (state) {
    case VmEntryState::placeholder: return "placeholder";
    case VmEntryState::completed: return "completed";
    case VmEntryState::running: return "running";
  }
  return "unknown";
}

Result<void> MicroVmRegistry::create(const std::string& uuid_in, const std::string& name,
                                     const std::string& migration_id) {
  KVMIG_ASSIGN(std::string uuid, canonical_uuid(uuid_in));
  KVMIG_TRY(check_migration_id(migration_id));
  Transaction tx(db_);
  KVMIG_TRY(tx.begun());
  KVMIG_ASSIGN(std::optional<Placeholder> have, find(uuid));
  if (have && have->state == VmEntryState::running) {
    KVMIG_ASSIGN(bool stale, stale_running(*have));
    if (stale) {
      KVMIG_TRY(unregister(uuid));
      have.reset();
    }
  }
  if (have) {
    if (have->migration_id == migration_id && have->state != VmEntryState::running) return tx.commit();
    return Error{"placeholder " + uuid + ": a VM with this UUID is already here (" +
                 std::string(vm_entry_state_name(have->state)) +
                 (have->migration_id.empty() ? std::string() : ", migration " + have->migration_id) + ")"};
  }
  KVMIG_ASSIGN(Statement * s, db_.prepare("INSERT INTO vms(uuid, name, state, migration_id, created_ms) "
                                          "VALUES (?1, ?2, 'placeholder', ?3, ?4)"));
  s->bind(1, uuid).bind(2, name.empty() ? uuid : name).bind(3, migration_id).bind(4, now_ms());
  if (auto r = s->run(); !r.ok()) return std::move(r.error().prefix("placeholder " + uuid));
  return tx.commit();
}

Result<bool> MicroVmRegistry::stale_running(const Placeholder& row) {
  // Its process is gone. The holder lock cannot say so here: the caller, a receiving process,
  // holds that lock itself already (taking it refused any live holder). What is left to ask is
  // the control socket, for a row of a process that predates holders or held nothing.
  if (row.control.empty() || !control_socket_dead(row.control)) return false;
  // And it left by migration: released here after the row was made. A VM that merely crashed
  // here is not replaced by an incoming copy of the same UUID without an operator.
  KVMIG_ASSIGN(Statement * s, db_.prepare("SELECT 1 FROM records WHERE vm_uuid = ?1 AND kind = 'source_released' "
                                          "AND at_ms >= ?2 LIMIT 1"));
  s->bind(1, row.uuid).bind(2, row.created_ms);
  auto found = s->step();
  s->reset();
  return found;
}

Result<std::optional<Placeholder>> MicroVmRegistry::find(const std::string& uuid) {
  static const std::string sql = std::string("SELECT ") + kColumns + " FROM vms WHERE uuid = ?1";
  KVMIG_ASSIGN(Statement * s, db_.prepare(sql.c_str()));
  s->bind(1, uuid);
  auto row = s->step();
  if (!row.ok() || !*row) {
    s->reset();
    if (!row.ok()) return std::move(row.error());
    return std::optional<Placeholder>();
  }
  auto p = read_row(*s);
  s->reset();
  if (!p.ok()) return std::move(p.error());
  return std::optional<Placeholder>(std::move(*p));
}

Result<std::vector<Placeholder>> MicroVmRegistry::list() {
  static const std::string sql = std::string("SELECT ") + kColumns + " FROM vms";
  KVMIG_ASSIGN(Statement * s, db_.prepare(sql.c_str()));
  std::vector<Placeholder> out;
  for (;;) {
    auto row = s->step();
    if (!row.ok() || !*row) {
      s->reset();
      if (!row.ok()) return std::move(row.error());
      break;
    }
    auto p = read_row(*s);
    if (!p.ok()) {
      s->reset();
      return std::move(p.error());
    }
    out.push_back(std::move(*p));
  }
  return out;
}

Result<void> MicroVmRegistry::mark_completed(const std::string& uuid, const std::string& migration_id) {
  // One conditional UPDATE: whoever commits first, this or recover's remove(), wins, and
  // the other sees zero rows changed.
  KVMIG_ASSIGN(Statement * s, db_.prepare("UPDATE vms SET state = 'completed', completed_ms = ?3 "
                                          "WHERE uuid = ?1 AND migration_id = ?2 AND state = 'placeholder'"));
  s->bind(1, uuid).bind(2, migration_id).bind(3, now_ms());
  KVMIG_ASSIGN(int changed, s->run());
  if (changed == 1) return ok();
  KVMIG_ASSIGN(std::optional<Placeholder> have, find(uuid));
  if (have && have->migration_id == migration_id && have->completed()) return ok();  // repeated call
  return Error{"placeholder " + uuid + " of migration " + migration_id +
               (have ? " is " + std::string(vm_entry_state_name(have->state)) + " of migration '" +
                           have->migration_id + "'"
                     : " is gone (removed by recovery?)") +
               ": the VM must not run here"};
}

Result<bool> MicroVmRegistry::remove(const std::string& uuid, const std::string& migration_id) {
  KVMIG_ASSIGN(Statement * s, db_.prepare("DELETE FROM vms WHERE uuid = ?1 AND migration_id = ?2 "
                                          "AND state = 'placeholder'"));
  s->bind(1, uuid).bind(2, migration_id);
  KVMIG_ASSIGN(int changed, s->run());
  if (changed == 1) return true;
  KVMIG_ASSIGN(std::optional<Placeholder> have, find(uuid));
  if (have && have->migration_id == migration_id && have->completed())
    return Error{"placeholder " + uuid + " of migration " + migration_id +
                 " is tagged completed: the VM runs here and is not removed"};
  return false;
}

Result<void> MicroVmRegistry::register_running(const std::string& uuid_in, const std::string& name,
                                               const std::string& control) {
  KVMIG_ASSIGN(std::string uuid, canonical_uuid(uuid_in));
  KVMIG_ASSIGN(Statement * s, db_.prepare("INSERT INTO vms(uuid, name, state, control, created_ms) "
                                          "VALUES (?1, ?2, 'running', ?3, ?4) "
                                          "ON CONFLICT(uuid) DO UPDATE SET control = excluded.control "
                                          "WHERE state = 'running'"));
  s->bind(1, uuid).bind(2, name.empty() ? uuid : name).bind(3, control).bind(4, now_ms());
  KVMIG_ASSIGN(int changed, s->run());
  if (changed == 0) return Error{"vm " + uuid + ": registered here already as an incoming placeholder"};
  return ok();
}

Result<void> MicroVmRegistry::set_control(const std::string& uuid, const std::string& control) {
  KVMIG_ASSIGN(Statement * s, db_.prepare("UPDATE vms SET control = ?2 WHERE uuid = ?1"));
  s->bind(1, uuid).bind(2, control);
  KVMIG_ASSIGN(int changed, s->run());
  if (changed == 0) return Error{"vm " + uuid + ": not in this site's registry"};
  return ok();
}

Result<bool> MicroVmRegistry::revoke_completed(const std::string& uuid, const std::string& migration_id) {
  KVMIG_ASSIGN(Statement * s, db_.prepare("DELETE FROM vms WHERE uuid = ?1 AND migration_id = ?2 "
                                          "AND state = 'completed'"));
  s->bind(1, uuid).bind(2, migration_id);
  KVMIG_ASSIGN(int changed, s->run());
  return changed == 1;
}

Result<bool> MicroVmRegistry::unregister(const std::string& uuid) {
  KVMIG_ASSIGN(Statement * s, db_.prepare("DELETE FROM vms WHERE uuid = ?1"));
  s->bind(1, uuid);
  KVMIG_ASSIGN(int changed, s->run());
  return changed == 1;
}

}  // namespace kvmig::host
