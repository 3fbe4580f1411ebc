// Where an image's bytes are: data and hole extents from SEEK_DATA/SEEK_HOLE, all-zero block
// detection inside data, and the image digest both ends of a disk copy compute.
#pragma once

#ifndef XXH_STATIC_LINKING_ONLY
#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t on the stack
#endif
#include <xxhash.h>

#include <cstdint>
#include <span>
#include <vector>

#include "base/result.h"

namespace kvmig::helper {

struct Extent {
  uint64_t offset = 0;
  uint64_t length = 0;
  bool data = false;  // false: a hole, reads as zeros, occupies no space
};

// Extents covering [0, size) in order, alternating data and hole. Data boundaries are widened
// to `align` (a power of two; clamped to size) so O_DIRECT reads stay aligned. A file system
// without SEEK_DATA (or a block device) is reported as one data extent: correct, just slower.
Result<std::vector<Extent>> scan_extents(int fd, uint64_t size, uint64_t align = 4096);
uint64_t data_bytes(const std::vector<Extent>& extents);

struct ZeroRun {
  uint64_t offset = 0;
  uint64_t length = 0;
  bool zero = false;
};
// Splits data read from `offset` into maximal runs of all-zero and non-zero blocks. Blocks are
// aligned to absolute multiples of `block` (a power of two), so the first and last may be
// partial.
std::vector<ZeroRun> split_zero_blocks(std::span<const uint8_t> data, uint64_t offset,
                                       uint32_t block);
bool all_zero(const uint8_t* p, size_t n);

// The image digest (DONE / VERIFIED, disk-copy version 2): XXH3-64 over the XXH3-64 of each
// 4 KiB block of the image in order (little-endian u64s; the image's last block may be
// shorter). Every block of zeros hashes to the same value, so holes and zero markers cost no
// reading or hashing of bytes, and an EXTENT's checksum is made of the very block hashes of its
// data: each byte is hashed once per side, where a whole-byte hash plus a payload checksum
// took three passes (two for the data, one for every hole byte).
inline constexpr size_t kDigestBlock = 4096;
// The block hashes of `data`, which starts on a block boundary, appended to `out`.
void block_hashes(std::span<const uint8_t> data, std::vector<uint64_t>& out);
// Feeds block hashes to a digest state.
void digest_blocks(XXH3_state_t* state, std::span<const uint64_t> hashes);
// Feeds `length` zero bytes, starting on a block boundary (holes and zero markers).
void hash_zeros(XXH3_state_t* state, uint64_t length);
// Feeds the digest of [0, end) of fd (end on a block boundary, or the image's end), reading
// only data extents (a resumed copy re-hashes the prefix an earlier connection wrote or sent).
Result<void> hash_prefix(int fd, uint64_t end, XXH3_state_t* state);
// The image digest of the first `size` bytes of a file as they read (tests and the benchmark
// compare files with it).
Result<uint64_t> hash_file(int fd, uint64_t size);

}  // namespace kvmig::helper
