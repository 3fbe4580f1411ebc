// GuestMemory: guest RAM, mapped in kvmig and registered with KVM as memslots.
// Layout (as on a PC, and as QEMU's pc machine does it): RAM below 3 GiB in slot 0, the
// 3..4 GiB hole is left for the LAPIC/IOAPIC and other MMIO, the rest continues at 4 GiB in
// slot 1.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/result.h"

namespace kvmig::kvm {

inline constexpr uint64_t kKiB = 1024;
inline constexpr uint64_t kMiB = 1024 * kKiB;
inline constexpr uint64_t kGiB = 1024 * kMiB;
inline constexpr uint64_t kPageSize = 4096;
inline constexpr uint64_t kHugePageSize = 2 * kMiB;
inline constexpr uint64_t kLowRamEnd = 3 * kGiB;    // RAM above this continues at 4 GiB
inline constexpr uint64_t kHighRamStart = 4 * kGiB;
inline constexpr uint64_t kMinRam = 4 * kMiB;       // room for the boot area and a kernel at 1 MiB

struct SlotPlan {
  uint32_t slot;
  uint64_t gpa;
  uint64_t size;
};

// Pure layout math: where `ram` bytes of RAM go in the guest-physical space.
std::vector<SlotPlan> plan_memory_layout(uint64_t ram);

// Checks `ram` against the host before any mapping: size and alignment, then MemAvailable
// (anonymous RAM, which kvmig maps MAP_NORESERVE, so the kernel would not refuse it and the
// OOM killer would be the error path) or free 2 MiB huge pages. `meminfo` is /proc/meminfo's
// text, passed in so the rule is testable.
Result<void> check_host_memory(uint64_t ram, bool hugepages, const std::string& meminfo);

// Parses "64M", "1G", "512K", "4096" (bytes) into bytes. Errors name the bad text.
Result<uint64_t> parse_size(const std::string& text);

class GuestMemory {
 public:
  struct Region {
    uint32_t slot;
    uint64_t gpa;
    uint64_t size;
    uint8_t* host;
  };

  // Maps `ram` bytes and registers them in `vm_fd`. With `hugepages`, from hugetlbfs 2 MiB
  // pages (which must be reserved on the host), else anonymous memory with MADV_HUGEPAGE.
  static Result<GuestMemory> create(int vm_fd, uint64_t ram, bool hugepages);

  GuestMemory(GuestMemory&& other) noexcept;
  GuestMemory& operator=(GuestMemory&& other) noexcept;
  GuestMemory(const GuestMemory&) = delete;
  GuestMemory& operator=(const GuestMemory&) = delete;
  ~GuestMemory();

  const std::vector<Region>& regions() const { return regions_; }
  // Host address of [gpa, gpa+len), or nullptr unless the whole range is inside one region.
  uint8_t* host_ptr(uint64_t gpa, uint64_t len) const;
  uint64_t ram_size() const { return ram_size_; }
  bool hugepages() const { return hugepages_; }
  // Whether kvm::PageResidency may judge this RAM: private anonymous 4 KiB-page memory, where
  // a page neither present nor swapped was never written. Not hugetlbfs: pagemap shows a huge
  // page under migration (NUMA, memory offline, CMA) as neither, though it holds data.
  bool residency_tells_zero() const { return !hugepages_; }
  // Re-registers a slot with new KVM_MEM_* flags (e.g. KVM_MEM_LOG_DIRTY_PAGES).
  Result<void> set_slot_flags(uint32_t slot, uint32_t flags);
  uint32_t slot_flags(uint32_t slot) const;

 private:
  GuestMemory() = default;
  void unmap();

  int vm_fd_ = -1;
  uint64_t ram_size_ = 0;
  bool hugepages_ = false;
  std::vector<Region> regions_;
  std::vector<uint32_t> flags_;
};

}  // namespace kvmig::kvm
