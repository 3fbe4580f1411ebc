// Placeholders: before a VM moves, the destination creates a placeholder VM with the source
// VM's UUID; on completion it tags the placeholder with the migration-completed event before
// the VM runs there. The status checker asks the store for the placeholder by UUID.
//
// PlaceholderStore is the one interface for every kind of VM: MicroVmRegistry (the site's VM
// registry table, below) now; libvirt (an inactive domain with the same UUID and name, the
// events in kvmig's metadata element) behind the same calls later.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "host/site_db.h"

namespace kvmig::host {

enum class VmEntryState {
  placeholder,  // created for an incoming migration, not (yet) completed
  completed,    // tagged with the migration-completed event: the VM runs here
  running,      // a VM of this site that did not arrive by migration (a source candidate)
};

struct Placeholder {
  std::string uuid;
  std::string name;
  std::string migration_id;  // empty for a VM that did not arrive by migration
  VmEntryState state = VmEntryState::placeholder;
  int64_t created_ms = 0;
  int64_t completed_ms = 0;  // 0 until tagged
  std::string control;       // micro-VMs: the control socket of the running VM, if known

  bool completed() const { return state == VmEntryState::completed; }
};

std::string_view vm_entry_state_name(VmEntryState state);

class PlaceholderStore {
 public:
  virtual ~PlaceholderStore() = default;
  virtual std::string_view kind() const = 0;

  // Creates the placeholder of `uuid` for `migration_id`. Repeating the call for the same
  // migration is fine; a VM with that UUID here for any other reason is an error (two VMs
  // must never share a UUID at one site). MicroVmRegistry replaces a stale `running` row
  // (its process gone, the VM released from here since): the VM may come back.
  virtual Result<void> create(const std::string& uuid, const std::string& name,
                              const std::string& migration_id) = 0;
  virtual Result<std::optional<Placeholder>> find(const std::string& uuid) = 0;
  // Every VM this store knows at the site (placeholders, completed and local ones). One
  // read, so that status over thousands of VMs stays fast.
  virtual Result<std::vector<Placeholder>> list() = 0;
  // Tags the placeholder with the completed event. Fails unless an untagged (or already
  // tagged) placeholder of exactly this migration exists: a placeholder removed by `kvmig
  // recover` must stop a late destination from running the VM.
  virtual Result<void> mark_completed(const std::string& uuid, const std::string& migration_id) = 0;
  // Removes the untagged placeholder of this migration. false: there was none. An error if
  // it is tagged completed: the VM is the real one here and must not be removed.
  virtual Result<bool> remove(const std::string& uuid, const std::string& migration_id) = 0;
};

// Micro-VM placeholders: rows of the site's `vms` table, in the same database as the
// records, so a placeholder change and its record commit together.
class MicroVmRegistry : public PlaceholderStore {
 public:
  explicit MicroVmRegistry(SiteDb& db) : db_(db) {}
  std::string_view kind() const override { return "microvm"; }
  Result<void> create(const std::string& uuid, const std::string& name, const std::string& migration_id) override;
  Result<std::optional<Placeholder>> find(const std::string& uuid) override;
  Result<std::vector<Placeholder>> list() override;
  Result<void> mark_completed(const std::string& uuid, const std::string& migration_id) override;
  Result<bool> remove(const std::string& uuid, const std::string& migration_id) override;

  // The VM registry proper: a VM running at this site (state `running`), or the control
  // socket of one that arrived (state `completed`). The recovery's source actions find a
  // micro-VM's control socket here.
  Result<void> register_running(const std::string& uuid, const std::string& name, const std::string& control);
  Result<void> set_control(const std::string& uuid, const std::string& control);
  // Forgets a VM (the source's copy once released). false: it was not registered.
  Result<bool> unregister(const std::string& uuid);
  // Removes the *tagged* placeholder of this migration: only for `kvmig recover
  // --resume-source`, once the copy it stood for is known gone (host/recovery.h). false: none.
  Result<bool> revoke_completed(const std::string& uuid, const std::string& migration_id);

 private:
  // A `running` row whose process is gone (control socket dead) and whose VM this site
  // recorded released since: the copy moved away and its process died before removing the
  // row. create() replaces such a row; never a live one.
  Result<bool> stale_running(const Placeholder& row);
  SiteDb& db_;
};

}  // namespace kvmig::host
