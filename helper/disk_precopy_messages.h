// The disk part of a live migration on the migration wire (feature bit kFeatureDisks):
// DISKS declares the source's disks after HELLO_ACK, DISKS_READY says the destination's
// copies are open at their sizes, DISK_BLOCKS carries blocks of one disk. All three travel on
// the control stream, between the memory rounds. docs/disk-migration.md is the
// specification; every decoder checks every field against the declared disks before a byte
// is written.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <span>
#include <vector>

#include "base/result.h"
#include "helper/transport.h"
#include "helper/wire.h"

namespace kvmig::helper {

// The layout of DISKS and DISK_BLOCKS, versioned apart from the protocol version (as state
// sections are), so a later layout can be told from this one.
inline constexpr uint32_t kDiskPrecopyFormat = 1;
inline constexpr uint32_t kMaxMigrationDisks = 16;
inline constexpr uint32_t kMinTrackBlock = 4096;      // BlockWriteLog's bounds
inline constexpr uint32_t kMaxTrackBlock = 2u << 20;
inline constexpr uint32_t kMaxDiskBlocksRuns = 4096;
inline constexpr uint64_t kMaxDiskBlocksData = 16u << 20;  // data bytes in one DISK_BLOCKS

struct MigrationDisk {
  uint64_t size = 0;         // bytes, a non-zero multiple of 512
  uint64_t data_bytes = 0;   // bytes in data extents when pre-copy began (room needed)
  uint32_t block_bytes = 0;  // write-tracking block: power of two, 4 KiB..2 MiB
};

struct DisksMsg {
  uint32_t format = kDiskPrecopyFormat;
  std::vector<MigrationDisk> disks;
};

enum class DiskRunKind : uint32_t { data = 0, zero = 1 };

struct DiskRun {
  uint64_t offset = 0;
  uint32_t length = 0;
  DiskRunKind kind = DiskRunKind::data;
};

struct DiskBlocks {
  uint32_t disk = 0;   // index into DISKS
  uint32_t round = 0;  // pre-copy round (non-decreasing on a connection)
  std::vector<DiskRun> runs;
  std::span<const uint8_t> data;  // the data runs' bytes, in run order
};

std::vector<uint8_t> encode(const DisksMsg& m);
Result<DisksMsg> decode_disks(std::span<const uint8_t> payload);

// The DISK_BLOCKS payload up to its data: u32 disk, u32 round, u32 run_count, u32 reserved,
// u64 data_bytes, run_count x {u64 offset, u32 length, u32 kind}.
std::vector<uint8_t> encode_disk_blocks_head(uint32_t disk, uint32_t round,
                                             std::span<const DiskRun> runs);
// Checks every field against the declared disks: disk index, 1..4096 runs, each run inside
// the disk, aligned to its block (a run may end short only at the disk's end), runs
// ascending and not overlapping, kinds known, data bytes matching the data runs exactly and
// at most 16 MiB.
Result<DiskBlocks> decode_disk_blocks(std::span<const uint8_t> payload, const DisksMsg& declared);

// Sends DISK_BLOCKS: the encoded head then `data` (the data runs' bytes) in one gather write,
// the checksum over all of it (the bytes were read from the disk into a buffer before, so
// unlike MEM_PAGES they cannot change between checksum and send).
Result<void> send_disk_blocks(Stream& stream, uint16_t version, std::span<const uint8_t> head,
                              std::span<const iovec> data);

}  // namespace kvmig::helper
