// KernelImage: what a loader decided to put where, checked against guest RAM before a single
// byte is copied, so a bad ELF is a clear error and never a write outside guest memory.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/result.h"

namespace kvmig::kvm {

class GuestMemory;

struct KernelImage {
  struct Segment {
    uint64_t gpa = 0;
    uint64_t file_offset = 0;
    uint64_t file_size = 0;  // bytes copied from the file
    uint64_t mem_size = 0;   // bytes occupied in the guest (the rest is zero: bss)
  };
  std::vector<Segment> segments;
  uint64_t entry = 0;
};

// Checks every segment lies in RAM of a `ram`-byte guest (inside one memslot), outside
// kvmig's boot area, and that the entry point is inside a loaded segment. `what` names the
// file in errors.
Result<void> check_image_fits(const KernelImage& image, uint64_t ram);

// Reads a whole kernel file (bounded, so a huge file is an error rather than an OOM).
Result<std::vector<uint8_t>> read_kernel_file(const std::string& path);

// Copies the segments into guest memory. Fresh guest memory is zero, so bss needs no writes
// (which also keeps an 8 GiB guest's start fast); `zero_bss` forces them for reused memory.
Result<void> copy_image(const KernelImage& image, const std::vector<uint8_t>& file, GuestMemory& memory,
                        bool zero_bss = false);

}  // namespace kvmig::kvm
