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

size_t DisksMsg::layer_count() const {
  size_t n = 0;
  for (const MigrationDisk& d : disks) n += d.lower.size();
  return n;
}

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Why a layer name from the network cannot name a file next to the destination's copy, or
// nullptr. It is used as one path component: nothing may lead it elsewhere or onto a sidecar.
const char* bad_layer_name(const std::string& n) {
  if (n.empty() || n.size() > kMaxLayerName) return "is empty or longer than 255 bytes";
  if (n == "." || n == "..") return "is . or ..";
  for (unsigned char c : n)
    if (c == '/' || c < 0x20 || c == 0x7f) return "contains '/' or a control character";
  if (ends_with(n, ".kvmig-delta") || ends_with(n, kLayerIdSuffix) || ends_with(n, ".tmp"))
    return "names a kvmig sidecar";
  return nullptr;
}

}  // namespace

std::vector<uint8_t> encode(const DisksMsg& m) {
  ByteWriter w;
  uint32_t format = m.format;
  if (format == kDiskPrecopyFormat && m.layer_count() > 0) format = kDiskPrecopyChainFormat;
  w.u32(format);
  w.u32(static_cast<uint32_t>(m.disks.size()));
  for (const MigrationDisk& d : m.disks) {
    w.u64(d.size);
    w.u64(d.data_bytes);
    w.u32(d.block_bytes);
    w.u32(static_cast<uint32_t>(d.lower.size()));  // format 1: reserved, 0
    for (const MigrationLayer& l : d.lower) {
      w.u64(l.size);
      w.u64(l.data_bytes);
      w.u64(l.id.hi);
      w.u64(l.id.lo);
      w.u32(static_cast<uint32_t>(l.name.size()));
      w.bytes(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(l.name.data()), l.name.size()));
    }
  }
  return w.take();
}

std::vector<uint8_t> encode(const DisksReady& m) {
  ByteWriter w;
  if (m.layers.empty()) return w.take();
  w.u32(static_cast<uint32_t>(m.layers.size()));
  for (LayerAnswer a : m.layers) w.u32(static_cast<uint32_t>(a));
  return w.take();
}

Result<DisksReady> decode_disks_ready(std::span<const uint8_t> payload, const DisksMsg& declared) {
  DisksReady m;
  size_t want = declared.layer_count();
  if (want == 0) {
    if (!payload.empty()) return malformed("DISKS_READY: a payload, but no disk has a chain");
    return m;
  }
  ByteReader r(payload, "DISKS_READY");
  KVMIG_ASSIGN(uint32_t count, r.u32());
  if (count != want)
    return malformed("DISKS_READY: " + std::to_string(count) + " layer answers, " + std::to_string(want) +
                     " layers declared");
  for (uint32_t i = 0; i < count; ++i) {
    KVMIG_ASSIGN(uint32_t a, r.u32());
    if (a > static_cast<uint32_t>(LayerAnswer::held))
      return malformed("DISKS_READY: layer " + std::to_string(i) + ": unknown answer " + std::to_string(a));
    m.layers.push_back(static_cast<LayerAnswer>(a));
  }
  KVMIG_TRY(r.finish());
  return m;
}

Result<DisksMsg> decode_disks(std::span<const uint8_t> payload) {
  if (payload.size() > kMaxDisksPayload)
    return wire_error(WireCode::oversize, "DISKS: " + std::to_string(payload.size()) + " bytes, at most " +
                                              std::to_string(kMaxDisksPayload));
  ByteReader r(payload, "DISKS");
  DisksMsg m;
  KVMIG_ASSIGN(m.format, r.u32());
  if (m.format != kDiskPrecopyFormat && m.format != kDiskPrecopyChainFormat)
    return wire_error(WireCode::config_mismatch, "DISKS: disk format " + std::to_string(m.format) +
                                                     ", this kvmig reads formats " +
                                                     std::to_string(kDiskPrecopyFormat) + " and " +
                                                     std::to_string(kDiskPrecopyChainFormat));
  KVMIG_ASSIGN(uint32_t count, r.u32());
  if (count == 0 || count > kMaxMigrationDisks)
    return malformed("DISKS: " + std::to_string(count) + " disks, want 1.." +
                     std::to_string(kMaxMigrationDisks));
  for (uint32_t i = 0; i < count; ++i) {
    MigrationDisk d;
    KVMIG_ASSIGN(d.size, r.u64());
    KVMIG_ASSIGN(d.data_bytes, r.u64());
    KVMIG_ASSIGN(d.block_bytes, r.u32());
    KVMIG_ASSIGN(uint32_t layers, r.u32());  // format 1: reserved, 0
    std::string which = "DISKS: disk " + std::to_string(i) + ": ";
    if (d.size == 0 || d.size % 512 != 0)
      return malformed(which + "size " + std::to_string(d.size) + " is not a non-zero multiple of 512");
    if (d.data_bytes > d.size) return malformed(which + "data bytes exceed its size");
    if (!power_of_two(d.block_bytes) || d.block_bytes < kMinTrackBlock || d.block_bytes > kMaxTrackBlock)
      return malformed(which + "block size " + std::to_string(d.block_bytes) +
                       " is not a power of two in 4 KiB..2 MiB");
    if (m.format == kDiskPrecopyFormat && layers != 0) return malformed(which + "reserved field set");
    if (layers > kMaxMigrationLayers)
      return malformed(which + std::to_string(layers) + " lower layers, at most " + std::to_string(kMaxMigrationLayers));
    for (uint32_t j = 0; j < layers; ++j) {
      MigrationLayer l;
      KVMIG_ASSIGN(l.size, r.u64());
      KVMIG_ASSIGN(l.data_bytes, r.u64());
      KVMIG_ASSIGN(l.id.hi, r.u64());
      KVMIG_ASSIGN(l.id.lo, r.u64());
      KVMIG_ASSIGN(uint32_t name_len, r.u32());
      std::string layer = which + "layer " + std::to_string(j) + ": ";
      if (name_len > kMaxLayerName) return malformed(layer + "name of " + std::to_string(name_len) + " bytes");
      KVMIG_ASSIGN(auto name, r.bytes(name_len));
      l.name.assign(reinterpret_cast<const char*>(name.data()), name.size());
      if (const char* why = bad_layer_name(l.name)) return malformed(layer + "name " + why);
      if (l.size != d.size)
        return malformed(layer + "size " + std::to_string(l.size) + ", the disk's " + std::to_string(d.size));
      if (l.data_bytes > l.size) return malformed(layer + "data bytes exceed its size");
      if (l.id.zero()) return malformed(layer + "no content ID");
      for (const MigrationLayer& other : d.lower)
        if (other.name == l.name) return malformed(layer + "name '" + l.name + "' twice in the chain");
      // Disks may share a base (same name, same content), never one name for two contents.
      for (const MigrationDisk& od : m.disks)
        for (const MigrationLayer& other : od.lower)
          if (other.name == l.name && !(other.id == l.id))
            return malformed(layer + "name '" + l.name + "' used by another disk for other content");
      d.lower.push_back(std::move(l));
    }
    m.disks.push_back(std::move(d));
  }
  if (m.format == kDiskPrecopyChainFormat && m.layer_count() == 0)
    return malformed("DISKS: format 2 without any chain");
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
  return decode_disk_blocks(payload, std::span<const MigrationDisk>(declared.disks));
}

Result<DiskBlocks> decode_disk_blocks(std::span<const uint8_t> payload, std::span<const MigrationDisk> targets) {
  ByteReader r(payload, "DISK_BLOCKS");
  DiskBlocks m;
  KVMIG_ASSIGN(m.disk, r.u32());
  KVMIG_ASSIGN(m.round, r.u32());
  KVMIG_ASSIGN(uint32_t count, r.u32());
  KVMIG_ASSIGN(uint32_t reserved, r.u32());
  KVMIG_ASSIGN(uint64_t data_bytes, r.u64());
  if (m.disk >= targets.size())
    return malformed("DISK_BLOCKS: disk " + std::to_string(m.disk) + ", " + std::to_string(targets.size()) +
                     " declared");
  if (count == 0 || count > kMaxDiskBlocksRuns)
    return malformed("DISK_BLOCKS: " + std::to_string(count) + " runs, want 1.." +
                     std::to_string(kMaxDiskBlocksRuns));
  if (reserved != 0) return malformed("DISK_BLOCKS: reserved field set");
  if (data_bytes > kMaxDiskBlocksData)
    return wire_error(WireCode::oversize, "DISK_BLOCKS: " + std::to_string(data_bytes) + " data bytes");
  const MigrationDisk& disk = targets[m.disk];
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
