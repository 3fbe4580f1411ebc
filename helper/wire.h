// The migration wire format: a fixed 32-byte little-endian header before every payload,
// error codes shared by both peers, and bounds-checked little-endian payload codecs.
// docs/protocol.md is the specification; this file and messages.h implement it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "helper/transport.h"

namespace kvmig::helper {

// "KMIG" read as a little-endian u32. The offsets of magic and version never change between
// protocol versions, so any peer can read what version the other speaks.
inline constexpr uint32_t kWireMagic = 0x47494d4b;
inline constexpr uint16_t kWireVersion = 3;     // the version this build speaks (2: HELLO names the VM, 3: ROUND_ACK)
inline constexpr uint16_t kWireOldestVersion = 1;  // versions below 1 never existed
inline constexpr size_t kHeaderSize = 32;
inline constexpr uint64_t kPageSize = 4096;

// 0 is never a valid type: a zeroed buffer must not parse as a message.
enum class MsgType : uint16_t {
  hello = 1,
  hello_ack = 2,
  error = 3,
  mem_pages = 4,
  round_end = 5,
  state = 6,
  ready = 7,
  commit = 8,
  done = 9,
  abort = 10,
  verify = 11,
  disks = 12,        // disk pre-copy (feature bit 2): the source's disks, helper/disk_precopy_messages.h
  disks_ready = 13,  // the destination's copies are open at their sizes
  disk_blocks = 14,  // blocks of one disk
  round_ack = 15,    // version 3 on: the destination applied every page of a round
};
inline constexpr uint16_t kMaxMsgType = 15;
const char* msg_type_name(MsgType type);

// Header flags.
inline constexpr uint32_t kFlagCompressed = 1u << 0;  // MEM_PAGES data is one zstd frame
inline constexpr uint32_t kKnownFlags = kFlagCompressed;

// Codes carried in ERROR/ABORT and tagged into local Error messages as "[name]", so a test
// or the session can tell which check failed (base's Error has no code field).
enum class WireCode : uint32_t {
  none = 0,
  bad_magic = 1,
  bad_version = 2,       // header version not the agreed one, or versions too far apart
  bad_type = 3,          // type 0, unknown, or not allowed in this state
  bad_flags = 4,
  oversize = 5,          // a length or count above its cap
  bad_checksum = 6,      // header check or payload checksum mismatch
  truncated = 7,         // the stream ended inside a message
  malformed = 8,         // payload does not parse (trailing bytes, bad string, bad count)
  gpa_out_of_range = 9,  // pages outside the declared memory layout
  unknown_section = 10,  // a STATE section id the destination does not know
  config_mismatch = 11,  // HELLO's VM config cannot be hosted here
  auth_failed = 12,
  unexpected = 13,       // valid message, wrong moment in the state machine
  io = 14,               // socket error
  aborted = 15,          // the peer or the operator cancelled
  internal = 16,         // a local failure (e.g. cannot load state)
};
inline constexpr uint32_t kMaxWireCode = 16;
const char* wire_code_name(WireCode code);
// An Error whose message is "[code] detail".
Error wire_error(WireCode code, const std::string& detail);
// The first "[code]" tag in an error's message; WireCode::none when there is none.
WireCode wire_code_of(const Error& error);

struct WireHeader {
  uint32_t magic = kWireMagic;
  uint16_t version = kWireVersion;
  MsgType type{};
  uint32_t flags = 0;
  uint32_t header_check = 0;  // XXH32 of the other 28 header bytes: catches a desync early
  uint64_t length = 0;        // payload bytes after the header
  uint64_t checksum = 0;      // XXH3-64 of the payload (MEM_PAGES: of its descriptor part)
};
// The in-memory struct mirrors the wire layout; encode/decode still go byte by byte.
static_assert(sizeof(WireHeader) == kHeaderSize, "wire header must be 32 bytes");

// Caps the receiver enforces before it allocates or writes anything.
struct WireLimits {
  uint64_t max_control_payload = 64ull << 20;  // any message but MEM_PAGES (STATE is largest)
  uint64_t max_batch_pages = 16384;            // pages per MEM_PAGES (64 MiB of data)
  uint32_t max_batch_runs = 16384;
};

// The 32-byte frame header every kvmig stream shares: the migration stream ("KMIG") and the
// disk copy stream ("KDSK", disk_messages.h) differ only in the magic and in what type,
// version and flags mean, so the byte layout and the header check are written once, here.
// Offsets: magic 0, version 4, type 6, flags 8, header_check 12, length 16, checksum 24.
struct Frame {
  uint32_t magic = 0;
  uint16_t version = 0;
  uint16_t type = 0;
  uint32_t flags = 0;
  uint32_t header_check = 0;  // XXH32 of the other 28 header bytes: catches a desync early
  uint64_t length = 0;
  uint64_t checksum = 0;
};
// Computes header_check (the field in `frame` is ignored).
void encode_frame(const Frame& frame, uint8_t out[kHeaderSize]);
// Parses the fields and checks the magic ([bad_magic]) and the header check ([bad_checksum]);
// `family` ("migration", "disk") names the stream in errors. The family's decoder checks
// version, type, flags and length, which only it knows the meaning of.
Result<Frame> decode_frame(const uint8_t in[kHeaderSize], uint32_t magic, const char* family);
// [oversize] "<type_name> length N > cap C" unless length <= cap.
Result<void> check_frame_length(const char* type_name, uint64_t length, uint64_t cap);
// Writes an encoded header and its payload in one gather write.
Result<void> send_frame(Stream& stream, const uint8_t head[kHeaderSize],
                        std::span<const uint8_t> payload);
// Reads a `length`-byte payload and checks its XXH3-64 against `checksum` ([bad_checksum],
// naming `type_name`).
Result<std::vector<uint8_t>> read_frame_payload(Stream& stream, uint64_t length,
                                                uint64_t checksum, const char* type_name);

// Header codec. encode computes header_check; decode checks magic, check, type, flags and
// the length cap, and that the version is `expected_version` (0: any version a peer of ours
// may speak, used for the first message).
void encode_header(const WireHeader& header, uint8_t out[kHeaderSize]);
Result<WireHeader> decode_header(const uint8_t in[kHeaderSize], uint16_t expected_version,
                                 const WireLimits& limits);
WireHeader make_header(MsgType type, uint16_t version, std::span<const uint8_t> checked,
                       uint64_t length, uint32_t flags = 0);

// The version both sides speak: the lower of the two, if they are at most one apart.
Result<uint16_t> agree_version(uint16_t offered, uint16_t ours = kWireVersion);

uint64_t payload_checksum(std::span<const uint8_t> bytes);

// Little-endian payload writer.
class ByteWriter {
 public:
  void u8(uint8_t v) { buf_.push_back(v); }
  void u16(uint16_t v) { put(v, 2); }
  void u32(uint32_t v) { put(v, 4); }
  void u64(uint64_t v) { put(v, 8); }
  void bytes(std::span<const uint8_t> b) { buf_.insert(buf_.end(), b.begin(), b.end()); }
  void str(std::string_view s);  // u32 length + bytes
  void blob(std::span<const uint8_t> b);  // u64 length + bytes
  std::vector<uint8_t>& buffer() { return buf_; }
  std::vector<uint8_t> take() { return std::move(buf_); }

 private:
  void put(uint64_t v, int n) {
    for (int i = 0; i < n; ++i) buf_.push_back(static_cast<uint8_t>(v >> (8 * i)));
  }
  std::vector<uint8_t> buf_;
};

// Bounds-checked little-endian reader: every read fails with [malformed] past the end, so a
// decoder never reads outside the payload whatever the counts in it say.
class ByteReader {
 public:
  ByteReader(std::span<const uint8_t> in, const char* what) : in_(in), what_(what) {}
  Result<uint8_t> u8();
  Result<uint16_t> u16();
  Result<uint32_t> u32();
  Result<uint64_t> u64();
  Result<std::span<const uint8_t>> bytes(size_t n);
  Result<std::string> str(size_t max_len);
  Result<std::span<const uint8_t>> blob(uint64_t max_len);
  size_t remaining() const { return in_.size() - pos_; }
  // Trailing bytes are an error: a message means exactly one thing.
  Result<void> finish() const;

 private:
  Result<uint64_t> get(int n);
  std::span<const uint8_t> in_;
  size_t pos_ = 0;
  const char* what_;
};

}  // namespace kvmig::helper
