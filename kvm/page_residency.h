// Which pages of this process's own anonymous memory have never been touched.
//
// A guest's RAM is private anonymous memory: a page the guest (or the VMM) never wrote, and
// that is neither mapped nor swapped out, reads as zeros. Round 1 of a migration must tell
// zero pages from data in all of guest RAM; reading an untouched page to find out costs a
// page fault (and maps the shared zero page), ~1 us each: 0.3 s for an idle 1280 MiB guest.
// /proc/self/pagemap answers the same question for 512 pages with one 4 KiB read.
#pragma once

#include <cstdint>
#include <vector>

#include "base/fd.h"

namespace kvmig::kvm {

class PageResidency {
 public:
  // Opens /proc/self/pagemap; where it cannot be read (an unusual kernel or sandbox),
  // every page counts as touched and callers fall back to reading memory.
  PageResidency();

  // For the `pages` 4 KiB pages from `host` (page-aligned, private anonymous memory), sets
  // out[i] = 1 when page i may hold data (present or swapped), 0 when it was never touched
  // and so is zero. Returns false if pagemap could not answer: then treat all as touched.
  // Thread-safe (preads only). A page touched after the call is not seen: callers ask after
  // re-arming the page's write trace, so such a write is caught by the next harvest.
  bool touched(const void* host, uint64_t pages, std::vector<uint8_t>& out) const;

  bool available() const { return fd_.valid(); }

 private:
  Fd fd_;
};

}  // namespace kvmig::kvm
