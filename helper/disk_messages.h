// The disk-copy wire format (`kvmig disk copy` / `kvmig disk serve`): its own message family
// with its own magic ("KDSK"), so a disk stream can never be mistaken for a migration stream,
// but the same 32-byte header layout, codes and codecs as helper/wire.h.
// docs/protocol.md, section "Disk copy", is the specification.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"
#include "helper/transport.h"
#include "helper/wire.h"

namespace kvmig::helper {

inline constexpr uint32_t kDiskMagic = 0x4b53444b;  // "KDSK" little-endian
// 2: DONE/VERIFIED carry the block-hash image digest and an EXTENT's checksum is over its
// block hashes (helper/disk_extents.h); 1 hashed whole bytes.
inline constexpr uint16_t kDiskVersion = 2;
inline constexpr size_t kMaxDiskPath = 4096;
inline constexpr uint32_t kMinDiskBlock = 4096;       // zero-detection granularity bounds
inline constexpr uint32_t kMaxDiskBlock = 16u << 20;
inline constexpr uint32_t kMaxExtentBytes = 16u << 20;  // data bytes in one EXTENT
inline constexpr uint64_t kDiskSectorSize = 512;        // image sizes must be a multiple

enum class DiskMsg : uint16_t {
  open = 1,         // S->D: what is coming and where it goes
  resume_from = 2,  // D->S: the offset the copy starts (continues) from
  extent = 3,       // S->D: data bytes at an offset
  zero = 4,         // S->D: a range of data blocks that are all zero (no bytes sent)
  hole = 5,         // S->D: a range that is a hole in the source (no bytes sent)
  ack = 6,          // D->S: every byte below offset is written and fdatasync'd
  stop = 7,         // S->D: stop at a message boundary (hand-off)
  stopped = 8,      // D->S: how far the copy got, durable; the connection then ends
  done = 9,         // S->D: all sent; XXH3 of the whole image
  verified = 10,    // D->S: the destination's XXH3 matches; the copy is complete
  error = 11,       // both: u32 WireCode + text; ends the connection
  chain = 12,         // S->D: a backing chain's layers with their content IDs (first message)
  chain_status = 13,  // D->S: per layer, what the destination holds (its own check)
  link = 14,          // S->D: every layer is there now: check them all and re-link the chain
  linked = 15,        // D->S: the chain is checked and re-linked; the connection then ends
};
inline constexpr uint16_t kMaxDiskMsg = 15;
const char* disk_msg_name(DiskMsg type);

struct DiskHeader {
  DiskMsg type{};
  uint64_t length = 0;    // payload bytes
  uint64_t checksum = 0;  // XXH3-64 of the payload (EXTENT: of its head and data's block hashes)
};

inline constexpr uint32_t kOpenOverwrite = 1u << 0;  // replace an existing complete file
// A kvmig delta (docs/disk-chains.md): its holes mean "read the parent", so ZERO ranges must be
// written as zeros, allocated, and only HOLE ranges left sparse.
inline constexpr uint32_t kOpenKeepAllocation = 1u << 1;
// A layer file copied as bytes (a qcow2 file): its size need not be a multiple of 512.
inline constexpr uint32_t kOpenAnySize = 1u << 2;
inline constexpr uint32_t kOpenKnownFlags = kOpenOverwrite | kOpenKeepAllocation | kOpenAnySize;

struct DiskOpen {
  uint64_t image_size = 0;   // multiple of 512
  uint32_t block_size = 0;   // zero-detection granularity, power of two, 4 KiB..16 MiB
  uint32_t max_extent = 0;   // largest EXTENT data, 4 KiB..16 MiB, multiple of 4 KiB
  uint64_t data_bytes = 0;   // bytes in the source's data extents (upper bound of writes)
  uint64_t content_id = 0;   // identity of the source image version (see docs)
  uint32_t flags = 0;
  std::string path;          // destination, relative to the server's root
};

struct DiskRange {
  uint64_t offset = 0;
  uint64_t length = 0;
};

struct DiskDone {
  uint64_t xxh3 = 0;
  uint64_t image_size = 0;
};

// A backing chain, base first: layer i's parent is layer i-1. docs/disk-chains.md.
enum class LayerFormat : uint8_t { raw = 1, qcow2 = 2, kvmig_delta = 3 };
const char* layer_format_name(LayerFormat f);
inline constexpr size_t kMaxChainLayers = 64;

struct DiskChainLayer {
  LayerFormat format = LayerFormat::raw;
  uint64_t size = 0;              // the layer file's size in bytes
  uint64_t id_hi = 0, id_lo = 0;  // content ID (XXH3-128, helper/disk_layer_id.h)
  std::string path;               // destination, relative to the server's root
};

struct DiskChain {
  std::vector<DiskChainLayer> layers;
};

// What the destination found at a layer's path, after checking its own copy's content ID.
enum class LayerStatus : uint8_t {
  missing = 0,  // no file: it will be copied
  held = 1,     // same content ID: skipped
  differs = 2,  // a complete file with another content ID: replaced only with --overwrite
  partial = 3,  // an unfinished kvmig copy: resumed
};
inline constexpr uint8_t kMaxLayerStatus = 3;
const char* layer_status_name(LayerStatus s);

std::vector<uint8_t> encode(const DiskChain& m);
std::vector<uint8_t> encode(const std::vector<LayerStatus>& statuses);
// CHAIN and LINK: counts, paths, formats, sizes and parent rules checked (see validate).
Result<DiskChain> decode_disk_chain(std::span<const uint8_t> payload, const char* what);
Result<std::vector<LayerStatus>> decode_layer_statuses(std::span<const uint8_t> payload,
                                                       size_t expect_count);
Result<void> validate(const DiskChain& m);

std::vector<uint8_t> encode(const DiskOpen& m);
std::vector<uint8_t> encode_range(const DiskRange& m);  // ZERO, HOLE, and EXTENT's head
std::vector<uint8_t> encode_u64(uint64_t v);            // RESUME_FROM, ACK, STOPPED, VERIFIED
std::vector<uint8_t> encode(const DiskDone& m);

Result<DiskOpen> decode_disk_open(std::span<const uint8_t> payload);
Result<DiskRange> decode_disk_range(std::span<const uint8_t> payload, const char* what);
Result<uint64_t> decode_disk_u64(std::span<const uint8_t> payload, const char* what);
Result<DiskDone> decode_disk_done(std::span<const uint8_t> payload);
// The same field checks OPEN's decoder makes, for a locally built OPEN.
Result<void> validate(const DiskOpen& m);

void encode_disk_header(const DiskHeader& h, uint8_t out[kHeaderSize]);
// Checks magic, header check, version, type, flags (none defined) and that a non-EXTENT
// payload is at most 64 KiB and an EXTENT at most 16 + kMaxExtentBytes.
Result<DiskHeader> decode_disk_header(const uint8_t in[kHeaderSize]);

Result<void> send_disk(Stream& stream, DiskMsg type, std::span<const uint8_t> payload = {});
// EXTENT: header, 16-byte head and the data, in one gather write. `data` starts on a 4 KiB
// boundary of the image; its block hashes (disk_extents.h), from which the checksum is made,
// are appended to *hashes when given, for the image digest.
Result<void> send_extent(Stream& stream, uint64_t offset, std::span<const uint8_t> data,
                         std::vector<uint64_t>* hashes = nullptr);
Result<void> send_disk_error(Stream& stream, const Error& error);

struct DiskMessage {
  DiskHeader header;
  std::vector<uint8_t> payload;  // empty for EXTENT: its bytes are still on the stream
  DiskMsg type() const { return header.type; }
};
// Reads one message; an EXTENT's payload is left on the stream for read_extent_into.
Result<DiskMessage> read_disk(Stream& stream);
// Reads an EXTENT's head and data (into `buffer`, which must hold the data) and checks the
// checksum. The data length must be 1..buffer.size(). The data's block hashes are left in
// *hashes when given (replacing its contents).
Result<DiskRange> read_extent_into(Stream& stream, const DiskHeader& header,
                                   std::span<uint8_t> buffer, std::vector<uint64_t>* hashes = nullptr);
// A peer's ERROR as a local error "[code] peer: text".
Error disk_peer_error(const DiskMessage& message);

}  // namespace kvmig::helper
