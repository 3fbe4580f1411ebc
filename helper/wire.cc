#include "helper/wire.h"

#include <xxhash.h>

#include <cstdio>
#include <cstring>

namespace kvmig::helper {
namespace {

void store_le(uint8_t* p, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

uint64_t load_le(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

// XXH32 over the header with the check field itself taken as zero.
uint32_t header_check_of(const uint8_t bytes[kHeaderSize]) {
  uint8_t copy[kHeaderSize];
  std::memcpy(copy, bytes, kHeaderSize);
  std::memset(copy + 12, 0, 4);
  return XXH32(copy, kHeaderSize, 0);
}

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

const char* msg_type_name(MsgType type) {
  switch (type) {
    case MsgType::hello: return "HELLO";
    case MsgType::hello_ack: return "HELLO_ACK";
    case MsgType::error: return "ERROR";
    case MsgType::mem_pages: return "MEM_PAGES";
    case MsgType::round_end: return "ROUND_END";
    case MsgType::state: return "STATE";
    case MsgType::ready: return "READY";
    case MsgType::commit: return "COMMIT";
    case MsgType::done: return "DONE";
    case MsgType::abort: return "ABORT";
    case MsgType::verify: return "VERIFY";
    case MsgType::disks: return "DISKS";
    case MsgType::disks_ready: return "DISKS_READY";
    case MsgType::disk_blocks: return "DISK_BLOCKS";
    case MsgType::round_ack: return "ROUND_ACK";
  }
  return "UNKNOWN";
}

const char* wire_code_name(WireCode code) {
  switch (code) {
    case WireCode::none: return "none";
    case WireCode::bad_magic: return "bad_magic";
    case WireCode::bad_version: return "bad_version";
    case WireCode::bad_type: return "bad_type";
    case WireCode::bad_flags: return "bad_flags";
    case WireCode::oversize: return "oversize";
    case WireCode::bad_checksum: return "bad_checksum";
    case WireCode::truncated: return "truncated";
    case WireCode::malformed: return "malformed";
    case WireCode::gpa_out_of_range: return "gpa_out_of_range";
    case WireCode::unknown_section: return "unknown_section";
    case WireCode::config_mismatch: return "config_mismatch";
    case WireCode::auth_failed: return "auth_failed";
    case WireCode::unexpected: return "unexpected";
    case WireCode::io: return "io";
    case WireCode::aborted: return "aborted";
    case WireCode::internal: return "internal";
  }
  return "unknown";
}

Error wire_error(WireCode code, const std::string& detail) {
  return Error{std::string("[") + wire_code_name(code) + "] " + detail, 0};
}

WireCode wire_code_of(const Error& error) {
  for (uint32_t c = 1; c <= kMaxWireCode; ++c) {
    auto code = static_cast<WireCode>(c);
    if (error.message.find(std::string("[") + wire_code_name(code) + "]") != std::string::npos)
      return code;
  }
  return WireCode::none;
}

void encode_frame(const Frame& f, uint8_t out[kHeaderSize]) {
  store_le(out + 0, f.magic, 4);
  store_le(out + 4, f.version, 2);
  store_le(out + 6, f.type, 2);
  store_le(out + 8, f.flags, 4);
  store_le(out + 12, 0, 4);
  store_le(out + 16, f.length, 8);
  store_le(out + 24, f.checksum, 8);
  store_le(out + 12, header_check_of(out), 4);
}

Result<Frame> decode_frame(const uint8_t in[kHeaderSize], uint32_t magic, const char* family) {
  Frame f;
  f.magic = static_cast<uint32_t>(load_le(in + 0, 4));
  f.version = static_cast<uint16_t>(load_le(in + 4, 2));
  f.type = static_cast<uint16_t>(load_le(in + 6, 2));
  f.flags = static_cast<uint32_t>(load_le(in + 8, 4));
  f.header_check = static_cast<uint32_t>(load_le(in + 12, 4));
  f.length = load_le(in + 16, 8);
  f.checksum = load_le(in + 24, 8);
  if (f.magic != magic)
    return wire_error(WireCode::bad_magic, std::string(family) + " stream: header magic " +
                                               hex(f.magic) + ", want " + hex(magic) +
                                               " (not a kvmig " + family + " peer?)");
  if (header_check_of(in) != f.header_check)
    return wire_error(WireCode::bad_checksum, std::string(family) +
                                                  " stream: header check mismatch (corrupt or "
                                                  "desynced stream)");
  return f;
}

Result<void> check_frame_length(const char* type_name, uint64_t length, uint64_t cap) {
  if (length > cap)
    return wire_error(WireCode::oversize, std::string(type_name) + " length " +
                                              std::to_string(length) + " > cap " +
                                              std::to_string(cap));
  return ok();
}

Result<void> send_frame(Stream& stream, const uint8_t head[kHeaderSize],
                        std::span<const uint8_t> payload) {
  iovec iov[2] = {{const_cast<uint8_t*>(head), kHeaderSize},
                  {const_cast<uint8_t*>(payload.data()), payload.size()}};
  return stream.write_all({iov, payload.empty() ? 1u : 2u});
}

Result<std::vector<uint8_t>> read_frame_payload(Stream& stream, uint64_t length,
                                                uint64_t checksum, const char* type_name) {
  std::vector<uint8_t> payload(length);
  KVMIG_TRY(stream.read(payload.data(), payload.size()));
  if (payload_checksum(payload) != checksum)
    return wire_error(WireCode::bad_checksum,
                      std::string(type_name) + " payload checksum mismatch");
  return payload;
}

void encode_header(const WireHeader& h, uint8_t out[kHeaderSize]) {
  encode_frame({h.magic, h.version, static_cast<uint16_t>(h.type), h.flags, 0, h.length,
                h.checksum},
               out);
}

Result<WireHeader> decode_header(const uint8_t in[kHeaderSize], uint16_t expected_version,
                                 const WireLimits& limits) {
  KVMIG_ASSIGN(Frame f, decode_frame(in, kWireMagic, "migration"));
  WireHeader h;
  h.magic = f.magic;
  h.version = f.version;
  h.flags = f.flags;
  h.header_check = f.header_check;
  h.length = f.length;
  h.checksum = f.checksum;
  if (expected_version != 0 ? h.version != expected_version
                            : (h.version < kWireOldestVersion || h.version > kWireVersion + 1))
    return wire_error(WireCode::bad_version,
                      "message version " + std::to_string(h.version) + ", speaking " +
                          (expected_version ? std::to_string(expected_version)
                                            : std::to_string(kWireVersion)));
  if (f.type == 0 || f.type > kMaxMsgType)
    return wire_error(WireCode::bad_type, "message type " + std::to_string(f.type));
  h.type = static_cast<MsgType>(f.type);
  if ((h.flags & ~kKnownFlags) != 0 ||
      ((h.flags & kFlagCompressed) && h.type != MsgType::mem_pages))
    return wire_error(WireCode::bad_flags, std::string(msg_type_name(h.type)) + " flags " +
                                               hex(h.flags));
  uint64_t cap = limits.max_control_payload;
  if (h.type == MsgType::mem_pages)
    cap = 16 + 16ull * limits.max_batch_runs + limits.max_batch_pages * kPageSize;
  KVMIG_TRY(check_frame_length(msg_type_name(h.type), h.length, cap));
  return h;
}

WireHeader make_header(MsgType type, uint16_t version, std::span<const uint8_t> checked,
                       uint64_t length, uint32_t flags) {
  WireHeader h;
  h.version = version;
  h.type = type;
  h.flags = flags;
  h.length = length;
  h.checksum = payload_checksum(checked);
  return h;
}

Result<uint16_t> agree_version(uint16_t offered, uint16_t ours) {
  // A peer one version ahead talks down to ours; one behind, we talk down to theirs. Only the
  // newer side ever needs to know two versions, so each build carries at most two.
  uint16_t low = ours > kWireOldestVersion ? static_cast<uint16_t>(ours - 1) : ours;
  if (offered < kWireOldestVersion || offered < low || offered > ours + 1)
    return wire_error(WireCode::bad_version, "peer speaks protocol version " +
                                                 std::to_string(offered) + ", this kvmig " +
                                                 std::to_string(low) + ".." +
                                                 std::to_string(ours));
  return offered < ours ? offered : ours;
}

uint64_t payload_checksum(std::span<const uint8_t> bytes) {
  return XXH3_64bits(bytes.data(), bytes.size());
}

void ByteWriter::str(std::string_view s) {
  u32(static_cast<uint32_t>(s.size()));
  buf_.insert(buf_.end(), s.begin(), s.end());
}

void ByteWriter::blob(std::span<const uint8_t> b) {
  u64(b.size());
  bytes(b);
}

Result<uint64_t> ByteReader::get(int n) {
  if (remaining() < static_cast<size_t>(n))
    return wire_error(WireCode::malformed, std::string(what_) + ": payload ends at byte " +
                                               std::to_string(pos_) + ", field needs " +
                                               std::to_string(n));
  uint64_t v = load_le(in_.data() + pos_, n);
  pos_ += n;
  return v;
}

Result<uint8_t> ByteReader::u8() {
  KVMIG_ASSIGN(uint64_t v, get(1));
  return static_cast<uint8_t>(v);
}
Result<uint16_t> ByteReader::u16() {
  KVMIG_ASSIGN(uint64_t v, get(2));
  return static_cast<uint16_t>(v);
}
Result<uint32_t> ByteReader::u32() {
  KVMIG_ASSIGN(uint64_t v, get(4));
  return static_cast<uint32_t>(v);
}
Result<uint64_t> ByteReader::u64() { return get(8); }

Result<std::span<const uint8_t>> ByteReader::bytes(size_t n) {
  if (remaining() < n)
    return wire_error(WireCode::malformed, std::string(what_) + ": " + std::to_string(n) +
                                               " bytes wanted, " + std::to_string(remaining()) +
                                               " left");
  auto out = in_.subspan(pos_, n);
  pos_ += n;
  return out;
}

Result<std::string> ByteReader::str(size_t max_len) {
  KVMIG_ASSIGN(uint32_t len, u32());
  if (len > max_len)
    return wire_error(WireCode::oversize, std::string(what_) + ": string of " +
                                              std::to_string(len) + " bytes, cap " +
                                              std::to_string(max_len));
  KVMIG_ASSIGN(auto b, bytes(len));
  return std::string(b.begin(), b.end());
}

Result<std::span<const uint8_t>> ByteReader::blob(uint64_t max_len) {
  KVMIG_ASSIGN(uint64_t len, u64());
  if (len > max_len)
    return wire_error(WireCode::oversize, std::string(what_) + ": blob of " +
                                              std::to_string(len) + " bytes, cap " +
                                              std::to_string(max_len));
  return bytes(static_cast<size_t>(len));
}

Result<void> ByteReader::finish() const {
  if (remaining() != 0)
    return wire_error(WireCode::malformed, std::string(what_) + ": " +
                                               std::to_string(remaining()) + " trailing bytes");
  return ok();
}

}  // namespace kvmig::helper
