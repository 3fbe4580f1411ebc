#include "helper/messages.h"

#include <algorithm>

namespace kvmig::helper {
namespace {

bool id_chars_ok(std::string_view s) {
  if (s.empty() || s.size() > kMaxIdLength) return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '.' || c == '_' || c == '-';
  });
}

template <size_t N>
Result<std::array<uint8_t, N>> fixed(ByteReader& r) {
  KVMIG_ASSIGN(auto b, r.bytes(N));
  std::array<uint8_t, N> out;
  std::copy(b.begin(), b.end(), out.begin());
  return out;
}

}  // namespace

bool MemoryLayout::contains(uint64_t gpa, uint64_t len) const {
  if (len == 0 || gpa + len < gpa) return false;
  for (const MemRange& r : ranges)
    if (gpa >= r.gpa && gpa + len <= r.gpa + r.size) return true;
  return false;
}

uint64_t MemoryLayout::total() const {
  uint64_t sum = 0;
  for (const MemRange& r : ranges) sum += r.size;
  return sum;
}

Result<void> MemoryLayout::validate() const {
  if (ranges.empty() || ranges.size() > kMaxMemRanges)
    return wire_error(WireCode::malformed,
                      "memory layout has " + std::to_string(ranges.size()) + " ranges, want 1.." +
                          std::to_string(kMaxMemRanges));
  uint64_t end = 0;
  for (size_t i = 0; i < ranges.size(); ++i) {
    const MemRange& r = ranges[i];
    if (r.size == 0 || r.gpa % kPageSize || r.size % kPageSize || r.gpa + r.size < r.gpa ||
        (i > 0 && r.gpa < end))
      return wire_error(WireCode::malformed, "memory range " + std::to_string(i) +
                                                 " unaligned, empty, wrapping or overlapping");
    end = r.gpa + r.size;
  }
  return ok();
}

std::vector<uint8_t> encode(const Hello& m) {
  ByteWriter w;
  w.bytes(m.auth_nonce);
  w.bytes(m.auth_token);
  w.str(m.migration_id);
  w.bytes(m.vm_uuid);
  w.u32(m.vcpus);
  w.u32(static_cast<uint32_t>(m.memory.ranges.size()));
  for (const MemRange& r : m.memory.ranges) {
    w.u64(r.gpa);
    w.u64(r.size);
  }
  w.u32(m.dirty_ring_entries);
  w.u8(m.hugepages ? 1 : 0);
  w.u32(m.streams);
  w.u64(m.features);
  if (m.version >= 2) w.str(m.vm_name);
  return w.take();
}

Result<Hello> decode_hello(std::span<const uint8_t> payload, uint16_t header_version) {
  ByteReader r(payload, "HELLO");
  Hello m;
  m.version = header_version;
  KVMIG_ASSIGN(m.auth_nonce, fixed<32>(r));
  KVMIG_ASSIGN(m.auth_token, fixed<32>(r));
  KVMIG_ASSIGN(m.migration_id, r.str(kMaxIdLength));
  if (!id_chars_ok(m.migration_id))
    return wire_error(WireCode::malformed, "HELLO: migration id must be 1..64 of [A-Za-z0-9._-]");
  KVMIG_ASSIGN(m.vm_uuid, fixed<16>(r));
  KVMIG_ASSIGN(m.vcpus, r.u32());
  if (m.vcpus == 0 || m.vcpus > kMaxVcpus)
    return wire_error(WireCode::config_mismatch, "HELLO: " + std::to_string(m.vcpus) +
                                                     " vCPUs, want 1.." + std::to_string(kMaxVcpus));
  KVMIG_ASSIGN(uint32_t nranges, r.u32());
  if (nranges == 0 || nranges > kMaxMemRanges)
    return wire_error(WireCode::malformed, "HELLO: " + std::to_string(nranges) +
                                               " memory ranges, want 1.." +
                                               std::to_string(kMaxMemRanges));
  for (uint32_t i = 0; i < nranges; ++i) {
    MemRange range;
    KVMIG_ASSIGN(range.gpa, r.u64());
    KVMIG_ASSIGN(range.size, r.u64());
    m.memory.ranges.push_back(range);
  }
  KVMIG_TRY(m.memory.validate());
  KVMIG_ASSIGN(m.dirty_ring_entries, r.u32());
  KVMIG_ASSIGN(uint8_t huge, r.u8());
  if (huge > 1) return wire_error(WireCode::malformed, "HELLO: hugepages flag " + std::to_string(huge));
  m.hugepages = huge == 1;
  KVMIG_ASSIGN(m.streams, r.u32());
  if (m.streams == 0 || m.streams > static_cast<uint32_t>(kMaxStreams))
    return wire_error(WireCode::malformed, "HELLO: " + std::to_string(m.streams) + " streams");
  KVMIG_ASSIGN(m.features, r.u64());
  if (header_version >= 2) {
    KVMIG_ASSIGN(m.vm_name, r.str(kMaxVmName));
    for (unsigned char c : m.vm_name)
      if (c < 0x20 || c == 0x7f) return wire_error(WireCode::malformed, "HELLO: VM name with a control character");
  }
  KVMIG_TRY(r.finish());
  return m;
}

std::vector<uint8_t> encode(const HelloAck& m) {
  ByteWriter w;
  w.u16(m.version);
  w.u64(m.features);
  w.bytes(m.auth_token);
  return w.take();
}

Result<HelloAck> decode_hello_ack(std::span<const uint8_t> payload) {
  ByteReader r(payload, "HELLO_ACK");
  HelloAck m;
  KVMIG_ASSIGN(m.version, r.u16());
  KVMIG_ASSIGN(m.features, r.u64());
  if (m.features & ~kKnownFeatures)
    return wire_error(WireCode::malformed, "HELLO_ACK: unknown feature bits");
  KVMIG_ASSIGN(m.auth_token, fixed<32>(r));
  KVMIG_TRY(r.finish());
  return m;
}

std::vector<uint8_t> encode(const ErrorMsg& m) {
  ByteWriter w;
  w.u32(static_cast<uint32_t>(m.code));
  w.str(m.message.substr(0, kMaxErrorText));
  return w.take();
}

Result<ErrorMsg> decode_error(std::span<const uint8_t> payload) {
  ByteReader r(payload, "ERROR");
  ErrorMsg m;
  KVMIG_ASSIGN(uint32_t code, r.u32());
  // An unknown code from a newer peer still ends the session; keep its text, call it internal.
  m.code = code == 0 || code > kMaxWireCode ? WireCode::internal : static_cast<WireCode>(code);
  KVMIG_ASSIGN(m.message, r.str(kMaxErrorText));
  // The text goes to logs and terminals: no control characters from the network.
  for (char& c : m.message)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
  KVMIG_TRY(r.finish());
  return m;
}

std::vector<uint8_t> encode(const RoundEnd& m) {
  ByteWriter w;
  w.u32(m.round);
  w.u64(m.pages);
  w.u64(m.zero_pages);
  w.u64(m.wire_bytes);
  w.u64(m.duration_ns);
  w.u64(m.dirty_pages_left);
  return w.take();
}

Result<RoundEnd> decode_round_end(std::span<const uint8_t> payload) {
  ByteReader r(payload, "ROUND_END");
  RoundEnd m;
  KVMIG_ASSIGN(m.round, r.u32());
  KVMIG_ASSIGN(m.pages, r.u64());
  KVMIG_ASSIGN(m.zero_pages, r.u64());
  KVMIG_ASSIGN(m.wire_bytes, r.u64());
  KVMIG_ASSIGN(m.duration_ns, r.u64());
  KVMIG_ASSIGN(m.dirty_pages_left, r.u64());
  if (m.zero_pages > m.pages)
    return wire_error(WireCode::malformed, "ROUND_END: more zero pages than pages");
  KVMIG_TRY(r.finish());
  return m;
}

std::vector<uint8_t> encode(const kvm::StateSection& m) {
  ByteWriter w;
  w.str(m.id);
  w.u32(m.version);
  w.blob(m.data);
  return w.take();
}

Result<kvm::StateSection> decode_state(std::span<const uint8_t> payload,
                                       const SectionIdCheck& known, uint64_t max_bytes) {
  ByteReader r(payload, "STATE");
  kvm::StateSection m;
  KVMIG_ASSIGN(m.id, r.str(kMaxIdLength));
  if (!id_chars_ok(m.id))
    return wire_error(WireCode::malformed, "STATE: section id must be 1..64 of [A-Za-z0-9._-]");
  if (known && !known(m.id))
    return wire_error(WireCode::unknown_section, "STATE: section '" + m.id + "' unknown here");
  KVMIG_ASSIGN(m.version, r.u32());
  if (m.version == 0)
    return wire_error(WireCode::malformed, "STATE: section '" + m.id + "' version 0");
  KVMIG_ASSIGN(auto data, r.blob(max_bytes));
  m.data.assign(data.begin(), data.end());
  KVMIG_TRY(r.finish());
  return m;
}

std::vector<uint8_t> encode(const Verify& m) {
  ByteWriter w;
  w.u64(m.hash);
  w.u64(m.bytes);
  if (m.range_bytes != 0) {
    w.u64(m.range_bytes);
    w.u32(static_cast<uint32_t>(m.ranges.size()));
    for (uint64_t h : m.ranges) w.u64(h);
  }
  return w.take();
}

Result<Verify> decode_verify(std::span<const uint8_t> payload, bool with_ranges) {
  ByteReader r(payload, "VERIFY");
  Verify m;
  KVMIG_ASSIGN(m.hash, r.u64());
  KVMIG_ASSIGN(m.bytes, r.u64());
  if (with_ranges) {
    KVMIG_ASSIGN(m.range_bytes, r.u64());
    if (m.range_bytes < 4096 || m.range_bytes > (1ull << 30) || (m.range_bytes & (m.range_bytes - 1)) != 0)
      return wire_error(WireCode::malformed, "VERIFY: range size " + std::to_string(m.range_bytes) +
                                                 " is not a power of two from 4 KiB to 1 GiB");
    KVMIG_ASSIGN(uint32_t count, r.u32());
    if (count == 0 || count > kMaxVerifyRanges || count * uint64_t{8} != r.remaining())
      return wire_error(WireCode::malformed, "VERIFY: " + std::to_string(count) + " range hashes in " +
                                                 std::to_string(r.remaining()) + " bytes (cap " +
                                                 std::to_string(kMaxVerifyRanges) + ")");
    m.ranges.resize(count);
    for (uint64_t& h : m.ranges) {
      KVMIG_ASSIGN(h, r.u64());
    }
  }
  KVMIG_TRY(r.finish());
  return m;
}

std::vector<uint8_t> encode(const RoundAck& m) {
  ByteWriter w;
  w.u32(m.round);
  w.u64(m.pages);
  w.u64(m.bytes);
  return w.take();
}

Result<RoundAck> decode_round_ack(std::span<const uint8_t> payload) {
  ByteReader r(payload, "ROUND_ACK");
  RoundAck m;
  KVMIG_ASSIGN(m.round, r.u32());
  KVMIG_ASSIGN(m.pages, r.u64());
  KVMIG_ASSIGN(m.bytes, r.u64());
  if (m.round == 0) return wire_error(WireCode::malformed, "ROUND_ACK of round 0");
  // Pages arrive in MEM_PAGES batches of at least a header each: pages from no bytes cannot be.
  if (m.pages > 0 && m.bytes == 0)
    return wire_error(WireCode::malformed, "ROUND_ACK: pages applied from no bytes");
  KVMIG_TRY(r.finish());
  return m;
}

Result<void> check_round_ack(const RoundAck& ack, uint32_t round, uint64_t pages, uint64_t bytes) {
  const std::string what = "ROUND_ACK of round " + std::to_string(ack.round);
  if (ack.round != round)
    return wire_error(WireCode::unexpected, what + " where round " + std::to_string(round) + " was due");
  if (ack.pages != pages)
    return wire_error(WireCode::malformed, what + ": destination applied " + std::to_string(ack.pages) +
                                               " pages, " + std::to_string(pages) + " were sent");
  if (ack.bytes != bytes)
    return wire_error(WireCode::malformed, what + ": destination read " + std::to_string(ack.bytes) +
                                               " bytes, " + std::to_string(bytes) + " were sent");
  return ok();
}

Result<void> decode_empty(std::span<const uint8_t> payload, MsgType type) {
  if (!payload.empty())
    return wire_error(WireCode::malformed, std::string(msg_type_name(type)) + ": " +
                                               std::to_string(payload.size()) +
                                               " payload bytes, want none");
  return ok();
}

Result<void> send_message(Stream& stream, uint16_t version, MsgType type,
                          std::span<const uint8_t> payload) {
  uint8_t head[kHeaderSize];
  encode_header(make_header(type, version, payload, payload.size()), head);
  return send_frame(stream, head, payload);
}

Result<Message> read_message(Stream& stream, uint16_t version, const WireLimits& limits) {
  uint8_t head[kHeaderSize];
  KVMIG_TRY(stream.read(head, kHeaderSize));
  Message m;
  KVMIG_ASSIGN(m.header, decode_header(head, version, limits));
  if (m.header.type == MsgType::mem_pages) return m;
  KVMIG_ASSIGN(m.payload, read_frame_payload(stream, m.header.length, m.header.checksum,
                                             msg_type_name(m.header.type)));
  return m;
}

Error peer_error(const Message& message) {
  auto decoded = decode_error(message.payload);
  if (!decoded.ok()) return decoded.error();
  return wire_error(decoded->code, std::string("peer ") +
                                       (message.type() == MsgType::abort ? "aborted: " : "error: ") +
                                       decoded->message);
}

}  // namespace kvmig::helper
