// KVM's per-vCPU dirty rings (KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]).
//
// Each vCPU pushes the guest frames it dirties into its own ring, shared with us by mmap;
// we take entries in order (DIRTY -> RESET) and KVM_RESET_DIRTY_RINGS write-protects the
// reset frames again. Cost follows the number of pages written, not the size of guest RAM,
// which is what makes rings win for large, mostly idle guests.
//
// What the Machine must do (the ring cannot be added to a VM that already has vCPUs):
//   1. right after KVM_CREATE_VM + irqchip and BEFORE any KVM_CREATE_VCPU:
//        KVMIG_ASSIGN(ring, DirtyRingLog::enable(vm_fd, config.dirty_ring_entries));
//   2. after each KVM_CREATE_VCPU:  KVMIG_TRY(ring->attach_vcpu(vcpu_fd));
//   3. in the vCPU loop, on kvm_run->exit_reason == KVM_EXIT_DIRTY_RING_FULL:
//        KVMIG_TRY(ring->handle_ring_full(vcpu_index));   then re-enter KVM_RUN.
//      KVM refuses to run the vCPU until its ring has room again; this drains every ring
//      into the current sink (the DirtyTracker while tracking, else nowhere) and resets.
//   4. keep the DirtyRingLog alive until the vCPUs are gone (the rings are mmapped).
#pragma once

#include <linux/kvm.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "base/result.h"

namespace kvmig::kvm {

class DirtyRingLog {
 public:
  // Receives one dirtied frame: KVM's slot field (address space << 16 | slot id) and the
  // page offset inside that slot. Called with the ring lock held; must not call back here.
  using Sink = std::function<void(uint32_t slot, uint64_t page_offset)>;

  // Enables rings of `entries` (a power of two) on a VM that has no vCPUs yet. Prefers the
  // ACQ_REL capability, which promises KVM that we read and reset entries with
  // acquire/release ordering (we do either way). Errors say what KVM allows.
  static Result<std::unique_ptr<DirtyRingLog>> enable(int vm_fd, uint32_t entries);

  DirtyRingLog(const DirtyRingLog&) = delete;
  DirtyRingLog& operator=(const DirtyRingLog&) = delete;
  ~DirtyRingLog();

  uint32_t entries() const { return entries_; }
  bool acq_rel() const { return acq_rel_; }

  // Maps the ring of a vCPU just created; vCPUs are attached in creation order.
  Result<void> attach_vcpu(int vcpu_fd);
  size_t vcpu_count() const;

  // Where collected frames go; an empty sink drops them (logging off, leftovers).
  void set_sink(Sink sink);

  // Takes every published entry of every ring, hands it to the sink, marks it for reset and
  // then issues KVM_RESET_DIRTY_RINGS so the frames are write-protected again. Returns the
  // number of entries taken. Safe to call while vCPUs run, from any thread.
  Result<uint64_t> collect();

  // For vCPU `vcpu` (its attach order) on KVM_EXIT_DIRTY_RING_FULL: empties the rings (as
  // collect()). Serialised with any harvester by the ring lock, so when it returns this
  // vCPU's ring has been reset and KVM_RUN can be entered again. A ring reported full twice
  // with not one entry taken from it in between has overflowed inside KVM (entries were
  // overwritten, so dirty pages are lost): that is an error, not a loop of full exits.
  // Seen on kvm-pvm, whose batch emulation of CPL0 code pushes past the ring's reserve
  // without checking it; real KVM stops the vCPU within the reserve.
  Result<void> handle_ring_full(size_t vcpu);

  // Number of KVM_EXIT_DIRTY_RING_FULL handled, for stats.
  uint64_t ring_full_count() const;

 private:
  struct Ring {
    kvm_dirty_gfn* gfns = nullptr;
    uint32_t fetch = 0;  // next entry to look at; free-running, masked on use
    uint32_t fetch_at_last_full = 0;
    bool full_seen = false;
  };

  DirtyRingLog(int vm_fd, uint32_t entries, bool acq_rel) : vm_fd_(vm_fd), entries_(entries), acq_rel_(acq_rel) {}
  Result<uint64_t> collect_locked();

  int vm_fd_;
  uint32_t entries_;
  bool acq_rel_;
  mutable std::mutex mu_;
  std::vector<Ring> rings_;
  Sink sink_;
  std::vector<std::pair<uint32_t, uint64_t>> collected_;  // (slot, page offset), reused per collect
  uint64_t ring_full_ = 0;
};

}  // namespace kvmig::kvm
