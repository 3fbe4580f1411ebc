// Guest memory in a state file: its layout, then its non-zero pages as runs.
//
//   "memory.layout" v1  uint32 count, uint32 zero, then count x
//                       {uint32 slot, uint32 zero, uint64 gpa, uint64 size}
//   "memory.run"    v1  uint64 gpa, then the pages [gpa, gpa + length - 8); the length
//                       minus 8 is a non-zero multiple of 4096 and lies inside one region;
//                       in a format-2 file, the pages of a large run start on a 4 KiB
//                       boundary of the file (a "pad" section before the run)
//
// Zero pages are not written: a restored machine's memory is freshly mapped anonymous memory
// (or fresh hugetlbfs pages), which reads as zero. Short runs of zero pages between non-zero
// ones are written anyway, because one large write is cheaper than many small ones.
#pragma once

#include <cstdint>
#include <span>

#include "base/result.h"
#include "kvm/guest_memory.h"
#include "kvm/migratable.h"
#include "kvm/state_file.h"

namespace kvmig::kvm {

inline constexpr uint32_t kMemoryLayoutVersion = 1;
inline constexpr uint32_t kMemoryRunVersion = 1;
inline constexpr char kMemoryLayoutId[] = "memory.layout";
inline constexpr char kMemoryRunId[] = "memory.run";


// One contiguous piece of guest RAM and where it is mapped in this process.
using MemoryRange = GuestMemory::Region;

struct MemoryImageStats {
  uint64_t guest_bytes = 0;  // size of all ranges
  uint64_t data_bytes = 0;   // page bytes written or read
  uint64_t runs = 0;
};

// True if the 4 KiB page at P is all zero (words OR-ed in blocks, stops at the first
// non-zero block: a used page usually says so in its first cache lines).
bool is_zero_page(const uint8_t* p);

StateSection memory_layout_section(std::span<const MemoryRange> ranges);
// The saved layout must equal the machine's: same regions, same slots, same sizes.
Result<void> check_memory_layout(const StateSection& section, std::span<const MemoryRange> ranges);

// Writes the layout section and the runs. The guest must be paused.
Result<MemoryImageStats> save_memory(StateFileWriter& writer, std::span<const MemoryRange> ranges);

// Reads the current section, which must be a "memory.run", straight into guest memory after
// checking its gpa and length lie inside one range. Nothing outside the ranges is written.
Result<void> restore_memory_run(StateFileReader& reader, std::span<const MemoryRange> ranges,
                                MemoryImageStats* stats = nullptr);

}  // namespace kvmig::kvm
