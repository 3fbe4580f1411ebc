#include "helper/disk_extents.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>

namespace kvmig::helper {
namespace {

constexpr size_t kHashChunk = 1 << 20;

const uint8_t* zero_chunk() {
  static const auto* zeros = new uint8_t[kHashChunk]();
  return zeros;
}

uint64_t align_down(uint64_t v, uint64_t a) { return v & ~(a - 1); }
uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) & ~(a - 1); }

}  // namespace

Result<std::vector<Extent>> scan_extents(int fd, uint64_t size, uint64_t align) {
  std::vector<Extent> out;
  auto add = [&](uint64_t begin, uint64_t end, bool data) {
    if (end <= begin) return;
    if (!out.empty() && out.back().data == data &&
        out.back().offset + out.back().length == begin) {
      out.back().length = end - out.back().offset;
      return;
    }
    out.push_back({begin, end - begin, data});
  };
  uint64_t pos = 0;
  while (pos < size) {
    off_t data = ::lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;  // no data after pos: the rest is a hole
      if (errno == EINVAL || errno == EOPNOTSUPP) {
        out.clear();  // no SEEK_DATA here: everything is data
        add(0, size, true);
        return out;
      }
      return Error::from_errno("lseek SEEK_DATA at " + std::to_string(pos));
    }
    if (static_cast<uint64_t>(data) >= size) break;
    off_t hole = ::lseek(fd, data, SEEK_HOLE);
    if (hole < 0) return Error::from_errno("lseek SEEK_HOLE at " + std::to_string(data));
    uint64_t begin = std::max(align_down(static_cast<uint64_t>(data), align), pos);
    uint64_t end = std::min<uint64_t>(align_up(static_cast<uint64_t>(hole), align), size);
    add(pos, begin, false);
    add(begin, end, true);
    pos = std::max(end, pos);
  }
  uint64_t covered = out.empty() ? 0 : out.back().offset + out.back().length;
  add(covered, size, false);
  return out;
}

uint64_t data_bytes(const std::vector<Extent>& extents) {
  uint64_t sum = 0;
  for (const Extent& e : extents)
    if (e.data) sum += e.length;
  return sum;
}

bool all_zero(const uint8_t* p, size_t n) {
  // A data block almost always differs in its first bytes; the rest is one memcmp of the
  // buffer against itself shifted by 16, which libc does at memory speed.
  if (n < 16) {
    for (size_t i = 0; i < n; ++i)
      if (p[i]) return false;
    return true;
  }
  static const uint8_t zeros[16] = {};
  return std::memcmp(p, zeros, 16) == 0 && std::memcmp(p, p + 16, n - 16) == 0;
}

std::vector<ZeroRun> split_zero_blocks(std::span<const uint8_t> data, uint64_t offset,
                                       uint32_t block) {
  std::vector<ZeroRun> runs;
  uint64_t end = offset + data.size();
  for (uint64_t pos = offset; pos < end;) {
    uint64_t next = std::min<uint64_t>(align_down(pos, block) + block, end);
    bool zero = all_zero(data.data() + (pos - offset), next - pos);
    if (!runs.empty() && runs.back().zero == zero)
      runs.back().length += next - pos;
    else
      runs.push_back({pos, next - pos, zero});
    pos = next;
  }
  return runs;
}

void block_hashes(std::span<const uint8_t> data, std::vector<uint64_t>& out) {
  for (size_t pos = 0; pos < data.size(); pos += kDigestBlock)
    out.push_back(XXH3_64bits(data.data() + pos, std::min(kDigestBlock, data.size() - pos)));
}

void digest_blocks(XXH3_state_t* state, std::span<const uint64_t> hashes) {
  XXH3_64bits_update(state, hashes.data(), hashes.size_bytes());
}

void hash_zeros(XXH3_state_t* state, uint64_t length) {
  static const std::vector<uint64_t> zero_blocks(512, XXH3_64bits(zero_chunk(), kDigestBlock));
  uint64_t blocks = length / kDigestBlock;
  while (blocks > 0) {
    size_t n = std::min<uint64_t>(blocks, zero_blocks.size());
    digest_blocks(state, {zero_blocks.data(), n});
    blocks -= n;
  }
  if (uint64_t rest = length % kDigestBlock) {
    uint64_t h = XXH3_64bits(zero_chunk(), rest);
    digest_blocks(state, {&h, 1});
  }
}

Result<void> hash_prefix(int fd, uint64_t end, XXH3_state_t* state) {
  KVMIG_ASSIGN(auto extents, scan_extents(fd, end, kDigestBlock));
  std::unique_ptr<uint8_t[]> buf(new uint8_t[kHashChunk]);
  std::vector<uint64_t> hashes;
  for (const Extent& e : extents) {
    if (!e.data) {
      hash_zeros(state, e.length);
      continue;
    }
    for (uint64_t pos = e.offset; pos < e.offset + e.length;) {
      size_t want = std::min<uint64_t>(kHashChunk, e.offset + e.length - pos);
      size_t got = 0;
      while (got < want) {  // whole blocks only, so each block hashes in one piece
        ssize_t n = ::pread(fd, buf.get() + got, want - got, static_cast<off_t>(pos + got));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return Error::from_errno("pread at " + std::to_string(pos + got));
        if (n == 0)
          return Error{"file ends at " + std::to_string(pos + got) + ", before " + std::to_string(end)};
        got += static_cast<size_t>(n);
      }
      hashes.clear();
      block_hashes({buf.get(), want}, hashes);
      digest_blocks(state, hashes);
      pos += want;
    }
  }
  return ok();
}

Result<uint64_t> hash_file(int fd, uint64_t size) {
  XXH3_state_t state;
  XXH3_64bits_reset(&state);
  KVMIG_TRY(hash_prefix(fd, size, &state));
  return XXH3_64bits_digest(&state);
}

}  // namespace kvmig::helper
