#include "kvm/page_residency.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace kvmig::kvm {
namespace {

// pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
constexpr uint64_t kPresent = 1ull << 63;
constexpr uint64_t kSwapped = 1ull << 62;
constexpr uint64_t kPage = 4096;
constexpr uint64_t kEntriesPerRead = 512;  // one 4 KiB read: 2 MiB of memory

}  // namespace

PageResidency::PageResidency() : fd_(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)) {}

bool PageResidency::touched(const void* host, uint64_t pages, std::vector<uint8_t>& out) const {
  const auto addr = reinterpret_cast<uintptr_t>(host);
  if (!fd_.valid() || addr % kPage != 0) return false;
  out.assign(pages, 1);
  uint64_t entries[kEntriesPerRead];
  for (uint64_t done = 0; done < pages;) {
    const uint64_t want = std::min<uint64_t>(kEntriesPerRead, pages - done);
    const off_t off = static_cast<off_t>((addr / kPage + done) * sizeof(uint64_t));
    ssize_t got;
    do got = ::pread(fd_.get(), entries, want * sizeof(uint64_t), off);
    while (got < 0 && errno == EINTR);
    if (got <= 0 || got % sizeof(uint64_t) != 0) {
      out.assign(pages, 1);
      return false;
    }
    const uint64_t n = static_cast<uint64_t>(got) / sizeof(uint64_t);
    for (uint64_t i = 0; i < n; ++i) out[done + i] = (entries[i] & (kPresent | kSwapped)) != 0;
    done += n;
  }
  return true;
}

}  // namespace kvmig::kvm
