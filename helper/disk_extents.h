// Where an image's bytes are: data and hole extents from SEEK_DATA/SEEK_HOLE, all-zero block
// detection inside data, and the whole-image XXH3 both ends of a disk copy compute (holes and
// zero blocks hash as the zeros they read as).
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

// Feeds `length` zero bytes to an XXH3 state (holes and zero markers).
void hash_zeros(XXH3_state_t* state, uint64_t length);
// Feeds [0, end) of fd to the state, reading only data extents (a resumed copy re-hashes the
// prefix an earlier connection wrote or sent).
Result<void> hash_prefix(int fd, uint64_t end, XXH3_state_t* state);
// XXH3-64 of the first `size` bytes of a file as they read (tests and the benchmark use it).
Result<uint64_t> hash_file(int fd, uint64_t size);

}  // namespace kvmig::helper
