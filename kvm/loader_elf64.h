// ELF64 loader: enters a 64-bit kernel directly in long mode (the kvmig-guest64 contract):
// CPL0, paging on with all guest-physical memory below the top of RAM (and at least 4 GiB,
// so the LAPIC is reachable) identity-mapped with 2 MiB pages, GDT code 0x08 / data 0x10,
// RDI = the Multiboot information structure, RSP = 0.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/result.h"
#include "kvm/kernel_image.h"

namespace kvmig::kvm {

class GuestMemory;
class Vcpu;

// Pure: validates an ELF64 x86-64 executable and returns what to load where.
Result<KernelImage> parse_elf64(const std::vector<uint8_t>& file);

// Pure: the identity-mapping page tables for a `ram`-byte guest, as bytes to place at
// guest-physical `base` (PML4, PDPT, then one page directory per GiB). Fails when they do
// not fit below `limit`.
Result<std::vector<uint8_t>> build_identity_page_tables(uint64_t base, uint64_t limit, uint64_t ram);

Result<void> load_elf64(const std::vector<uint8_t>& file, const std::string& cmdline, GuestMemory& memory, Vcpu& bsp);

}  // namespace kvmig::kvm
