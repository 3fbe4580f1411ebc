// The VMM's own record of the guest pages its devices write (a block device completing a
// read into guest RAM, a virtqueue's used ring). Those writes go through our mapping of
// guest memory, not through the guest's page tables, so KVM's dirty log never sees them;
// without this bitmap a page a device filled during pre-copy would be lost.
//
// Marking is lock-free and may run on any thread (device threads, io_uring completions);
// the tracker drains the bits into its harvest.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace kvmig::kvm {

class DeviceDirty {
 public:
  struct Range {
    uint64_t gpa = 0;
    uint64_t size = 0;  // bytes, a multiple of 4 KiB
  };

  // One range per guest RAM slot (the same layout as the memory slots).
  explicit DeviceDirty(const std::vector<Range>& ranges);
  DeviceDirty(const DeviceDirty&) = delete;
  DeviceDirty& operator=(const DeviceDirty&) = delete;

  // Marks every 4 KiB page touched by [gpa, gpa + len). Call it AFTER the write into guest
  // memory has completed, so a harvest that sees the bit also sees the data. Returns false
  // (marking what does lie inside) when part of the range is outside guest RAM.
  bool mark(uint64_t gpa, uint64_t len);

  // ORs the bits of the range starting at `gpa` into out[0 .. (pages + 63) / 64) and clears
  // them. `pages` must not exceed the range's. Returns false if no range starts at gpa.
  bool drain(uint64_t gpa, uint64_t pages, uint64_t* out);

  // Whether any page of [gpa, gpa + len) is marked (tests, diagnostics).
  bool test(uint64_t gpa, uint64_t len) const;

 private:
  struct Slot {
    uint64_t gpa;
    uint64_t pages;
    std::unique_ptr<std::atomic<uint64_t>[]> bits;
  };
  std::vector<Slot> slots_;
};

}  // namespace kvmig::kvm
