#include "kvm/dirty_bitmap_log.h"

#include "kvm/ioctl.h"

#include <linux/kvm.h>
#include <sys/ioctl.h>

#include <algorithm>
#include <string>
#include <vector>

namespace kvmig::kvm {
namespace {

// kvm_ioctl() with the slot (and pages) the call was about in front of the error.
template <class Arg>
Result<void> slot_ioctl(int fd, unsigned long request, const char* name, Arg arg, const std::string& what) {
  auto r = kvm_ioctl(fd, request, name, arg);
  if (!r.ok()) return std::move(r.error().prefix(what));
  return ok();
}

}  // namespace

Result<void> set_slot_logging(int vm_fd, const LoggedSlot& slot, bool on) {
  kvm_userspace_memory_region region{};
  region.slot = slot.slot;
  region.flags = (slot.flags & ~uint32_t{KVM_MEM_LOG_DIRTY_PAGES}) | (on ? KVM_MEM_LOG_DIRTY_PAGES : 0);
  region.guest_phys_addr = slot.gpa;
  region.memory_size = slot.size;
  region.userspace_addr = reinterpret_cast<uint64_t>(slot.host);
  KVMIG_TRY(slot_ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, "KVM_SET_USER_MEMORY_REGION", &region,
                       std::string("dirty logging ") + (on ? "on" : "off") + " for slot " +
                           std::to_string(slot.slot)));
  return ok();
}

const char* DirtyBitmapLog::mode_name(Mode mode) {
  switch (mode) {
    case Mode::manual_initially_set: return "manual-protect+initially-set";
    case Mode::manual: return "manual-protect";
    case Mode::classic: return "classic";
  }
  return "?";
}

Result<DirtyBitmapLog> DirtyBitmapLog::create(int vm_fd, bool allow_classic, bool use_manual) {
  if (!use_manual) return DirtyBitmapLog(vm_fd, Mode::classic);
  // On the VM fd, the answer is the set of flags this KVM accepts (0 when absent).
  int supported = ::ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
  if (supported < 0) supported = 0;
  if (!(supported & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)) {
    if (!allow_classic)
      return Error{"KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (Linux >= 5.3): cannot track "
                   "dirty pages without write-protecting all guest memory at once"};
    return DirtyBitmapLog(vm_fd, Mode::classic);
  }
  kvm_enable_cap cap{};
  cap.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
  cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
  if (supported & KVM_DIRTY_LOG_INITIALLY_SET) cap.args[0] |= KVM_DIRTY_LOG_INITIALLY_SET;
  KVMIG_TRY(kvm_ioctl(vm_fd, KVM_ENABLE_CAP, "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)", &cap));
  return DirtyBitmapLog(vm_fd, (cap.args[0] & KVM_DIRTY_LOG_INITIALLY_SET) ? Mode::manual_initially_set
                                                                         : Mode::manual);
}

Result<void> DirtyBitmapLog::fetch(const LoggedSlot& slot, uint64_t* words) const {
  kvm_dirty_log log{};
  log.slot = slot.slot;
  log.dirty_bitmap = words;
  auto r = kvm_ioctl(vm_fd_, KVM_GET_DIRTY_LOG, "KVM_GET_DIRTY_LOG", &log);
  if (!r.ok()) return std::move(r.error().prefix("slot " + std::to_string(slot.slot)));
  return ok();
}

Result<void> DirtyBitmapLog::clear(const LoggedSlot& slot, uint64_t first_page, uint64_t num_pages) const {
  if (mode_ == Mode::classic || num_pages == 0) return ok();
  const uint64_t slot_pages = slot.pages();
  if (first_page > slot_pages || num_pages > slot_pages - first_page)
    return Error{"KVM_CLEAR_DIRTY_LOG slot " + std::to_string(slot.slot) + ": pages [" +
                 std::to_string(first_page) + ", +" + std::to_string(num_pages) +
                 ") outside the slot's " + std::to_string(slot_pages) + " pages"};
  const uint64_t end = first_page + num_pages;
  std::vector<uint64_t> mask;
  for (uint64_t chunk = first_page & ~63ull; chunk < end; chunk += clear_chunk_pages_) {
    const uint64_t chunk_end = std::min<uint64_t>(chunk + clear_chunk_pages_, (end + 63) & ~63ull);
    // The last chunk may run up to the slot's end, which need not be 64-aligned.
    const uint64_t kvm_pages = std::min(chunk_end, slot_pages) - chunk;
    mask.assign((kvm_pages + 63) / 64, 0);
    const uint64_t lo = std::max(chunk, first_page), hi = std::min(chunk + kvm_pages, end);
    for (uint64_t p = lo; p < hi;) {
      const uint64_t bit = (p - chunk) % 64;
      const uint64_t n = std::min<uint64_t>(64 - bit, hi - p);
      mask[(p - chunk) / 64] |= (n == 64 ? ~0ull : ((1ull << n) - 1)) << bit;
      p += n;
    }
    kvm_clear_dirty_log clear{};
    clear.slot = slot.slot;
    clear.first_page = chunk;
    clear.num_pages = static_cast<uint32_t>(kvm_pages);
    clear.dirty_bitmap = mask.data();
    auto r = kvm_ioctl(vm_fd_, KVM_CLEAR_DIRTY_LOG, "KVM_CLEAR_DIRTY_LOG", &clear);
    if (!r.ok())
      return std::move(r.error().prefix("slot " + std::to_string(slot.slot) + " pages " +
                                        std::to_string(chunk) + "+" + std::to_string(kvm_pages)));
  }
  return ok();
}

Result<void> DirtyBitmapLog::clear_mask(const LoggedSlot& slot, uint64_t first_page, uint64_t num_pages,
                                        const uint64_t* mask) const {
  if (mode_ == Mode::classic || num_pages == 0) return ok();
  const uint64_t slot_pages = slot.pages();
  const std::string what = "KVM_CLEAR_DIRTY_LOG slot " + std::to_string(slot.slot) + " pages " +
                           std::to_string(first_page) + "+" + std::to_string(num_pages);
  if (first_page > slot_pages || num_pages > slot_pages - first_page)
    return Error{what + ": outside the slot's " + std::to_string(slot_pages) + " pages"};
  // KVM's own rule (kvm_clear_dirty_log_protect): 64-aligned, or running to the slot's end.
  if (first_page % 64 != 0 || (num_pages % 64 != 0 && first_page + num_pages != slot_pages))
    return Error{what + ": not aligned to 64 pages"};
  if (num_pages > UINT32_MAX) return Error{what + ": too many pages for one call"};
  kvm_clear_dirty_log clear{};
  clear.slot = slot.slot;
  clear.first_page = first_page;
  clear.num_pages = static_cast<uint32_t>(num_pages);
  clear.dirty_bitmap = const_cast<uint64_t*>(mask);  // KVM only reads it
  auto r = kvm_ioctl(vm_fd_, KVM_CLEAR_DIRTY_LOG, "KVM_CLEAR_DIRTY_LOG", &clear);
  if (!r.ok()) return std::move(r.error().prefix("slot " + std::to_string(slot.slot)));
  return ok();
}

}  // namespace kvmig::kvm
