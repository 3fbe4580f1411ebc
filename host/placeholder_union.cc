#include "host/placeholder_union.h"

#include <set>

namespace kvmig::host {

Result<PlaceholderStore*> PlaceholderUnion::holder(const std::string& uuid) {
  PlaceholderStore* found = nullptr;
  for (PlaceholderStore* s : stores_) {
    KVMIG_ASSIGN(std::optional<Placeholder> p, s->find(uuid));
    if (!p) continue;
    if (found)
      return Error{"VM " + uuid + " is both a " + std::string(found->kind()) + " and a " + std::string(s->kind()) +
                   " VM at this site"};
    found = s;
  }
  return found;
}

Result<void> PlaceholderUnion::create(const std::string& uuid, const std::string& name,
                                      const std::string& migration_id) {
  if (stores_.empty()) return Error{"no placeholder store"};
  KVMIG_ASSIGN(PlaceholderStore * have, holder(uuid));
  return (have ? have : stores_.front())->create(uuid, name, migration_id);
}

Result<std::optional<Placeholder>> PlaceholderUnion::find(const std::string& uuid) {
  KVMIG_ASSIGN(PlaceholderStore * have, holder(uuid));
  if (!have) return std::optional<Placeholder>();
  return have->find(uuid);
}

Result<std::vector<Placeholder>> PlaceholderUnion::list() {
  std::vector<Placeholder> out;
  std::set<std::string> seen;
  for (PlaceholderStore* s : stores_) {
    KVMIG_ASSIGN(std::vector<Placeholder> some, s->list());
    for (Placeholder& p : some) {
      if (!seen.insert(p.uuid).second) return Error{"VM " + p.uuid + " is known to two placeholder stores at this site"};
      out.push_back(std::move(p));
    }
  }
  return out;
}

Result<void> PlaceholderUnion::mark_completed(const std::string& uuid, const std::string& migration_id) {
  KVMIG_ASSIGN(PlaceholderStore * have, holder(uuid));
  if (!have) return Error{"placeholder " + uuid + " of migration " + migration_id + " is gone: the VM must not run here"};
  return have->mark_completed(uuid, migration_id);
}

Result<bool> PlaceholderUnion::remove(const std::string& uuid, const std::string& migration_id) {
  KVMIG_ASSIGN(PlaceholderStore * have, holder(uuid));
  if (!have) return false;
  return have->remove(uuid, migration_id);
}

}  // namespace kvmig::host
