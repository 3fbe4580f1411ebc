// Multiboot v1 loader: boots an ELF32 Multiboot kernel exactly as `qemu-system-x86_64
// -kernel` does: 32-bit protected mode, flat 4 GiB code (0x08) and data (0x10) segments,
// paging off, EAX=0x2BADB002, EBX=the Multiboot information structure.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/result.h"
#include "kvm/kernel_image.h"

namespace kvmig::kvm {

class GuestMemory;
class Vcpu;

inline constexpr uint32_t kMultibootHeaderMagic = 0x1badb002;
inline constexpr size_t kMultibootSearchBytes = 8192;

// Pure: validates the ELF32 file and its Multiboot header (including the a.out kludge
// addresses when flag 16 is set, which QEMU prefers over the ELF headers) and returns what
// to load where. Does not check against guest RAM: see check_image_fits().
Result<KernelImage> parse_multiboot_elf32(const std::vector<uint8_t>& file);

// Writes the Multiboot information structure at kMultibootInfo; returns its address.
Result<uint64_t> write_multiboot_info(GuestMemory& memory, const std::string& cmdline);

// Validates, copies, writes boot data and sets `bsp`'s registers; reads them back because
// some KVMs (PVM) silently drop control-register bits they do not accept.
Result<void> load_multiboot(const std::vector<uint8_t>& file, const std::string& cmdline, GuestMemory& memory,
                            Vcpu& bsp);

}  // namespace kvmig::kvm
