// Typed control messages of a migration session and their payload codecs. Every decoder
// checks every field (lengths, counts, ranges, ids) and rejects trailing bytes; MEM_PAGES,
// which must land in guest memory without a copy, lives in wire_pages.h.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "helper/transport.h"
#include "helper/wire.h"
#include "kvm/migratable.h"

namespace kvmig::helper {

inline constexpr size_t kMaxMemRanges = 16;
inline constexpr size_t kMaxIdLength = 64;        // migration ids and section ids
inline constexpr size_t kMaxErrorText = 1024;
inline constexpr uint32_t kMaxVcpus = 1024;

struct MemRange {
  uint64_t gpa = 0;
  uint64_t size = 0;
};

// The guest-physical layout both sides agree on in HELLO: every MEM_PAGES run must fall
// inside one range of it.
struct MemoryLayout {
  std::vector<MemRange> ranges;
  bool contains(uint64_t gpa, uint64_t len) const;
  uint64_t total() const;
  // Ranges page-aligned, non-empty, sorted, non-overlapping, no wrap-around.
  Result<void> validate() const;
};

// Feature bits in HELLO; the destination answers with the subset it accepts.
inline constexpr uint64_t kFeatureCompression = 1u << 0;
inline constexpr uint64_t kFeatureVerify = 1u << 1;
inline constexpr uint64_t kFeatureDisks = 1u << 2;  // DISKS, DISKS_READY, DISK_BLOCKS
// With VERIFY: the hash comes with one hash per piece of guest RAM, so a mismatch names
// where memory differs (offered and accepted only together with kFeatureVerify).
inline constexpr uint64_t kFeatureVerifyRanges = 1u << 3;
inline constexpr uint64_t kKnownFeatures =
    kFeatureCompression | kFeatureVerify | kFeatureDisks | kFeatureVerifyRanges;

struct Hello {
  uint16_t version = kWireVersion;  // from the header: the version the source proposes
  std::array<uint8_t, 32> auth_nonce{};  // filled by the auth layer; opaque here
  std::array<uint8_t, 32> auth_token{};
  std::string migration_id;  // [A-Za-z0-9._-], 1..64
  std::array<uint8_t, 16> vm_uuid{};
  uint32_t vcpus = 1;
  MemoryLayout memory;
  uint32_t dirty_ring_entries = 0;  // 0 = bitmap tracking (informational for the destination)
  bool hugepages = false;
  uint32_t streams = 1;  // data streams the source opened
  uint64_t features = 0;
  // Version 2 on: the VM's name, so the destination's placeholder carries it (0..255 bytes,
  // no control characters; empty: named after the UUID). A version-1 HELLO has none.
  std::string vm_name;
};
inline constexpr size_t kMaxVmName = 255;

struct HelloAck {
  uint16_t version = kWireVersion;  // the agreed version: every later message carries it
  uint64_t features = 0;            // accepted subset of HELLO's features
  std::array<uint8_t, 32> auth_token{};
};

// ERROR (a failure) and ABORT (a deliberate cancel): both end the session, both directions.
struct ErrorMsg {
  WireCode code = WireCode::internal;
  std::string message;
};

// Sent on every data stream at the end of a round (the destination's stream readers meet on
// it, so a page resent in round r+1 never lands before its round-r copy) and on control.
struct RoundEnd {
  uint32_t round = 0;
  uint64_t pages = 0;       // pages sent this round on this stream (control: in total)
  uint64_t zero_pages = 0;
  uint64_t wire_bytes = 0;
  uint64_t duration_ns = 0;
  uint64_t dirty_pages_left = 0;
};

// Version 3 on, destination to source on control, once per ROUND_END: every page of `round`
// has been read from all data streams, decompressed and written into guest memory. The
// source times its bandwidth to it, so a round still queued in socket buffers or still being
// decompressed is not taken for link speed, and the destination never owes more than the
// round in flight (docs/protocol.md, "Round acknowledgement").
struct RoundAck {
  uint32_t round = 0;  // 1.., the round acknowledged
  uint64_t pages = 0;  // pages the data streams carried in it (ROUND_END's count, control)
  uint64_t bytes = 0;  // MEM_PAGES bytes (headers included) read for it from the data streams
};
// The first version whose destination acknowledges rounds.
inline constexpr uint16_t kRoundAckVersion = 3;

struct Verify {
  uint64_t hash = 0;   // XXH3-64 over all guest RAM, ranges in layout order
  uint64_t bytes = 0;  // bytes covered, must equal the layout's total
  // kFeatureVerifyRanges only (range_bytes != 0): each layout range is cut from its start
  // in pieces of range_bytes (a power of two, 4 KiB..1 GiB; a range's last piece may be
  // shorter), `ranges` holds the XXH3-64 of each piece in layout order, and `hash` is then
  // the XXH3-64 of that list (little-endian u64s): one pass over guest RAM on each side.
  uint64_t range_bytes = 0;
  std::vector<uint64_t> ranges;
};
inline constexpr uint32_t kMaxVerifyRanges = 1u << 20;  // decoder cap: 8 MiB of hashes

// Which STATE section ids the destination can restore.
using SectionIdCheck = std::function<bool(std::string_view id)>;

std::vector<uint8_t> encode(const Hello& m);
std::vector<uint8_t> encode(const HelloAck& m);
std::vector<uint8_t> encode(const ErrorMsg& m);
std::vector<uint8_t> encode(const RoundEnd& m);
std::vector<uint8_t> encode(const kvm::StateSection& m);
std::vector<uint8_t> encode(const Verify& m);
std::vector<uint8_t> encode(const RoundAck& m);

Result<Hello> decode_hello(std::span<const uint8_t> payload, uint16_t header_version);
Result<HelloAck> decode_hello_ack(std::span<const uint8_t> payload);
Result<ErrorMsg> decode_error(std::span<const uint8_t> payload);
Result<RoundEnd> decode_round_end(std::span<const uint8_t> payload);
Result<kvm::StateSection> decode_state(std::span<const uint8_t> payload,
                                       const SectionIdCheck& known, uint64_t max_bytes);
// with_ranges: the kFeatureVerifyRanges form (range_bytes, u32 count, count x u64 follow).
Result<Verify> decode_verify(std::span<const uint8_t> payload, bool with_ranges = false);
Result<RoundAck> decode_round_ack(std::span<const uint8_t> payload);
// Checks an acknowledgement against the round the source sent: the same round, exactly the
// pages and MEM_PAGES bytes its data streams carried. [unexpected] for another round,
// [malformed] for other counts.
Result<void> check_round_ack(const RoundAck& ack, uint32_t round, uint64_t pages, uint64_t bytes);
// READY, COMMIT and DONE carry no payload.
Result<void> decode_empty(std::span<const uint8_t> payload, MsgType type);

// Sends header + payload in one gather write.
Result<void> send_message(Stream& stream, uint16_t version, MsgType type,
                          std::span<const uint8_t> payload = {});

// A received header, and its payload unless it is MEM_PAGES: that payload is still on the
// stream and must be read with PageBatchReceiver::receive (straight into guest memory), or
// the session ended, since the stream is no longer at a message boundary.
struct Message {
  WireHeader header;
  std::vector<uint8_t> payload;
  MsgType type() const { return header.type; }
};
// version 0 accepts any version a peer may propose (the first message only).
Result<Message> read_message(Stream& stream, uint16_t version, const WireLimits& limits);

// An ERROR/ABORT from the peer as a local Error: "[code] peer: message".
Error peer_error(const Message& message);

}  // namespace kvmig::helper
