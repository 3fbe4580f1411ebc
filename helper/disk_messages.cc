#include "helper/disk_messages.h"

#ifndef XXH_STATIC_LINKING_ONLY
#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t on the stack
#endif
#include <xxhash.h>

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
  if (m.image_size == 0 || m.image_size % kDiskSectorSize != 0)
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

Result<void> send_extent(Stream& stream, uint64_t offset, std::span<const uint8_t> data) {
  std::vector<uint8_t> range = encode_range({offset, data.size()});
  XXH3_state_t state;
  XXH3_64bits_reset(&state);
  XXH3_64bits_update(&state, range.data(), range.size());
  XXH3_64bits_update(&state, data.data(), data.size());
  DiskHeader h{DiskMsg::extent, range.size() + data.size(), XXH3_64bits_digest(&state)};
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
                                   std::span<uint8_t> buffer) {
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
  XXH3_state_t state;
  XXH3_64bits_reset(&state);
  XXH3_64bits_update(&state, head, sizeof head);
  XXH3_64bits_update(&state, buffer.data(), range.length);
  if (XXH3_64bits_digest(&state) != header.checksum)
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
