#include "helper/disk_precopy_messages.h"

#ifndef XXH_STATIC_LINKING_ONLY
#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t on the stack
#endif
#include <xxhash.h>

#include <string>

namespace kvmig::helper {
namespace {

bool power_of_two(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

Error malformed(const std::string& text) { return wire_error(WireCode::malformed, text); }

}  // namespace

std::vector<uint8_t> encode(const DisksMsg& m) {
  ByteWriter w;
  w.u32(m.format);
  w.u32(static_cast<uint32_t>(m.disks.size()));
  for (const MigrationDisk& d : m.disks) {
    w.u64(d.size);
    w.u64(d.data_bytes);
    w.u32(d.block_bytes);
    w.u32(0);
  }
  return w.take();
}

Result<DisksMsg> decode_disks(std::span<const uint8_t> payload) {
  ByteReader r(payload, "DISKS");
  DisksMsg m;
  KVMIG_ASSIGN(m.format, r.u32());
  if (m.format != kDiskPrecopyFormat)
    return wire_error(WireCode::config_mismatch, "DISKS: disk format " + std::to_string(m.format) +
                                                     ", this kvmig reads format " +
                                                     std::to_string(kDiskPrecopyFormat));
  KVMIG_ASSIGN(uint32_t count, r.u32());
  if (count == 0 || count > kMaxMigrationDisks)
    return malformed("DISKS: " + std::to_string(count) + " disks, want 1.." +
                     std::to_string(kMaxMigrationDisks));
  for (uint32_t i = 0; i < count; ++i) {
    MigrationDisk d;
    KVMIG_ASSIGN(d.size, r.u64());
    KVMIG_ASSIGN(d.data_bytes, r.u64());
    KVMIG_ASSIGN(d.block_bytes, r.u32());
    KVMIG_ASSIGN(uint32_t reserved, r.u32());
    std::string which = "DISKS: disk " + std::to_string(i) + ": ";
    if (d.size == 0 || d.size % 512 != 0)
      return malformed(which + "size " + std::to_string(d.size) + " is not a non-zero multiple of 512");
    if (d.data_bytes > d.size) return malformed(which + "data bytes exceed its size");
    if (!power_of_two(d.block_bytes) || d.block_bytes < kMinTrackBlock || d.block_bytes > kMaxTrackBlock)
      return malformed(which + "block size " + std::to_string(d.block_bytes) +
                       " is not a power of two in 4 KiB..2 MiB");
    if (reserved != 0) return malformed(which + "reserved field set");
    m.disks.push_back(d);
  }
  KVMIG_TRY(r.finish());
  return m;
}

std::vector<uint8_t> encode_disk_blocks_head(uint32_t disk, uint32_t round,
                                             std::span<const DiskRun> runs) {
  ByteWriter w;
  uint64_t data = 0;
  for (const DiskRun& run : runs)
    if (run.kind == DiskRunKind::data) data += run.length;
  w.u32(disk);
  w.u32(round);
  w.u32(static_cast<uint32_t>(runs.size()));
  w.u32(0);
  w.u64(data);
  for (const DiskRun& run : runs) {
    w.u64(run.offset);
    w.u32(run.length);
    w.u32(static_cast<uint32_t>(run.kind));
  }
  return w.take();
}

Result<DiskBlocks> decode_disk_blocks(std::span<const uint8_t> payload, const DisksMsg& declared) {
  ByteReader r(payload, "DISK_BLOCKS");
  DiskBlocks m;
  KVMIG_ASSIGN(m.disk, r.u32());
  KVMIG_ASSIGN(m.round, r.u32());
  KVMIG_ASSIGN(uint32_t count, r.u32());
  KVMIG_ASSIGN(uint32_t reserved, r.u32());
  KVMIG_ASSIGN(uint64_t data_bytes, r.u64());
  if (m.disk >= declared.disks.size())
    return malformed("DISK_BLOCKS: disk " + std::to_string(m.disk) + ", " +
                     std::to_string(declared.disks.size()) + " declared");
  if (count == 0 || count > kMaxDiskBlocksRuns)
    return malformed("DISK_BLOCKS: " + std::to_string(count) + " runs, want 1.." +
                     std::to_string(kMaxDiskBlocksRuns));
  if (reserved != 0) return malformed("DISK_BLOCKS: reserved field set");
  if (data_bytes > kMaxDiskBlocksData)
    return wire_error(WireCode::oversize, "DISK_BLOCKS: " + std::to_string(data_bytes) + " data bytes");
  const MigrationDisk& disk = declared.disks[m.disk];
  uint64_t end = 0, sum = 0;
  for (uint32_t i = 0; i < count; ++i) {
    DiskRun run;
    KVMIG_ASSIGN(run.offset, r.u64());
    KVMIG_ASSIGN(run.length, r.u32());
    KVMIG_ASSIGN(uint32_t kind, r.u32());
    std::string where = "DISK_BLOCKS: disk " + std::to_string(m.disk) + " run [" +
                        std::to_string(run.offset) + ", +" + std::to_string(run.length) + ")";
    if (kind > static_cast<uint32_t>(DiskRunKind::zero)) return malformed(where + ": unknown kind");
    run.kind = static_cast<DiskRunKind>(kind);
    if (run.length == 0 || run.offset >= disk.size || run.length > disk.size - run.offset)
      return malformed(where + " is empty or outside the disk's " + std::to_string(disk.size) + " bytes");
    uint64_t run_end = run.offset + run.length;
    if (run.offset % disk.block_bytes != 0 || (run.length % disk.block_bytes != 0 && run_end != disk.size))
      return malformed(where + " is not aligned to its " + std::to_string(disk.block_bytes) + "-byte blocks");
    if (i > 0 && run.offset < end) return malformed(where + " overlaps or precedes the run before it");
    end = run_end;
    if (run.kind == DiskRunKind::data) sum += run.length;
    m.runs.push_back(run);
  }
  if (sum != data_bytes)
    return malformed("DISK_BLOCKS: data runs sum to " + std::to_string(sum) + " bytes, head says " +
                     std::to_string(data_bytes));
  if (r.remaining() != data_bytes)
    return malformed("DISK_BLOCKS: " + std::to_string(r.remaining()) + " data bytes follow, want " +
                     std::to_string(data_bytes));
  KVMIG_ASSIGN(m.data, r.bytes(data_bytes));
  KVMIG_TRY(r.finish());
  return m;
}

Result<void> send_disk_blocks(Stream& stream, uint16_t version, std::span<const uint8_t> head,
                              std::span<const iovec> data) {
  XXH3_state_t state;
  XXH3_64bits_reset(&state);
  XXH3_64bits_update(&state, head.data(), head.size());
  uint64_t length = head.size();
  for (const iovec& v : data) {
    XXH3_64bits_update(&state, v.iov_base, v.iov_len);
    length += v.iov_len;
  }
  WireHeader h;
  h.version = version;
  h.type = MsgType::disk_blocks;
  h.length = length;
  h.checksum = XXH3_64bits_digest(&state);
  uint8_t frame[kHeaderSize];
  encode_header(h, frame);
  std::vector<iovec> iov;
  iov.reserve(2 + data.size());
  iov.push_back({frame, kHeaderSize});
  iov.push_back({const_cast<uint8_t*>(head.data()), head.size()});
  iov.insert(iov.end(), data.begin(), data.end());
  return stream.write_all(iov);
}

}  // namespace kvmig::helper
