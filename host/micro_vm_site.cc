#include "host/micro_vm_site.h"

#include <uuid/uuid.h>

#include <cstring>

#include "helper/fault_point.h"
#include "host/control_server.h"

namespace kvmig::host {

Result<std::array<uint8_t, 16>> uuid_bytes(std::string_view text) {
  KVMIG_ASSIGN(std::string canonical, canonical_uuid(text));
  uuid_t u;
  if (uuid_parse(canonical.c_str(), u) != 0) return Error{"'" + std::string(text) + "' is not a UUID"};
  std::array<uint8_t, 16> out{};
  std::memcpy(out.data(), u, out.size());
  return out;
}

MicroVmSite::MicroVmSite(std::unique_ptr<SiteDb> db)
    : db_(std::move(db)), records_(*db_), registry_(*db_), recorder_(records_, registry_, true) {}

Result<std::unique_ptr<MicroVmSite>> MicroVmSite::open(const std::string& dir) {
  auto db = SiteDb::open(dir, false);
  if (!db.ok()) {
    db.error().message += " (create the site with `kvmig site init " + dir + "`)";
    return std::move(db.error());
  }
  return std::unique_ptr<MicroVmSite>(new MicroVmSite(std::move(*db)));
}

Result<void> MicroVmSite::register_running(const std::string& uuid_in, const std::string& name,
                                           const std::string& control) {
  KVMIG_ASSIGN(std::string uuid, canonical_uuid(uuid_in));
  std::lock_guard lock(mu_);
  KVMIG_ASSIGN(std::optional<Placeholder> have, registry_.find(uuid));
  // register_running() takes over a running row; that is right for a stale row left by a
  // process that died, wrong for one whose VM still answers: one UUID, one VM per site.
  if (have && have->state == VmEntryState::running && !have->control.empty() && have->control != control) {
    auto alive = control_request(have->control, {{"cmd", "stats"}});
    if (alive.ok())
      return Error{"vm " + uuid + " already runs at site " + db_->dir() + " (control socket " + have->control + ")"};
  }
  // The hold first: a live holder refuses the UUID even when its control socket is gone.
  if (!holder_.held()) {
    KVMIG_ASSIGN(holder_, VmHolder::take(db_->dir(), uuid, ""));
  }
  if (auto r = registry_.register_running(uuid, name, control); !r.ok()) {
    holder_.release();
    return std::move(r.error().prefix("site " + db_->dir()));
  }
  uuid_ = uuid;
  control_ = control;
  return ok();
}

Result<void> MicroVmSite::set_control(const std::string& control) {
  std::lock_guard lock(mu_);
  if (uuid_.empty()) return Error{"site " + db_->dir() + ": no VM received yet"};
  KVMIG_TRY(registry_.set_control(uuid_, control));
  control_ = control;
  return ok();
}

void MicroVmSite::leave() {
  std::lock_guard lock(mu_);
  if (uuid_.empty()) return;
  auto have = registry_.find(uuid_);
  // Only our own running row: a completed placeholder is the proof the VM arrived, and a row
  // whose control socket changed belongs to whoever took the UUID over since.
  if (have.ok() && *have && (*have)->state == VmEntryState::running && (*have)->control == control_)
    (void)registry_.unregister(uuid_);
  holder_.release();  // after the row: whoever sees the hold gone sees the row gone too
}

std::string MicroVmSite::uuid() {
  std::lock_guard lock(mu_);
  return uuid_;
}

Result<void> MicroVmSite::on_started(const helper::SessionVm& vm) {
  {
    std::lock_guard lock(mu_);
    // Held before the started record: from then on, until this process ends, the status
    // checker can tell this destination's copy is alive even before it runs.
    if (!holder_.held()) {
      KVMIG_ASSIGN(holder_, VmHolder::take(db_->dir(), uuid_text(vm.uuid), vm.migration_id));
    }
    KVMIG_TRY(recorder_.on_started(vm));
    uuid_ = uuid_text(vm.uuid);
  }
  helper::fault_point("destination", "hello");  // test hook (helper/fault_point.h)
  return ok();
}

Result<void> MicroVmSite::on_round(const helper::SessionVm& vm) {
  std::lock_guard lock(mu_);
  return recorder_.on_round(vm);
}

Result<void> MicroVmSite::on_completed(const helper::SessionVm& vm) {
  helper::fault_point("destination", "commit");  // test hook (helper/fault_point.h)
  {
    std::lock_guard lock(mu_);
    KVMIG_TRY(recorder_.on_completed(vm));
  }
  // Tagged and durable, the first vCPU run still ahead: the window in which the records say
  // "migrated" while the only copy that ever ran is the paused source.
  helper::fault_point("destination", "tagged");  // test hook (helper/fault_point.h)
  return ok();
}

Result<void> MicroVmSite::on_aborted(const helper::SessionVm& vm, const std::string& reason) {
  std::lock_guard lock(mu_);
  return recorder_.on_aborted(vm, reason);
}

Result<void> MicroVmSite::on_released(const helper::SessionVm& vm) {
  std::lock_guard lock(mu_);
  // The row stays until this process ends (leave()): the released copy still exists, paused,
  // until `kvmig migrate` sends migrate-finish, and if that command died, `kvmig recover`
  // must still find the copy here to end it.
  return recorder_.on_released(vm);
}

}  // namespace kvmig::host
