// The source's side of a chain copy's two extra exchanges (docs/disk-chains.md): before the
// layers are copied, CHAIN asks which ones the destination already holds; after, LINK has it
// check every layer and re-link the chain. Each runs on a fresh connection of its own, so the
// layer copies in between keep their resume and hand-off behaviour unchanged.
#pragma once

#include <vector>

#include "base/result.h"
#include "helper/disk_messages.h"
#include "helper/transport.h"

namespace kvmig::helper {

Result<std::vector<LayerStatus>> query_disk_chain(Connection& connection, const DiskChain& chain);
Result<void> link_disk_chain(Connection& connection, const DiskChain& chain);

}  // namespace kvmig::helper
