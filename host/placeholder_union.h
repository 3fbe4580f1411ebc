// PlaceholderUnion: the placeholders of one site when it holds VMs of several kinds (the
// micro-VM registry and a libvirtd), behind one PlaceholderStore, so `kvmig status` and
// recovery ask "is there a VM with this UUID here?" of the whole site. A UUID found in two
// stores is an error: two VMs must never share a UUID at one site.
#pragma once

#include <vector>

#include "host/placeholder_registry.h"

namespace kvmig::host {

class PlaceholderUnion : public PlaceholderStore {
 public:
  // Stores in the order asked; create() goes to the first one.
  explicit PlaceholderUnion(std::vector<PlaceholderStore*> stores) : stores_(std::move(stores)) {}
  std::string_view kind() const override { return "union"; }
  Result<void> create(const std::string& uuid, const std::string& name, const std::string& migration_id) override;
  Result<std::optional<Placeholder>> find(const std::string& uuid) override;
  Result<std::vector<Placeholder>> list() override;
  Result<void> mark_completed(const std::string& uuid, const std::string& migration_id) override;
  Result<bool> remove(const std::string& uuid, const std::string& migration_id) override;

 private:
  // The store holding `uuid` (null: none).
  Result<PlaceholderStore*> holder(const std::string& uuid);
  std::vector<PlaceholderStore*> stores_;
};

}  // namespace kvmig::host
