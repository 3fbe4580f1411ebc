// DirtyTracker: the VM's DirtyTracked. Merges KVM's log (bitmap or ring) with the VMM's
// own bitmap of device writes, and reports it at a trace granularity of 4 KiB .. 2 MiB.
//
// Semantics, the same in every mode: harvest() returns every page written since the page
// was last re-armed (all pages right after start_tracking), and stays the same until
// rearm() or new writes. rearm(gpa, len) must come just BEFORE those pages are read for
// sending: a write after rearm shows up in the next harvest; a write before it is in the
// memory the sender reads. Nothing is lost either way.
//
// How each mode keeps that promise:
//   bitmap, manual protect: KVM keeps the bits until rearm() issues KVM_CLEAR_DIRTY_LOG.
//   bitmap, classic / ring: KVM re-protects a page as soon as we harvest it, so we keep the
//     harvested bits in our own pending bitmap until rearm() clears them there.
//
// Granularity G: a dirty page marks its whole granule (G-aligned from the slot's start),
// rearm() takes whole granules only, so a sender sends each granule as one unit.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "kvm/device_dirty.h"
#include "kvm/dirty_bitmap_log.h"
#include "kvm/dirty_ring_log.h"
#include "kvm/migratable.h"

namespace kvmig::kvm {

inline constexpr uint64_t kMinTraceGranularity = 4096;
inline constexpr uint64_t kMaxTraceGranularity = 2 << 20;

// Widens a 4 KiB-page bitmap of `pages` pages so that a granule of `granule_pages` pages
// (a power of two) is either all set or all clear. Bits past `pages` end up clear.
void round_to_granules(std::vector<uint64_t>& bits, uint64_t pages, uint64_t granule_pages);

class DirtyTracker final : public DirtyTracked {
 public:
  struct Config {
    std::vector<LoggedSlot> slots;     // guest RAM slots, as registered with KVM
    uint64_t granularity = 4096;       // power of two in [4 KiB, 2 MiB]
    bool allow_classic_bitmap = true;  // bitmap mode without manual protect if KVM lacks it
    bool use_manual_protect = true;    // false: classic bitmap mode even if KVM has better
  };

  // ring == nullptr: bitmap mode, which enables manual protect on the VM here (so create
  // the tracker before anything turns dirty logging on). ring != nullptr: ring mode, the
  // ring having been enabled before the vCPUs were created. device may be nullptr. The
  // ring and device bitmap must outlive the tracker.
  static Result<std::unique_ptr<DirtyTracker>> create(int vm_fd, Config config, DirtyRingLog* ring,
                                                      DeviceDirty* device);
  ~DirtyTracker() override;

  uint64_t granularity() const { return granularity_; }
  bool ring_mode() const { return ring_ != nullptr; }
  // "ring", "bitmap manual-protect+initially-set", ... for logs and stats.
  std::string mode_name() const;
  bool tracking() const;

  Result<void> start_tracking() override;
  Result<void> stop_tracking() override;
  Result<std::vector<DirtyBitmap>> harvest() override;
  // [gpa, gpa+len) must start on a granule and end on one or at a slot's end; the parts
  // outside guest RAM are ignored, a range with no guest RAM at all is an error.
  Result<void> rearm(uint64_t gpa, uint64_t len) override;
  // Re-arms exactly the pages set in BITS (bit i = page at gpa + i * 4 KiB) of
  // [gpa, gpa + pages * 4 KiB), which must lie in one slot, start 64 pages (and a granule)
  // from the slot's start and span whole 64-page words or end at the slot's end. BITS is a
  // harvested bitmap, so it is granule-complete. One KVM_CLEAR_DIRTY_LOG however scattered
  // the pages are; the same rule as rearm(): call it just before those pages are read.
  Result<void> rearm_bits(uint64_t gpa, uint64_t pages, std::span<const uint64_t> bits);

 private:
  struct Slot {
    LoggedSlot slot;
    std::unique_ptr<std::atomic<uint64_t>[]> pending;  // ring sink sets bits concurrently
    std::vector<uint64_t> scratch;
  };

  DirtyTracker(int vm_fd, uint64_t granularity, DirtyRingLog* ring, DeviceDirty* device)
      : vm_fd_(vm_fd), granularity_(granularity), ring_(ring), device_(device) {}
  void on_ring_entry(uint32_t kvm_slot, uint64_t page_offset);
  Result<void> set_logging(bool on);

  int vm_fd_;
  uint64_t granularity_;
  DirtyRingLog* ring_;
  DeviceDirty* device_;
  std::optional<DirtyBitmapLog> bitmap_;  // bitmap mode only
  std::vector<Slot> slots_;
  mutable std::mutex mu_;  // serialises the DirtyTracked calls; the ring sink takes no lock
  bool tracking_ = false;
};

}  // namespace kvmig::kvm
