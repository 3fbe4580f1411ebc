#include "kvm/dirty_ring_log.h"

#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <string>

namespace kvmig::kvm {
namespace {

size_t ring_bytes(uint32_t entries) { return size_t{entries} * sizeof(kvm_dirty_gfn); }

}  // namespace

Result<std::unique_ptr<DirtyRingLog>> DirtyRingLog::enable(int vm_fd, uint32_t entries) {
  bool acq_rel = true;
  int max_bytes = ::ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
  if (max_bytes <= 0) {
    acq_rel = false;
    max_bytes = ::ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING);
  }
  if (max_bytes <= 0)
    return Error{"KVM lacks KVM_CAP_DIRTY_LOG_RING (Linux >= 5.11): use bitmap dirty tracking "
                 "(dirty ring entries = 0)"};
  const uint64_t max_entries = uint64_t(max_bytes) / sizeof(kvm_dirty_gfn);
  const uint64_t page_entries = uint64_t(::sysconf(_SC_PAGESIZE)) / sizeof(kvm_dirty_gfn);
  if (entries == 0 || (entries & (entries - 1)) != 0 || entries < page_entries || entries > max_entries)
    return Error{"dirty ring size " + std::to_string(entries) + ": must be a power of two between " +
                 std::to_string(page_entries) + " and " + std::to_string(max_entries) + " entries"};
  kvm_enable_cap cap{};
  cap.cap = acq_rel ? KVM_CAP_DIRTY_LOG_RING_ACQ_REL : KVM_CAP_DIRTY_LOG_RING;
  cap.args[0] = ring_bytes(entries);
  if (::ioctl(vm_fd, KVM_ENABLE_CAP, &cap) < 0) {
    Error e = Error::from_errno(std::string("KVM_ENABLE_CAP ") +
                                (acq_rel ? "DIRTY_LOG_RING_ACQ_REL" : "DIRTY_LOG_RING") + " " +
                                std::to_string(entries) + " entries");
    // KVM says EINVAL both for a ring below its reserved entries (64 + the PML buffer on
    // Intel) and for a VM that already has vCPUs; name both.
    if (e.sys_errno == EINVAL)
      e.message += " (ring too small for this CPU's reserved entries, or vCPUs already created)";
    return e;
  }
  return std::unique_ptr<DirtyRingLog>(new DirtyRingLog(vm_fd, entries, acq_rel));
}

DirtyRingLog::~DirtyRingLog() {
  for (Ring& ring : rings_) ::munmap(ring.gfns, ring_bytes(entries_));
}

Result<void> DirtyRingLog::attach_vcpu(int vcpu_fd) {
  const long page = ::sysconf(_SC_PAGESIZE);
  void* p = ::mmap(nullptr, ring_bytes(entries_), PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd,
                   KVM_DIRTY_LOG_PAGE_OFFSET * page);
  std::lock_guard lock(mu_);
  if (p == MAP_FAILED)
    return Error::from_errno("mmap dirty ring of vCPU " + std::to_string(rings_.size()));
  rings_.push_back(Ring{static_cast<kvm_dirty_gfn*>(p), 0});
  return ok();
}

size_t DirtyRingLog::vcpu_count() const {
  std::lock_guard lock(mu_);
  return rings_.size();
}

void DirtyRingLog::set_sink(Sink sink) {
  std::lock_guard lock(mu_);
  sink_ = std::move(sink);
}

Result<uint64_t> DirtyRingLog::collect() {
  std::lock_guard lock(mu_);
  return collect_locked();
}

Result<uint64_t> DirtyRingLog::collect_locked() {
  const uint32_t mask = entries_ - 1;
  collected_.clear();
  for (size_t i = 0; i < rings_.size(); ++i) {
    Ring& ring = rings_[i];
    for (;;) {
      kvm_dirty_gfn& e = ring.gfns[ring.fetch & mask];
      // KVM fills slot/offset, then publishes DIRTY with a release store: acquire pairs.
      const uint32_t flags = std::atomic_ref<uint32_t>(e.flags).load(std::memory_order_acquire);
      if (!(flags & KVM_DIRTY_GFN_F_DIRTY)) break;
      collected_.push_back({e.slot, e.offset});
      // Release: our reads of the entry happen before KVM may reuse it.
      std::atomic_ref<uint32_t>(e.flags).store(KVM_DIRTY_GFN_F_RESET, std::memory_order_release);
      ++ring.fetch;
    }
  }
  const uint64_t taken = collected_.size();
  const bool reset_failed = taken > 0 && ::ioctl(vm_fd_, KVM_RESET_DIRTY_RINGS, 0) < 0;
  const int err = errno;
  // Only now, with the pages write-protected again, do they reach the sink. The other way
  // round (a vCPU's ring-full exit collecting while the migration thread sends), the sender
  // could take a page from the sink, read it, and another vCPU write it through its
  // still-writable mapping before the reset: that write would leave no entry and be lost.
  if (sink_)
    for (const auto& [slot, offset] : collected_) sink_(slot, offset);
  if (reset_failed) {
    errno = err;
    return Error::from_errno("KVM_RESET_DIRTY_RINGS after " + std::to_string(taken) + " entries");
  }
  return taken;
}

Result<void> DirtyRingLog::handle_ring_full(size_t vcpu) {
  std::lock_guard lock(mu_);
  if (vcpu >= rings_.size())
    return Error{"dirty ring full on vCPU " + std::to_string(vcpu) + ", which has no ring attached"};
  ++ring_full_;
  KVMIG_TRY(collect_locked());
  Ring& ring = rings_[vcpu];
  // KVM only reports a ring full after pushing entries into it, and we take every entry it
  // publishes, so each full exit must find the fetch index moved since the previous one.
  if (ring.full_seen && ring.fetch == ring.fetch_at_last_full)
    return Error{"dirty ring of vCPU " + std::to_string(vcpu) +
                 " overflowed inside KVM (full, with no entry to harvest): dirty pages were lost"};
  ring.full_seen = true;
  ring.fetch_at_last_full = ring.fetch;
  return ok();
}

uint64_t DirtyRingLog::ring_full_count() const {
  std::lock_guard lock(mu_);
  return ring_full_;
}

}  // namespace kvmig::kvm
