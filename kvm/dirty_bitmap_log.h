// KVM's per-slot dirty bitmap (KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG).
//
// Preferred mode is manual protect with initially-set (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
// turning logging on then marks every page dirty without write-protecting anything, and a
// page is write-protected again only when rearm clears it, just before it is sent. On a
// 1 TiB guest this is the difference between one stall of seconds at start and none.
// Without the capability, classic mode is used: KVM_GET_DIRTY_LOG clears and write-protects
// the whole slot at once, and clear() has nothing to do in KVM.
#pragma once

#include <cstdint>

#include "base/result.h"

namespace kvmig::kvm {

inline constexpr uint64_t kDirtyPageSize = 4096;

// A memory slot exactly as it was registered with KVM_SET_USER_MEMORY_REGION. Logging is
// switched by registering the same slot again with only KVM_MEM_LOG_DIRTY_PAGES changed
// (KVM accepts a flags-only change on a live slot).
struct LoggedSlot {
  uint32_t slot = 0;
  uint64_t gpa = 0;
  uint64_t size = 0;  // bytes, a multiple of 4 KiB
  uint8_t* host = nullptr;
  uint32_t flags = 0;  // the slot's flags other than KVM_MEM_LOG_DIRTY_PAGES

  uint64_t pages() const { return size / kDirtyPageSize; }
  uint64_t words() const { return (pages() + 63) / 64; }
};

// Registers `slot` again with KVM_MEM_LOG_DIRTY_PAGES set (on) or cleared (off).
Result<void> set_slot_logging(int vm_fd, const LoggedSlot& slot, bool on);

class DirtyBitmapLog {
 public:
  enum class Mode {
    manual_initially_set,  // MANUAL_PROTECT_ENABLE | INITIALLY_SET
    manual,                // MANUAL_PROTECT_ENABLE only (kernels 5.3 .. 5.7)
    classic,               // KVM_GET_DIRTY_LOG clears and re-protects
  };

  // Enables the best manual-protect mode KVM offers on this VM. Must run before logging is
  // switched on for any slot. With allow_classic false, a KVM without the capability is an
  // error that says so; otherwise classic mode is used. use_manual false asks for classic
  // mode even when KVM could do better (comparisons, tests of the fallback).
  static Result<DirtyBitmapLog> create(int vm_fd, bool allow_classic = true, bool use_manual = true);

  Mode mode() const { return mode_; }
  static const char* mode_name(Mode mode);

  // KVM_GET_DIRTY_LOG: ORs nothing, overwrites words[0 .. slot.words()). In manual modes the
  // bits stay set in KVM until clear(); in classic mode KVM has cleared them.
  Result<void> fetch(const LoggedSlot& slot, uint64_t* words) const;

  // KVM_CLEAR_DIRTY_LOG for pages [first_page, first_page + num_pages) of the slot: their
  // dirty bits are cleared and the pages write-protected, so the next write is logged.
  // KVM wants first_page and num_pages aligned to 64 (except at the slot's end), so the
  // range is widened to 64 pages with a bitmap that selects only the requested pages, and
  // split in chunks so KVM does not hold mmu_lock for the whole slot. No-op in classic mode.
  Result<void> clear(const LoggedSlot& slot, uint64_t first_page, uint64_t num_pages) const;
  // KVM_CLEAR_DIRTY_LOG with the caller's bitmap: pages [first_page, first_page+num_pages)
  // whose bit is set in MASK (bit i = page first_page + i) are cleared and re-protected, in
  // one ioctl. first_page must be a multiple of 64; num_pages too, unless the range ends at
  // the slot's end. Scattered writes cost one call per range, not one per run of pages.
  Result<void> clear_mask(const LoggedSlot& slot, uint64_t first_page, uint64_t num_pages,
                          const uint64_t* mask) const;

  // Pages per KVM_CLEAR_DIRTY_LOG call; a multiple of 64.
  void set_clear_chunk_pages(uint64_t pages) { clear_chunk_pages_ = pages < 64 ? 64 : pages & ~63ull; }

 private:
  DirtyBitmapLog(int vm_fd, Mode mode) : vm_fd_(vm_fd), mode_(mode) {}

  int vm_fd_;
  Mode mode_;
  uint64_t clear_chunk_pages_ = uint64_t{1} << 18;  // 1 GiB of 4 KiB pages, as QEMU
};

}  // namespace kvmig::kvm
