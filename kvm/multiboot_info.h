// The Multiboot v1 information structure kvmig hands to a guest, built like QEMU's -kernel
// does: mem_lower/mem_upper, an e820-style memory map with the 3..4 GiB hole, the command
// line and the boot loader name. Pure functions, so the layout is unit-tested.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/result.h"

namespace kvmig::kvm {

inline constexpr uint32_t kMultibootBootloaderMagic = 0x2badb002;

struct E820Entry {
  uint64_t addr;
  uint64_t len;
  uint32_t type;  // 1 RAM, 2 reserved
};

// The guest's memory map for `ram` bytes of RAM laid out by plan_memory_layout().
std::vector<E820Entry> e820_map(uint64_t ram);

// Returns `cmdline` with " tsc_khz=N" appended unless it already has a tsc_khz= key (or khz
// is 0, when KVM could not tell).
std::string with_tsc_khz(const std::string& cmdline, uint32_t khz);

// Bytes to place at guest-physical `base` (pointers inside are guest-physical). Fails if the
// command line does not fit below `limit`.
Result<std::vector<uint8_t>> build_multiboot_info(uint64_t base, uint64_t limit, uint64_t ram,
                                                  const std::string& cmdline);

}  // namespace kvmig::kvm
