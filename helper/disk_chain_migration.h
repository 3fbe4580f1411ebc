// Live migration of a disk that is the top of a kvmig base + delta chain (docs/disk-migration.md,
// "Chained disks"; issue 4 item 4). Only the top is written while the VM runs, so only the top
// goes through the live hot/cold pre-copy; the layers below it are declared in DISKS with their
// content IDs, and the destination skips each one it already holds (by its own ID of its own
// file), or has it copied once, before the live pre-copy, and verified by ID after the copy.
//
// The source's half: which layers a disk has and their IDs (source_chain), and the reads of the
// top's holes through the layers below (ChainHoleFiller): a block of the top sent live carries
// what the chain reads there, so the destination's top never holds a zero where the source
// reads its base. The destination's half: where each layer goes, held or to be copied
// (plan_chain), the descriptors that re-link the chain there (link_chain), and the check of a
// copied layer (verify_layer).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "base/fd.h"
#include "base/result.h"
#include "helper/disk_precopy_messages.h"
#include "helper/transport.h"
#include "kvm/block_chain.h"

namespace kvmig::helper {

// The write-tracking block of a copied lower layer: 4 KiB, a file system block, so a delta's
// allocation map (which is part of its content ID) is copied exactly.
inline constexpr uint32_t kLayerCopyBlock = 4096;

struct SourceChain {
  std::vector<std::string> lower_paths;  // base first; empty for a raw disk
  std::vector<MigrationLayer> lower;     // as DISKS declares them
};
// The layers under the disk whose top is `top` (its content IDs from a trusted sidecar, or
// hashed now: a full read of each layer not cached).
Result<SourceChain> source_chain(const std::string& top);

struct LayerCopyStats {
  uint32_t held = 0;    // lower layers the destination held: not a byte of them sent
  uint32_t copied = 0;  // lower layers sent whole
  uint64_t wire_bytes = 0, blocks = 0;
};
// After DISKS_READY, before the live pre-copy: every lower layer the destination answered
// `copy` for goes out whole as DISK_BLOCKS (index: disks + k for the k-th such layer, round 1),
// holes skipped, zero blocks as markers. `chains`: one per disk, in disk order.
Result<LayerCopyStats> send_missing_layers(Stream& control, uint16_t version, const std::vector<SourceChain>& chains,
                                           const DisksReady& ready);

class ChainHoleFiller {
 public:
  static Result<std::unique_ptr<ChainHoleFiller>> open(int top_fd, const std::vector<std::string>& lower_paths,
                                                       uint64_t size);
  // `buf` holds [offset, offset + length) as read from the top: its holes (which read as zeros)
  // are replaced with what the layers below hold there.
  Result<void> fill(uint64_t offset, uint8_t* buf, uint64_t length) const;

 private:
  ChainHoleFiller(int top_fd, uint64_t size, size_t layers) : top_fd_(top_fd), map_(size, kLayerCopyBlock, layers) {}
  int top_fd_;
  std::vector<Fd> lower_;
  kvm::ChainMap map_;  // the lower layers only: they never change while the VM runs
};

// Destination: one lower layer of a disk copy.
struct PlacedLayer {
  std::string path;
  LayerAnswer answer = LayerAnswer::copy;
  bool created = false;  // a fresh file for this copy (removed again on discard)
  // The same layer (content ID, path, and for a delta the same layers below) as one placed for
  // an earlier disk of this migration: copied (or held) once, there; answered `held` here.
  bool shared = false;
  bool fresh = false;  // made by this migration (for this disk or an earlier one): not yet filled
};
// The layers a migration has placed so far, by path, so that disks sharing a layer (a common
// base) get one file and one copy of it, and no two different layers get one path.
struct ChainPlacements {
  struct Entry {
    LayerId id;
    std::vector<std::string> below;  // the paths placed under it, base first
    bool fresh = false;
  };
  std::map<std::string, Entry> by_path;
};
// Where each layer of `disk` goes, next to `top_path` under its name, without creating
// anything. Held when the file there has the declared ID by this host's own reading (computed,
// or from a sidecar whose key matches). A file of that name with another ID is never
// overwritten (another chain may use it): the copy then goes to "<name>.<first 16 hex digits
// of the ID>", which may itself be held from an earlier migration. A missing file is planned
// as `created` (create_layer_file makes it). `earlier`: what this migration's earlier disks
// placed; the plan is added to it.
Result<std::vector<PlacedLayer>> plan_chain(const std::string& top_path, const MigrationDisk& disk,
                                            ChainPlacements& earlier);
// Creates the layer file `path` empty at `size` and opens it read-write; fails if it exists.
Result<Fd> create_layer_file(const std::string& path, uint64_t size);
// plan_chain for one disk, then its files created (what the offline tests use).
Result<std::vector<PlacedLayer>> place_chain(const std::string& top_path, const MigrationDisk& disk);
// Re-links the chain: each delta (every layer above the base, and the top) gets a descriptor
// naming the layer below it, relative to its directory. A descriptor that already says so is
// left alone.
Result<void> link_chain(const std::string& top_path, const std::vector<PlacedLayer>& layers, uint64_t size);
// A copied layer's own ID must be the declared one: a copy is never trusted. `cancel` as for
// layer_content_id.
Result<void> verify_layer(const std::string& path, bool delta, const LayerId& want,
                          const std::atomic<bool>* cancel = nullptr);

}  // namespace kvmig::helper
