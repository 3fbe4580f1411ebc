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

void hash_zeros(XXH3_state_t* state, uint64_t length) {
  while (length > 0) {
    size_t n = std::min<uint64_t>(length, kHashChunk);
    XXH3_64bits_update(state, zero_chunk(), n);
    length -= n;
  }
}

Result<void> hash_prefix(int fd, uint64_t end, XXH3_state_t* state) {
  KVMIG_ASSIGN(auto extents, scan_extents(fd, end, 1));
  std::unique_ptr<uint8_t[]> buf(new uint8_t[kHashChunk]);
  for (const Extent& e : extents) {
    if (!e.data) {
      hash_zeros(state, e.length);
      continue;
    }
    for (uint64_t pos = e.offset; pos < e.offset + e.length;) {
      size_t want = std::min<uint64_t>(kHashChunk, e.offset + e.length - pos);
      ssize_t n = ::pread(fd, buf.get(), want, static_cast<off_t>(pos));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Error::from_errno("pread at " + std::to_string(pos));
      if (n == 0)
        return Error{"file ends at " + std::to_string(pos) + ", before " + std::to_string(end)};
      XXH3_64bits_update(state, buf.get(), static_cast<size_t>(n));
      pos += static_cast<uint64_t>(n);
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
