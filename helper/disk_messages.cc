#include "helper/disk_messages.h"

#ifndef XXH_STATIC_LINKING_ONLY
#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t on the stack
#endif
#include <xxhash.h>

#include "helper/disk_extents.h"
#include "helper/messages.h"

namespace kvmig::helper {
namespace {

constexpr uint64_t kMaxSmallPayload = 64 << 10;

bool power_of_two(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

// A relative path of plain components: no "..", no empty or "." parts, no control bytes.
// The server resolves it beneath its root as well (openat2 RESOLVE_BENEATH); this is the
// first line.
bool path_ok(const std::string& p) {
  if (p.empty() || p.size() > kMaxDiskPath || p.front() == '/') return false;
  size_t start = 0;
  while (start <= p.size()) {
    size_t end = p.find('/', start);
    if (end == std::string::npos) end = p.size();
    std::string part = p.substr(start, end - start);
    if (part.empty() || part == "." || part == "..") return false;
    for (char c : part)
      if (static_cast<unsigned char>(c) < 0x20) return false;
    start = end + 1;
  }
  return true;
}

}  // namespace

const char* disk_msg_name(DiskMsg type) {
  switch (type) {
    case DiskMsg::open: return "OPEN";
    case DiskMsg::resume_from: return "RESUME_FROM";
    case DiskMsg::extent: return "EXTENT";
    case DiskMsg::zero: return "ZERO";
    case DiskMsg::hole: return "HOLE";
    case DiskMsg::ack: return "ACK";
    case DiskMsg::stop: return "STOP";
    case DiskMsg::stopped: return "STOPPED";
    case DiskMsg::done: return "DONE";
    case DiskMsg::verified: return "VERIFIED";
    case DiskMsg::error: return "ERROR";
    case DiskMsg::chain: return "CHAIN";
    case DiskMsg::chain_status: return "CHAIN_STATUS";
    case DiskMsg::link: return "LINK";
    case DiskMsg::linked: return "LINKED";
  }
  return "UNKNOWN";
}

std::vector<uint8_t> encode(const DiskOpen& m) {
  ByteWriter w;
  w.u64(m.image_size);
  w.u32(m.block_size);
  w.u32(m.max_extent);
  w.u64(m.data_bytes);
  w.u64(m.content_id);
  w.u32(m.flags);
  w.str(m.path);
  return w.take();
}

Result<void> validate(const DiskOpen& m) {
  auto bad = [](const std::string& what) { return wire_error(WireCode::malformed, "OPEN: " + what); };
  if (m.image_size == 0 || (m.image_size % kDiskSectorSize != 0 && !(m.flags & kOpenAnySize)))
    return bad("image size " + std::to_string(m.image_size) + " is not a non-zero multiple of 512 (not aligned)");
  if (!power_of_two(m.block_size) || m.block_size < kMinDiskBlock || m.block_size > kMaxDiskBlock)
    return bad("block size " + std::to_string(m.block_size) + " is not a power of two in 4 KiB..16 MiB");
  if (m.max_extent < kMinDiskBlock || m.max_extent > kMaxExtentBytes || m.max_extent % 4096 != 0)
    return bad("chunk " + std::to_string(m.max_extent) + " is not a multiple of 4 KiB in 4 KiB..16 MiB");
  if (m.data_bytes > m.image_size) return bad("data bytes exceed the image size");
  if (m.flags & ~kOpenKnownFlags) return bad("unknown flags");
  if (!path_ok(m.path))
    return wire_error(WireCode::malformed, "OPEN: destination path '" + m.path.substr(0, 200) +
                                               "' must be relative, without '..' or empty parts");
  return ok();
}

Result<DiskOpen> decode_disk_open(std::span<const uint8_t> payload) {
  ByteReader r(payload, "OPEN");
  DiskOpen m;
  KVMIG_ASSIGN(m.image_size, r.u64());
  KVMIG_ASSIGN(m.block_size, r.u32());
  KVMIG_ASSIGN(m.max_extent, r.u32());
  KVMIG_ASSIGN(m.data_bytes, r.u64());
  KVMIG_ASSIGN(m.content_id, r.u64());
  KVMIG_ASSIGN(m.flags, r.u32());
  KVMIG_ASSIGN(m.path, r.str(kMaxDiskPath));
  KVMIG_TRY(r.finish());
  KVMIG_TRY(validate(m));
  return m;
}

const char* layer_format_name(LayerFormat f) {
  switch (f) {
    case LayerFormat::raw: return "raw";
    case LayerFormat::qcow2: return "qcow2";
    case LayerFormat::kvmig_delta: return "kvmig-delta";
  }
  return "unknown";
}

const char* layer_status_name(LayerStatus s) {
  switch (s) {
    case LayerStatus::missing: return "missing";
    case LayerStatus::held: return "held";
    case LayerStatus::differs: return "differs";
    case LayerStatus::partial: return "partial";
  }
  return "unknown";
}

std::vector<uint8_t> encode(const DiskChain& m) {
  ByteWriter w;
  w.u32(static_cast<uint32_t>(m.layers.size()));
  for (const DiskChainLayer& l : m.layers) {
    w.u8(static_cast<uint8_t>(l.format));
    w.u64(l.size);
    w.u64(l.id_hi);
    w.u64(l.id_lo);
    w.str(l.path);
  }
  return w.take();
}

Result<void> validate(const DiskChain& m) {
  auto bad = [](const std::string& what) { return wire_error(WireCode::malformed, "chain: " + what); };
  if (m.layers.empty() || m.layers.size() > kMaxChainLayers)
    return bad(std::to_string(m.layers.size()) + " layers, want 1.." + std::to_string(kMaxChainLayers));
  size_t bytes = 4;
  for (size_t i = 0; i < m.layers.size(); ++i) {
    const DiskChainLayer& l = m.layers[i];
    std::string at = "layer " + std::to_string(i) + " (" + l.path.substr(0, 200) + "): ";
    bytes += 29 + l.path.size();
    if (!path_ok(l.path)) return bad(at + "path must be relative, without '..' or empty parts");
    for (size_t j = 0; j < i; ++j)
      if (m.layers[j].path == l.path) return bad(at + "the same path twice (a loop)");
    if (l.size == 0) return bad(at + "empty");
    bool sized = l.size % kDiskSectorSize == 0;
    switch (l.format) {
      case LayerFormat::raw:
        if (i != 0) return bad(at + "a raw image can only be the base");
        if (!sized) return bad(at + "size " + std::to_string(l.size) + " is not a multiple of 512 (not aligned)");
        break;
      case LayerFormat::kvmig_delta:
        if (i == 0 || m.layers[i - 1].format == LayerFormat::qcow2)
          return bad(at + "a kvmig delta needs a raw or kvmig-delta parent");
        if (l.size != m.layers[i - 1].size)
          return bad(at + "size " + std::to_string(l.size) + " differs from its parent's " +
                     std::to_string(m.layers[i - 1].size));
        break;
      case LayerFormat::qcow2:
        if (i > 0 && m.layers[i - 1].format == LayerFormat::kvmig_delta)
          return bad(at + "a qcow2 layer cannot sit on a kvmig delta");
        break;
      default: return bad(at + "unknown format " + std::to_string(static_cast<int>(l.format)));
    }
  }
  if (bytes > kMaxSmallPayload) return bad("too long for one message (" + std::to_string(bytes) + " bytes)");
  return ok();
}

Result<DiskChain> decode_disk_chain(std::span<const uint8_t> payload, const char* what) {
  ByteReader r(payload, what);
  KVMIG_ASSIGN(uint32_t count, r.u32());
  if (count == 0 || count > kMaxChainLayers)
    return wire_error(WireCode::malformed, std::string(what) + ": " + std::to_string(count) + " layers");
  DiskChain m;
  for (uint32_t i = 0; i < count; ++i) {
    DiskChainLayer l;
    KVMIG_ASSIGN(uint8_t format, r.u8());
    l.format = static_cast<LayerFormat>(format);
    KVMIG_ASSIGN(l.size, r.u64());
    KVMIG_ASSIGN(l.id_hi, r.u64());
    KVMIG_ASSIGN(l.id_lo, r.u64());
    KVMIG_ASSIGN(l.path, r.str(kMaxDiskPath));
    m.layers.push_back(std::move(l));
  }
  KVMIG_TRY(r.finish());
  if (auto v = validate(m); !v.ok()) return std::move(v.error().prefix(what));
  return m;
}

std::vector<uint8_t> encode(const std::vector<LayerStatus>& statuses) {
  ByteWriter w;
  w.u32(static_cast<uint32_t>(statuses.size()));
  for (LayerStatus s : statuses) w.u8(static_cast<uint8_t>(s));
  return w.take();
}

Result<std::vector<LayerStatus>> decode_layer_statuses(std::span<const uint8_t> payload,
                                                       size_t expect_count) {
  ByteReader r(payload, "CHAIN_STATUS");
  KVMIG_ASSIGN(uint32_t count, r.u32());
  if (count != expect_count)
    return wire_error(WireCode::malformed, "CHAIN_STATUS: " + std::to_string(count) + " layers, sent " +
                                               std::to_string(expect_count));
  std::vector<LayerStatus> out;
  for (uint32_t i = 0; i < count; ++i) {
    KVMIG_ASSIGN(uint8_t s, r.u8());
    if (s > kMaxLayerStatus)
      return wire_error(WireCode::malformed, "CHAIN_STATUS: unknown status " + std::to_string(s));
    out.push_back(static_cast<LayerStatus>(s));
  }
  KVMIG_TRY(r.finish());
  return out;
}

std::vector<uint8_t> encode_range(const DiskRange& m) {
  ByteWriter w;
  w.u64(m.offset);
  w.u64(m.length);
  return w.take();
}

Result<DiskRange> decode_disk_range(std::span<const uint8_t> payload, const char* what) {
  ByteReader r(payload, what);
  DiskRange m;
  KVMIG_ASSIGN(m.offset, r.u64());
  KVMIG_ASSIGN(m.length, r.u64());
  KVMIG_TRY(r.finish());
  if (m.length == 0 || m.offset + m.length < m.offset)
    return wire_error(WireCode::malformed, std::string(what) + ": empty or wrapping range");
  return m;
}

std::vector<uint8_t> encode_u64(uint64_t v) {
  ByteWriter w;
  w.u64(v);
  return w.take();
}

Result<uint64_t> decode_disk_u64(std::span<const uint8_t> payload, const char* what) {
  ByteReader r(payload, what);
  KVMIG_ASSIGN(uint64_t v, r.u64());
  KVMIG_TRY(r.finish());
  return v;
}

std::vector<uint8_t> encode(const DiskDone& m) {
  ByteWriter w;
  w.u64(m.xxh3);
  w.u64(m.image_size);
  return w.take();
}

Result<DiskDone> decode_disk_done(std::span<const uint8_t> payload) {
  ByteReader r(payload, "DONE");
  DiskDone m;
  KVMIG_ASSIGN(m.xxh3, r.u64());
  KVMIG_ASSIGN(m.image_size, r.u64());
  KVMIG_TRY(r.finish());
  return m;
}

void encode_disk_header(const DiskHeader& h, uint8_t out[kHeaderSize]) {
  encode_frame({kDiskMagic, kDiskVersion, static_cast<uint16_t>(h.type), 0, 0, h.length,
                h.checksum},
               out);
}

Result<DiskHeader> decode_disk_header(const uint8_t in[kHeaderSize]) {
  KVMIG_ASSIGN(Frame f, decode_frame(in, kDiskMagic, "disk"));
  if (f.version != kDiskVersion)
    return wire_error(WireCode::bad_version, "disk stream: version " + std::to_string(f.version) +
                                                 ", this kvmig speaks " +
                                                 std::to_string(kDiskVersion));
  if (f.type == 0 || f.type > kMaxDiskMsg)
    return wire_error(WireCode::bad_type, "disk stream: message type " + std::to_string(f.type));
  if (f.flags != 0) return wire_error(WireCode::bad_flags, "disk stream: flags set");
  DiskHeader h{static_cast<DiskMsg>(f.type), f.length, f.checksum};
  uint64_t cap = h.type == DiskMsg::extent ? 16 + kMaxExtentBytes : kMaxSmallPayload;
  KVMIG_TRY(check_frame_length(disk_msg_name(h.type), h.length, cap));
  return h;
}

Result<void> send_disk(Stream& stream, DiskMsg type, std::span<const uint8_t> payload) {
  uint8_t head[kHeaderSize];
  encode_disk_header({type, payload.size(), payload_checksum(payload)}, head);
  return send_frame(stream, head, payload);
}

uint64_t extent_checksum(std::span<const uint8_t> head, std::span<const uint64_t> hashes) {
  XXH3_state_t state;
  XXH3_64bits_reset(&state);
  XXH3_64bits_update(&state, head.data(), head.size());
  XXH3_64bits_update(&state, hashes.data(), hashes.size_bytes());
  return XXH3_64bits_digest(&state);
}

Result<void> send_extent(Stream& stream, uint64_t offset, std::span<const uint8_t> data,
                         std::vector<uint64_t>* hashes) {
  std::vector<uint8_t> range = encode_range({offset, data.size()});
  std::vector<uint64_t> local;
  std::vector<uint64_t>& out = hashes ? *hashes : local;
  size_t first = out.size();
  block_hashes(data, out);
  std::span<const uint64_t> mine(out.data() + first, out.size() - first);
  DiskHeader h{DiskMsg::extent, range.size() + data.size(), extent_checksum(range, mine)};
  uint8_t head[kHeaderSize];
  encode_disk_header(h, head);
  iovec iov[3] = {{head, kHeaderSize},
                  {range.data(), range.size()},
                  {const_cast<uint8_t*>(data.data()), data.size()}};
  return stream.write_all({iov, 3});
}

Result<void> send_disk_error(Stream& stream, const Error& error) {
  ErrorMsg m;
  WireCode code = wire_code_of(error);
  m.code = code == WireCode::none ? WireCode::internal : code;
  m.message = error.message;
  return send_disk(stream, DiskMsg::error, encode(m));
}

Result<DiskMessage> read_disk(Stream& stream) {
  uint8_t head[kHeaderSize];
  KVMIG_TRY(stream.read(head, kHeaderSize));
  DiskMessage m;
  KVMIG_ASSIGN(m.header, decode_disk_header(head));
  if (m.type() == DiskMsg::extent) return m;
  KVMIG_ASSIGN(m.payload, read_frame_payload(stream, m.header.length, m.header.checksum,
                                             disk_msg_name(m.type())));
  return m;
}

Result<DiskRange> read_extent_into(Stream& stream, const DiskHeader& header,
                                   std::span<uint8_t> buffer, std::vector<uint64_t>* hashes) {
  uint8_t head[16];
  if (header.length <= sizeof head)
    return wire_error(WireCode::malformed, "EXTENT without data");
  KVMIG_TRY(stream.read(head, sizeof head));
  KVMIG_ASSIGN(DiskRange range, decode_disk_range({head, sizeof head}, "EXTENT"));
  if (range.length != header.length - sizeof head)
    return wire_error(WireCode::malformed, "EXTENT: data length " + std::to_string(range.length) +
                                               " disagrees with the header");
  if (range.length > buffer.size())
    return wire_error(WireCode::oversize, "EXTENT of " + std::to_string(range.length) +
                                              " bytes, chunk " + std::to_string(buffer.size()));
  KVMIG_TRY(stream.read(buffer.data(), range.length));
  std::vector<uint64_t> local;
  std::vector<uint64_t>& out = hashes ? *hashes : local;
  out.clear();
  block_hashes({buffer.data(), range.length}, out);
  if (extent_checksum({head, sizeof head}, out) != header.checksum)
    return wire_error(WireCode::bad_checksum,
                      "EXTENT at " + std::to_string(range.offset) + ": checksum mismatch");
  return range;
}

Error disk_peer_error(const DiskMessage& message) {
  auto decoded = decode_error(message.payload);  // the migration ERROR's payload layout
  if (!decoded.ok()) return decoded.error();
  return wire_error(decoded->code, "peer: " + decoded->message);
}

}  // namespace kvmig::helper
