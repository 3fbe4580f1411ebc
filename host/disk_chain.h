// Backing chains of disk images, as the host sees them (docs/disk-chains.md): qcow2 chains,
// read through `qemu-img info --backing-chain` (QEMU's own reading of the format, with its
// backing-format rules, rather than a second qcow2 parser here), and kvmig's own base + delta
// layout, where a delta is a sparse raw file whose holes read through to its parent and a
// descriptor "<delta>.kvmig-delta" names that parent. Also: taking a snapshot (a new delta on
// top), and re-linking a copied chain at the destination.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "base/result.h"
#include "helper/disk_messages.h"

namespace kvmig::host {

inline constexpr const char* kDeltaSuffix = ".kvmig-delta";

struct ChainLayer {
  std::string path;  // absolute, normalised
  helper::LayerFormat format = helper::LayerFormat::raw;
  uint64_t file_size = 0;
  uint64_t virtual_size = 0;  // what the guest sees (raw, delta: the file size)
};

// The chain below and including `image`, base first. Refuses, with one line naming the
// culprit: a missing image or parent, a loop, a delta shorter or longer than its descriptor
// declares, sizes not multiples of 512, a delta on a qcow2 parent, formats other than raw and
// qcow2, a file system that cannot tell holes from data (a delta's holes carry meaning).
Result<std::vector<ChainLayer>> read_disk_chain(const std::string& image);

struct DeltaDescriptor {
  std::string parent;  // as written: relative to the delta's directory, or absolute
  uint64_t size = 0;   // the delta's (and its parent's) size in bytes
};
// nullopt when `delta` has no descriptor (it is not a kvmig delta).
Result<std::optional<DeltaDescriptor>> read_delta_descriptor(const std::string& delta);
Result<void> write_delta_descriptor(const std::string& delta, const DeltaDescriptor& d);

// Puts a new, empty top layer on `image` and makes `image` read-only, so it can be pre-copied
// while the new top takes the writes. qcow2: a qcow2 overlay (qemu-img create -b); raw or
// kvmig delta: a kvmig delta. `output` "" picks "<stem>.deltaN<ext>" next to the image.
// Returns the new top's path.
Result<std::string> snapshot_disk(const std::string& image, const std::string& output);

// For `kvmig disk serve`: points `child` at `parent`, both relative to `root` (already checked
// to lie beneath it), by a relative path from the child's directory. qcow2: `qemu-img rebase
// -u` (only when the header names something else, so an unchanged link keeps its bytes);
// kvmig delta: its descriptor.
Result<void> relink_layer(const std::string& root, const helper::DiskChainLayer& child,
                          const helper::DiskChainLayer& parent);

}  // namespace kvmig::host
