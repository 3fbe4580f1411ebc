// A disk that is a kvmig base + delta chain (docs/disk-chains.md), as the micro-VMM's block
// backend serves it: reads of a byte go to the top-most layer that holds it (a delta holds
// its allocated extents, the base everything), writes go to the top and make it hold what
// they wrote. Lower layers are only ever read.
//
// The top holds whole *granules* (4 KiB, or the file system's block if larger): a write that
// covers a granule the top does not hold only in part first copies the rest of that granule
// up from the layers below. Otherwise the file system would allocate the whole block, and the
// bytes the guest did not write would read as zeros instead of the parent's data.
//
// ChainMap is the pure part (which layer holds what, which span a write must cover), unit
// tested alone (tests/unit/block_chain_test.cc); BlockBackend does the I/O.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "base/result.h"

namespace kvmig::kvm {

inline constexpr const char* kChainDeltaSuffix = ".kvmig-delta";
inline constexpr size_t kMaxChainLayers = 64;

// The layers under and including `top`, base first: just {top} when `top` has no descriptor
// (a raw image). Follows each delta's descriptor to its parent (relative to the delta's
// directory, or absolute). Refuses, naming the culprit: a malformed descriptor, a missing
// parent, a loop, more than 64 layers, a delta whose size differs from its descriptor's.
Result<std::vector<std::string>> resolve_block_chain(const std::string& top);

// Disjoint, coalesced byte ranges.
class ExtentSet {
 public:
  void add(uint64_t offset, uint64_t length);
  bool covers(uint64_t offset, uint64_t length) const;  // every byte of the range is held
  // The extent holding `at`, as [start, end), or {at, at} when `at` is in a hole.
  std::pair<uint64_t, uint64_t> extent_at(uint64_t at) const;
  // The start of the first extent beginning after `at`, or UINT64_MAX.
  uint64_t next_start(uint64_t at) const;
  uint64_t bytes() const;
  size_t count() const { return extents_.size(); }

 private:
  std::map<uint64_t, uint64_t> extents_;  // start -> end
};

class ChainMap {
 public:
  // `layers` >= 1; layer 0 is the base (holds everything), layers - 1 the top.
  ChainMap(uint64_t disk_bytes, uint64_t granule, size_t layers);

  uint64_t granule() const { return granule_; }
  size_t layers() const { return held_.size() + 1; }
  size_t top() const { return held_.size(); }

  // Layer `layer` (>= 1) holds [offset, offset + length).
  void add(size_t layer, uint64_t offset, uint64_t length);
  bool holds(size_t layer, uint64_t offset, uint64_t length) const;

  struct Piece {
    uint64_t offset = 0;
    uint64_t length = 0;
    size_t layer = 0;
    bool operator==(const Piece&) const = default;
  };
  // [offset, offset + length) cut into maximal pieces, each read from the top-most layer at
  // or below `from` that holds it (the base when none does).
  std::vector<Piece> resolve(uint64_t offset, uint64_t length, size_t from) const;
  std::vector<Piece> resolve(uint64_t offset, uint64_t length) const { return resolve(offset, length, top()); }

  // The span a write of [offset, offset + length) must write to the top: widened to the
  // granule boundary at each end whose granule the top does not wholly hold (the widened
  // parts are copied up from below). Clamped to the disk.
  std::pair<uint64_t, uint64_t> write_span(uint64_t offset, uint64_t length) const;
  // The granule-aligned range [first, last) of granules a write of this range touches.
  std::pair<uint64_t, uint64_t> granules(uint64_t offset, uint64_t length) const;

 private:
  uint64_t disk_bytes_;
  uint64_t granule_;
  std::vector<ExtentSet> held_;  // held_[i] is layer i + 1
};

}  // namespace kvmig::kvm
