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
#include <string>
#include <vector>

#include "base/result.h"
#include "helper/disk_layer_id.h"
#include "helper/transport.h"
#include "helper/wire.h"

namespace kvmig::helper {

// The layout of DISKS and DISK_BLOCKS, versioned apart from the protocol version (as state
// sections are), so a later layout can be told from this one. Format 2 adds each disk's
// backing chain (docs/disk-migration.md, "Chained disks"); a source sends it only when a disk
// has one, so a destination that reads format 1 only refuses exactly those migrations
// ("disk format 2, this kvmig reads format 1"), never misreads them.
inline constexpr uint32_t kDiskPrecopyFormat = 1;
inline constexpr uint32_t kDiskPrecopyChainFormat = 2;
inline constexpr uint32_t kMaxMigrationLayers = 63;       // lower layers per disk
inline constexpr uint32_t kMaxLayerName = 255;            // a file name, as on Linux
inline constexpr size_t kMaxDisksPayload = 64 * 1024;     // DISKS with its chains
inline constexpr uint32_t kMaxMigrationDisks = 16;
inline constexpr uint32_t kMinTrackBlock = 4096;      // BlockWriteLog's bounds
inline constexpr uint32_t kMaxTrackBlock = 2u << 20;
inline constexpr uint32_t kMaxDiskBlocksRuns = 4096;
inline constexpr uint64_t kMaxDiskBlocksData = 16u << 20;  // data bytes in one DISK_BLOCKS

// A read-only layer under a disk's top (a kvmig base or delta): never written while the VM
// runs, so it is copied once, or not at all when the destination already holds it.
struct MigrationLayer {
  uint64_t size = 0;        // bytes: the disk's size
  uint64_t data_bytes = 0;  // bytes in its data extents (room needed if it is copied)
  LayerId id;               // content ID (helper/disk_layer_id.h), never zero
  std::string name;         // its file name: no '/', not "." or "..", no sidecar suffix
};

struct MigrationDisk {
  uint64_t size = 0;         // bytes, a non-zero multiple of 512
  uint64_t data_bytes = 0;   // bytes in data extents when pre-copy began (room needed)
  uint32_t block_bytes = 0;  // write-tracking block: power of two, 4 KiB..2 MiB
  // Base first. Empty: a raw disk. Otherwise the disk is the (writable) top of this chain,
  // and only the top is migrated live; layer 0 is raw, the others kvmig deltas.
  std::vector<MigrationLayer> lower;
};

struct DisksMsg {
  uint32_t format = kDiskPrecopyFormat;  // encode() writes 2 when a disk has a chain
  std::vector<MigrationDisk> disks;
  size_t layer_count() const;  // lower layers over all disks
};

// DISKS_READY's answer for each lower layer, in DISKS order (disk by disk, base first).
enum class LayerAnswer : uint32_t {
  copy = 0,  // the destination lacks it, or holds a file of that name with another ID
  held = 1,  // the destination holds it: its own content ID of its own file matched
};
struct DisksReady {
  std::vector<LayerAnswer> layers;
};
// Format 1 (no chains): an empty payload. Format 2: u32 count, count x u32 answer.
std::vector<uint8_t> encode(const DisksReady& m);
// Checks the answer against the DISKS it answers: one per declared layer, each known.
Result<DisksReady> decode_disks_ready(std::span<const uint8_t> payload, const DisksMsg& declared);

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
// The same against explicit targets: the declared disks, then the lower layers being copied
// (index disks + k for the k-th layer answered `copy`, in DISKS order).
Result<DiskBlocks> decode_disk_blocks(std::span<const uint8_t> payload, std::span<const MigrationDisk> targets);

// Sends DISK_BLOCKS: the encoded head then `data` (the data runs' bytes) in one gather write,
// the checksum over all of it (the bytes were read from the disk into a buffer before, so
// unlike MEM_PAGES they cannot change between checksum and send).
Result<void> send_disk_blocks(Stream& stream, uint16_t version, std::span<const uint8_t> head,
                              std::span<const iovec> data);

}  // namespace kvmig::helper
