// The guest-visible interface of kvmig's paravirtual block device ("kblk", v1), documented
// in full in docs/block-device.md. The test guest has its own C copy of these numbers
// (tests/guests/disk.c); change both together, and bump kBlkVersion.
//
// Registers: 32-bit port I/O at kBlkPortBase + kBlkPortStride * disk. Requests: a ring of
// 32-byte descriptors in guest RAM, announced by writing the guest's free-running "avail"
// index to the doorbell; the device writes each descriptor's status when it completes (in
// any order) and then bumps the ring's "used" counter. No interrupts: the guest polls.
#pragma once

#include <cstdint>

namespace kvmig::kvm {

inline constexpr uint16_t kBlkPortBase = 0x0c80;
inline constexpr uint16_t kBlkPortStride = 0x20;
inline constexpr int kBlkMaxDisks = 4;

inline constexpr uint32_t kBlkMagic = 0x6b6c626b;  // "kblk"
inline constexpr uint32_t kBlkVersion = 1;
inline constexpr uint64_t kBlkSector = 512;

// Register offsets (all 4 bytes wide).
enum BlkReg : uint16_t {
  kBlkRegMagic = 0x00,       // R
  kBlkRegVersion = 0x04,     // R
  kBlkRegCapacityLo = 0x08,  // R  disk size in 512-byte sectors, low 32 bits
  kBlkRegCapacityHi = 0x0c,  // R
  kBlkRegRingLo = 0x10,      // RW ring guest-physical address, staged until RING_SIZE is written
  kBlkRegRingHi = 0x14,      // RW
  kBlkRegRingSize = 0x18,    // RW entries (power of two 8..256) activates; 0 deactivates
  kBlkRegDoorbell = 0x1c,    // W  guest's avail index; R  status bits (kBlkStatus*)
};

inline constexpr uint32_t kBlkStatusRingError = 1;  // bad ring address/size, or avail overran the ring
inline constexpr uint32_t kBlkStatusBadAccess = 2;  // a register access of the wrong width or direction

inline constexpr uint32_t kBlkMinEntries = 8;
inline constexpr uint32_t kBlkMaxEntries = 256;
inline constexpr uint32_t kBlkMaxRequestBytes = 1 << 20;

// Ring layout: a 64-byte header (uint32 used at offset 0, the rest reserved and zero),
// then `entries` descriptors. Page-aligned, wholly inside one RAM region.
inline constexpr uint64_t kBlkRingHeaderBytes = 64;

enum BlkOp : uint8_t { kBlkOpRead = 0, kBlkOpWrite = 1, kBlkOpFlush = 2 };
enum BlkStatus : uint8_t {
  kBlkOk = 0,
  kBlkIoError = 1,      // the host's read/write/fdatasync failed
  kBlkBadRequest = 2,   // a field failed validation; nothing was read or written
  kBlkUnsupported = 3,  // unknown op
  kBlkPending = 0xff,   // set by the guest before publishing; never written by the device
};

struct BlkDescriptor {
  uint8_t op;
  uint8_t status;  // written by the device, last
  uint16_t reserved;
  uint32_t len;     // bytes, a multiple of 512, 1 .. 1 MiB (0 for flush)
  uint64_t sector;  // in 512-byte sectors
  uint64_t addr;    // guest-physical buffer, 512-aligned, wholly inside one RAM region
  uint64_t cookie;  // the guest's own, untouched
};
static_assert(sizeof(BlkDescriptor) == 32);

inline constexpr uint64_t blk_ring_bytes(uint32_t entries) {
  return kBlkRingHeaderBytes + uint64_t{entries} * sizeof(BlkDescriptor);
}

}  // namespace kvmig::kvm
