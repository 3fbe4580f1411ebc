// --verify: the hash of guest RAM both sides compare at the switch-over (VERIFY), and, when
// it differs, where.
//
// A bare "guest memory hash differs" says nothing about the cause: a page whose last write
// the dirty log missed, a page torn on the way, a write after the final harvest. With
// kFeatureVerifyRanges the source sends one XXH3-64 per piece of guest RAM (4 KiB pieces up
// to 256 MiB of RAM, larger above so the list stays under 512 KiB) and the destination
// names the pieces that differ, with the round that last wrote each of them here
// (PageRoundLog) and what it holds now. The cost is paid only under --verify: the pieces are
// hashed in the same single pass as before, the whole-RAM hash being the hash of the list.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "helper/messages.h"
#include "kvm/guest_memory.h"

namespace kvmig::helper {

using RamRegions = std::span<const kvm::GuestMemory::Region>;

inline constexpr uint64_t kVerifyMaxPieces = 1u << 16;

// The piece size for `ram_bytes` of guest RAM: 4 KiB, doubled until at most
// kVerifyMaxPieces pieces cover it.
uint64_t verify_piece_bytes(uint64_t ram_bytes);

// The legacy VERIFY (no ranges): XXH3-64 streamed over all regions in order.
Verify verify_whole(RamRegions regions);
// The kFeatureVerifyRanges VERIFY: per-piece hashes and their combined hash (messages.h).
Verify verify_pieces(RamRegions regions, uint64_t piece_bytes);

// Which pages the destination last wrote in which round (1..127, 0 = never), and whether as
// a zero run: what a VERIFY mismatch report says about each differing piece. One byte per
// 4 KiB page of the layout, kept only under --verify. note() may run concurrently on
// different pages (the streams of one round carry disjoint pages).
class PageRoundLog {
 public:
  explicit PageRoundLog(const MemoryLayout& layout);
  // Pages outside the layout are ignored (the receiver has already refused such runs).
  void note(uint64_t gpa, uint64_t pages, uint32_t round, bool zero);
  // Byte for the page at gpa: bit 7 = zero run, bits 0..6 = round (capped at 127).
  uint8_t at(uint64_t gpa) const;

 private:
  int range_of(uint64_t gpa) const;  // index in ranges_, or -1
  std::vector<MemRange> ranges_;
  std::vector<uint64_t> first_page_;  // index of each range's first page
  std::vector<uint8_t> pages_;
};

// Compares the source's VERIFY with guest memory here. Ok when they match; otherwise an
// [internal] error naming the first differing pieces (all of them, up to `max_lines`, also go
// to `detail`, one per line, for the destination's log). log may be null.
Result<void> check_verify(const Verify& source, RamRegions regions, const PageRoundLog* log,
                          std::string* detail = nullptr, size_t max_lines = 64);

}  // namespace kvmig::helper
