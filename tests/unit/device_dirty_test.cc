// DeviceDirty (the VMM's bitmap of its own writes into guest RAM) and the granule rounding
// of dirty bitmaps: pure logic, no /dev/kvm.
#include <gtest/gtest.h>

#include <thread>
#include <vector>

#include "kvm/device_dirty.h"
#include "kvm/dirty_tracker.h"

namespace kvmig::kvm {
namespace {

std::vector<uint64_t> set_pages(const std::vector<uint64_t>& bits, uint64_t pages) {
  std::vector<uint64_t> out;
  for (uint64_t p = 0; p < pages; ++p)
    if (bits[p / 64] & (1ull << (p % 64))) out.push_back(p);
  return out;
}

TEST(DeviceDirty, MarksEveryTouchedPageAndDrainClears) {
  DeviceDirty d({{0, 1 << 20}, {4ull << 30, 1 << 20}});
  EXPECT_TRUE(d.mark(0x1fff, 2));  // straddles pages 1 and 2
  EXPECT_TRUE(d.mark((4ull << 30) + 0x3f000, 0x2000));  // pages 63 and 64: across a word
  std::vector<uint64_t> a(4, 0), b(4, 0);
  ASSERT_TRUE(d.drain(0, 256, a.data()));
  ASSERT_TRUE(d.drain(4ull << 30, 256, b.data()));
  EXPECT_EQ(set_pages(a, 256), (std::vector<uint64_t>{1, 2}));
  EXPECT_EQ(set_pages(b, 256), (std::vector<uint64_t>{63, 64}));
  std::vector<uint64_t> again(4, 0);
  ASSERT_TRUE(d.drain(0, 256, again.data()));
  EXPECT_EQ(set_pages(again, 256), std::vector<uint64_t>{}) << "drain must clear";
  EXPECT_FALSE(d.drain(0x1000, 256, again.data())) << "no range starts there";
}

TEST(DeviceDirty, RangesOutsideGuestRamAreReported) {
  DeviceDirty d({{0, 1 << 20}});
  EXPECT_FALSE(d.mark(1 << 20, 1));
  EXPECT_FALSE(d.mark((1 << 20) - 4096, 8192));
  EXPECT_TRUE(d.test((1 << 20) - 4096, 1)) << "the part inside is still marked";
  EXPECT_FALSE(d.mark(~0ull - 10, 100)) << "wrapping range";
  EXPECT_TRUE(d.mark(5, 0));
  EXPECT_FALSE(d.test(0, 4096));
}

TEST(DeviceDirty, ConcurrentMarksAreNotLost) {
  DeviceDirty d({{0, 64 << 20}});
  const uint64_t pages = (64 << 20) / 4096;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&d, t, pages] {
      for (uint64_t p = t; p < pages; p += 4) d.mark(p * 4096, 1);
    });
  for (auto& t : threads) t.join();
  std::vector<uint64_t> bits(pages / 64, 0);
  ASSERT_TRUE(d.drain(0, pages, bits.data()));
  for (uint64_t w : bits) ASSERT_EQ(w, ~0ull);
}

TEST(RoundToGranules, SmallGranulesInsideAWord) {
  std::vector<uint64_t> bits{(1ull << 5) | (1ull << 63), 1ull << 16};
  round_to_granules(bits, 128, 16);  // 64 KiB granules
  EXPECT_EQ(bits[0], 0xffffull | (0xffffull << 48));
  EXPECT_EQ(bits[1], 0xffffull << 16);
}

TEST(RoundToGranules, LargeGranulesAcrossWords) {
  std::vector<uint64_t> bits(16, 0);
  bits[9] = 1ull << 40;  // page 616, in the second 2 MiB granule (pages 512..1023)
  round_to_granules(bits, 1024, 512);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(bits[i], 0u) << i;
  for (int i = 8; i < 16; ++i) EXPECT_EQ(bits[i], ~0ull) << i;
}

TEST(RoundToGranules, PartialLastGranuleStopsAtTheSlotEnd) {
  std::vector<uint64_t> bits(2, 0);
  bits[1] = 1;  // page 64 of a 100-page slot, 2 MiB granule covers all of it
  round_to_granules(bits, 100, 512);
  EXPECT_EQ(bits[0], ~0ull);
  EXPECT_EQ(bits[1], (1ull << 36) - 1);
  std::vector<uint64_t> clean(2, 0);
  round_to_granules(clean, 100, 512);
  EXPECT_EQ(clean, (std::vector<uint64_t>{0, 0}));
}

TEST(RoundToGranules, FourKilobytesIsIdentity) {
  std::vector<uint64_t> bits{0x8000000000000001ull, 0x10};
  auto before = bits;
  round_to_granules(bits, 128, 1);
  EXPECT_EQ(bits, before);
}

}  // namespace
}  // namespace kvmig::kvm
