// Hole and zero-block detection, and the whole-image hash, on real sparse files.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "base/fd.h"
#include "helper/disk_extents.h"

namespace kvmig::helper {
namespace {

class SparseFile : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kvmig-extents-XXXXXX";
    fd_.reset(::mkstemp(tmpl));
    ASSERT_TRUE(fd_.valid());
    path_ = tmpl;
  }
  void TearDown() override { ::unlink(path_.c_str()); }
  void write_at(uint64_t off, size_t len, uint8_t fill) {
    std::vector<uint8_t> b(len, fill);
    ASSERT_EQ(::pwrite(fd_.get(), b.data(), len, off), static_cast<ssize_t>(len));
  }
  Fd fd_;
  std::string path_;
};

TEST_F(SparseFile, ExtentsFollowDataAndHoles) {
  const uint64_t mib = 1 << 20;
  ASSERT_EQ(::ftruncate(fd_.get(), 16 * mib), 0);
  write_at(2 * mib, mib, 0xab);
  write_at(8 * mib + 4096, 4096, 0xcd);
  auto e = scan_extents(fd_.get(), 16 * mib);
  ASSERT_TRUE(e.ok()) << e.error().message;
  uint64_t pos = 0;
  for (const Extent& x : *e) {  // covering, in order, 4 KiB aligned
    EXPECT_EQ(x.offset, pos);
    EXPECT_EQ(x.offset % 4096, 0u);
    pos += x.length;
  }
  EXPECT_EQ(pos, 16 * mib);
  // Data covers both writes, and far less than the file (the file system may allocate a
  // little more than written, never 16 MiB).
  uint64_t data = data_bytes(*e);
  EXPECT_GE(data, mib + 4096);
  EXPECT_LT(data, 8 * mib);
  auto covers = [&](uint64_t off) {
    for (const Extent& x : *e)
      if (off >= x.offset && off < x.offset + x.length) return x.data;
    return false;
  };
  EXPECT_TRUE(covers(2 * mib));
  EXPECT_TRUE(covers(8 * mib + 4096));
  EXPECT_FALSE(covers(12 * mib));
  EXPECT_FALSE(covers(0));
}

TEST_F(SparseFile, AllHoleFileHasNoData) {
  ASSERT_EQ(::ftruncate(fd_.get(), 1 << 20), 0);
  auto e = scan_extents(fd_.get(), 1 << 20);
  ASSERT_TRUE(e.ok());
  ASSERT_EQ(e->size(), 1u);
  EXPECT_FALSE((*e)[0].data);
}

TEST_F(SparseFile, HashCountsHolesAsZeros) {
  ASSERT_EQ(::ftruncate(fd_.get(), 3 << 20), 0);
  write_at(1 << 20, 12345, 0x5a);
  std::vector<uint8_t> whole(3 << 20, 0);
  std::fill(whole.begin() + (1 << 20), whole.begin() + (1 << 20) + 12345, 0x5a);
  auto h = hash_file(fd_.get(), whole.size());
  ASSERT_TRUE(h.ok());
  // The digest by its definition: XXH3-64 over each 4 KiB block's XXH3-64, in order.
  std::vector<uint64_t> blocks;
  for (size_t pos = 0; pos < whole.size(); pos += 4096) blocks.push_back(XXH3_64bits(whole.data() + pos, 4096));
  EXPECT_EQ(*h, XXH3_64bits(blocks.data(), blocks.size() * 8));
  // A prefix hash continues where it stopped; zeros fed as a count equal zeros hashed.
  XXH3_state_t s;
  XXH3_64bits_reset(&s);
  ASSERT_TRUE(hash_prefix(fd_.get(), 2 << 20, &s).ok());
  hash_zeros(&s, 1 << 20);
  EXPECT_EQ(XXH3_64bits_digest(&s), *h);
  // A short last block hashes as its own bytes.
  std::vector<uint64_t> tail;
  block_hashes({whole.data(), 4096 + 100}, tail);
  ASSERT_EQ(tail.size(), 2u);
  EXPECT_EQ(tail[1], XXH3_64bits(whole.data() + 4096, 100));
}

TEST(ZeroBlocks, SplitsOnAbsoluteBlockBoundaries) {
  std::vector<uint8_t> d(5 * 4096, 0);
  d[4096 + 7] = 1;      // block 1 (absolute 0x3000 + ...) is data
  d[4 * 4096 + 1] = 2;  // last block is data
  // Starts at an offset 2 blocks into an 8 KiB block grid: the first block is partial.
  auto runs = split_zero_blocks(d, 4096 * 3, 8192);
  // Absolute blocks: [12K,16K) zero, [16K,24K) has d[4096+7] -> data, [24K,32K) zero? no:
  // d covers [12K, 32K); d[4*4096+1] is at 28K -> block [24K,32K) is data.
  ASSERT_EQ(runs.size(), 2u);
  EXPECT_TRUE(runs[0].zero);
  EXPECT_EQ(runs[0].offset, 12288u);
  EXPECT_EQ(runs[0].length, 4096u);
  EXPECT_FALSE(runs[1].zero);
  EXPECT_EQ(runs[1].offset, 16384u);
  EXPECT_EQ(runs[1].length, 16384u);
}

TEST(ZeroBlocks, AllZeroSeesTheLastByte) {
  std::vector<uint8_t> d(65536, 0);
  EXPECT_TRUE(all_zero(d.data(), d.size()));
  d.back() = 1;
  EXPECT_FALSE(all_zero(d.data(), d.size()));
  d.back() = 0;
  d[15] = 1;
  EXPECT_FALSE(all_zero(d.data(), d.size()));
  EXPECT_TRUE(all_zero(d.data(), 15));
}

}  // namespace
}  // namespace kvmig::helper
