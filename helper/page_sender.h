// PageSender: one pre-copy round from guest memory to the data streams.
//
// Guest memory is cut in 2 MiB chunks and each chunk is pinned to one data stream by its
// address (chunk index mod streams), so every copy of a page travels the same stream, in
// order. Per chunk: first rearm the pages harvested dirty in it (write-protect them again,
// one KVM_CLEAR_DIRTY_LOG with the chunk's harvested bitmap), THEN read and send its pages: a write after the read shows up in the next harvest, a
// write before it is in what was read. Only the harvested runs are rearmed, never a whole
// chunk, since rearming a page that was clean at harvest time but written since would clear
// that write without sending it. A round ends with ROUND_END on every stream, which the
// destination uses as a barrier (docs/protocol.md).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "base/result.h"
#include "helper/compress.h"
#include "helper/transport.h"
#include "helper/transport_pages.h"
#include "helper/wire_pages.h"
#include "kvm/dirty_tracker.h"
#include "kvm/migratable.h"
#include "kvm/page_residency.h"

namespace kvmig::helper {

inline constexpr uint64_t kChunkSize = 2ull << 20;
inline constexpr uint64_t kChunkPages = kChunkSize / kPageSize;
inline constexpr uint64_t kBatchPages = 4096;  // 16 MiB per MEM_PAGES: big writes, some overlap
// Rounds up to this many pages are sent from the calling thread, one stream after another.
inline constexpr uint64_t kSerialRoundPages = 4096;

// Calls fn(first_page, pages) for each maximal run of set bits in [begin, end).
void for_each_run(const uint64_t* bits, uint64_t begin, uint64_t end,
                  const std::function<void(uint64_t, uint64_t)>& fn);
uint64_t count_bits(std::span<const uint64_t> bits);

class PageSender {
 public:
  // `skip_untouched`: the source is memory kvm::PageResidency can judge
  // (kvm::GuestMemory::residency_tells_zero); round 1 then skips never-touched pages unread.
  PageSender(Connection& connection, uint16_t version, GpaResolver source, CompressMode compress,
             bool skip_untouched = false);

  // Sends round `round`. `rearm` (may be empty: the final, paused round) holds the pages
  // harvested dirty, rearmed through `tracker` chunk by chunk just before the chunk is read;
  // `send` the pages to send, per slot, the same slots in the same order.
  // With `fresh_destination` (round 1: the destination's memory is newly mapped, all
  // zero), zero pages are not sent at all, not even as markers: a marker would make the
  // destination write zeros over zeros, faulting in memory it never needs (seconds per
  // GiB on some hosts). They still count in the stats' zero_pages.
  Result<RoundStats> send_round(uint32_t round, kvm::DirtyTracker* tracker,
                                std::span<const kvm::DirtyBitmap> rearm,
                                std::span<const kvm::DirtyBitmap> send,
                                bool fresh_destination = false);

  // Waits (at most `limit`) until the data sockets' send queues are empty, i.e. the peer
  // has taken what was sent. A round "sent" into 16 MiB socket buffers is not yet received:
  // measuring bandwidth, or pausing the VM, before the backlog drains would count the
  // backlog as link speed and then pay for it in downtime. Returns whether it drained.
  bool wait_drained(std::chrono::milliseconds limit) const;
  // Zero pages of the last round that were counted but not sent (fresh destination).
  uint64_t skipped_zero_pages() const { return skipped_.load(); }

 private:
  Result<void> send_stream(size_t s, uint32_t round, kvm::DirtyTracker* tracker,
                           std::span<const kvm::DirtyBitmap> rearm,
                           std::span<const kvm::DirtyBitmap> send, bool fresh, RoundStats& mine);

  Connection& connection_;
  uint16_t version_;
  GpaResolver source_;
  std::vector<std::unique_ptr<PageCompressor>> compressors_;  // per stream
  std::atomic<uint64_t> skipped_{0};
  // Round 1 (fresh destination) skips guest pages never touched without reading them.
  bool skip_untouched_;
  kvm::PageResidency residency_;
};

}  // namespace kvmig::helper
