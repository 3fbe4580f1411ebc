// Where kvmig puts its boot data in guest-physical memory. All of it sits in the legacy
// 0xA0000..0xFFFFF area, which the memory map hands to the guest as reserved (as a PC's VGA
// window and BIOS ROM are), so a guest never overwrites it while still reading it.
#pragma once

#include <cstdint>

namespace kvmig::kvm {

inline constexpr uint64_t kEbdaStart = 0x9fc00;         // end of conventional RAM (639 KiB)
inline constexpr uint64_t kBootAreaStart = 0xa0000;
inline constexpr uint64_t kBootAreaEnd = 0x100000;
inline constexpr uint64_t kBootGdt = 0xa0000;           // null, code 0x08, data 0x10
inline constexpr uint64_t kMultibootInfo = 0xa1000;     // info struct, mmap, names, cmdline
inline constexpr uint64_t kMultibootInfoEnd = 0xb0000;
inline constexpr uint64_t kPageTables = 0xb0000;        // PML4, PDPT, then page directories
inline constexpr uint64_t kPageTablesEnd = kBootAreaEnd;

// KVM needs three pages for the real-mode TSS and one for the EPT identity map, outside RAM:
// the addresses QEMU uses too, in the 3..4 GiB hole, reported reserved to the guest.
inline constexpr uint64_t kIdentityMapAddr = 0xfffbc000;
inline constexpr uint64_t kTssAddr = 0xfffbd000;
inline constexpr uint64_t kKvmPrivateEnd = 0xfffc0000;

inline constexpr uint16_t kCodeSelector = 0x08;
inline constexpr uint16_t kDataSelector = 0x10;

}  // namespace kvmig::kvm
