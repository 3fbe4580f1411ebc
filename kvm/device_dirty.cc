#include "kvm/device_dirty.h"

#include <algorithm>

namespace kvmig::kvm {
namespace {

constexpr uint64_t kPage = 4096;

// Mask of bits [lo, hi) within one 64-bit word, 0 <= lo < hi <= 64.
uint64_t bit_range(uint64_t lo, uint64_t hi) {
  const uint64_t upper = hi == 64 ? ~0ull : (1ull << hi) - 1;
  return upper & ~((1ull << lo) - 1);
}

}  // namespace

DeviceDirty::DeviceDirty(const std::vector<Range>& ranges) {
  for (const Range& r : ranges) {
    const uint64_t pages = r.size / kPage;
    const uint64_t words = (pages + 63) / 64;
    auto bits = std::make_unique<std::atomic<uint64_t>[]>(words);
    for (uint64_t i = 0; i < words; ++i) bits[i].store(0, std::memory_order_relaxed);
    slots_.push_back(Slot{r.gpa, pages, std::move(bits)});
  }
}

bool DeviceDirty::mark(uint64_t gpa, uint64_t len) {
  if (len == 0) return true;
  if (gpa + len < gpa) return false;  // wraps: not a guest range
  uint64_t covered = 0;
  for (Slot& s : slots_) {
    const uint64_t lo = std::max(gpa, s.gpa);
    const uint64_t hi = std::min(gpa + len, s.gpa + s.pages * kPage);
    if (lo >= hi) continue;
    covered += hi - lo;
    const uint64_t first = (lo - s.gpa) / kPage, end = (hi - s.gpa + kPage - 1) / kPage;
    for (uint64_t p = first; p < end;) {
      const uint64_t w = p / 64, bit = p % 64;
      const uint64_t n = std::min<uint64_t>(64 - bit, end - p);
      // Release: the device's write to guest memory happens before a drain sees the bit.
      s.bits[w].fetch_or(bit_range(bit, bit + n), std::memory_order_release);
      p += n;
    }
  }
  return covered == len;
}

bool DeviceDirty::drain(uint64_t gpa, uint64_t pages, uint64_t* out) {
  for (Slot& s : slots_) {
    if (s.gpa != gpa) continue;
    const uint64_t words = (std::min(pages, s.pages) + 63) / 64;
    for (uint64_t i = 0; i < words; ++i) {
      if (s.bits[i].load(std::memory_order_relaxed) == 0) continue;  // cheap skip of clean words
      out[i] |= s.bits[i].exchange(0, std::memory_order_acquire);
    }
    return true;
  }
  return false;
}

bool DeviceDirty::test(uint64_t gpa, uint64_t len) const {
  for (const Slot& s : slots_) {
    const uint64_t lo = std::max(gpa, s.gpa);
    const uint64_t hi = std::min(gpa + len, s.gpa + s.pages * kPage);
    for (uint64_t p = lo >= hi ? 0 : (lo - s.gpa) / kPage; lo < hi && p < (hi - s.gpa + kPage - 1) / kPage; ++p)
      if (s.bits[p / 64].load(std::memory_order_relaxed) & (1ull << (p % 64))) return true;
  }
  return false;
}

}  // namespace kvmig::kvm
