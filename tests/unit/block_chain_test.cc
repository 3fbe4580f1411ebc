// The layered read/write mapping of a base + delta chain (kvm/block_chain.h): which layer a
// read of each byte goes to, and which span a write must cover so the top holds whole
// granules. Pure: no file, no device.
#include "kvm/block_chain.h"

#include <gtest/gtest.h>

namespace kvmig::kvm {
namespace {

using Piece = ChainMap::Piece;
constexpr uint64_t K = 1024;

TEST(ExtentSet, MergesTouchingAndOverlappingRanges) {
  ExtentSet s;
  s.add(8 * K, 4 * K);
  s.add(0, 4 * K);
  s.add(4 * K, 4 * K);  // touches both: one extent
  EXPECT_EQ(s.count(), 1u);
  EXPECT_EQ(s.bytes(), 12 * K);
  s.add(20 * K, 4 * K);
  s.add(10 * K, 12 * K);  // overlaps the first and the second
  EXPECT_EQ(s.count(), 1u);
  EXPECT_EQ(s.bytes(), 24 * K);
  EXPECT_TRUE(s.covers(0, 24 * K));
  EXPECT_FALSE(s.covers(0, 24 * K + 1));
  EXPECT_EQ(s.extent_at(30 * K), std::make_pair(30 * K, 30 * K));
}

TEST(ChainMap, ARawImageReadsEverythingFromTheBase) {
  ChainMap m(1024 * K, 4 * K, 1);
  EXPECT_EQ(m.resolve(512, 64 * K), (std::vector<Piece>{{512, 64 * K, 0}}));
  EXPECT_EQ(m.write_span(512, 512), std::make_pair(uint64_t{512}, uint64_t{1024}));  // no copy-up
}

TEST(ChainMap, ReadsGoToTheTopMostLayerHoldingEachByte) {
  ChainMap m(1024 * K, 4 * K, 3);  // base, mid, top
  m.add(1, 0, 64 * K);             // mid holds [0, 64K)
  m.add(2, 16 * K, 8 * K);         // top holds [16K, 24K)
  m.add(2, 60 * K, 8 * K);         // and [60K, 68K): over mid's end and the base
  EXPECT_EQ(m.resolve(0, 128 * K), (std::vector<Piece>{{0, 16 * K, 1},
                                                       {16 * K, 8 * K, 2},
                                                       {24 * K, 36 * K, 1},
                                                       {60 * K, 8 * K, 2},
                                                       {68 * K, 60 * K, 0}}));
  // From below the top: what a copy-up reads.
  EXPECT_EQ(m.resolve(12 * K, 8 * K, 1), (std::vector<Piece>{{12 * K, 8 * K, 1}}));
  EXPECT_EQ(m.resolve(62 * K, 4 * K, 1), (std::vector<Piece>{{62 * K, 2 * K, 1}, {64 * K, 2 * K, 0}}));
}

TEST(ChainMap, AHoleInTheMiddleLayerReadsThroughToTheBase) {
  ChainMap m(64 * K, 4 * K, 3);
  m.add(1, 0, 8 * K);
  m.add(1, 16 * K, 8 * K);
  EXPECT_EQ(m.resolve(4 * K, 16 * K), (std::vector<Piece>{{4 * K, 4 * K, 1}, {8 * K, 8 * K, 0}, {16 * K, 4 * K, 1}}));
}

TEST(ChainMap, APartialWriteToAGranuleTheTopLacksIsWidened) {
  ChainMap m(1024 * K, 4 * K, 2);
  // 512 bytes in the middle of granule [4K, 8K): the whole granule is written.
  EXPECT_EQ(m.write_span(5 * K, 512), std::make_pair(4 * K, 8 * K));
  // Whole granules: nothing to copy up.
  EXPECT_EQ(m.write_span(8 * K, 8 * K), std::make_pair(8 * K, 16 * K));
  // Ragged ends: widened at both.
  EXPECT_EQ(m.write_span(3 * K, 6 * K), std::make_pair(0 * K, 12 * K));
  EXPECT_EQ(m.granules(3 * K, 6 * K), std::make_pair(0 * K, 12 * K));
}

TEST(ChainMap, AGranuleTheTopHoldsIsWrittenInPlace) {
  ChainMap m(1024 * K, 4 * K, 2);
  m.add(1, 0, 8 * K);
  EXPECT_EQ(m.write_span(5 * K, 512), std::make_pair(5 * K, 5 * K + 512));
  // The head granule is held, the tail one is not: widened at the tail only.
  EXPECT_EQ(m.write_span(5 * K, 4 * K), std::make_pair(5 * K, 12 * K));
}

TEST(ChainMap, TheLastGranuleIsClampedToTheDisk) {
  ChainMap m(10 * K, 4 * K, 2);  // the last granule is [8K, 10K)
  EXPECT_EQ(m.write_span(9 * K, 512), std::make_pair(8 * K, 10 * K));
  m.add(1, 8 * K, 64 * K);  // clamped too
  EXPECT_TRUE(m.holds(1, 8 * K, 2 * K));
  EXPECT_FALSE(m.holds(1, 8 * K, 3 * K));
  EXPECT_EQ(m.write_span(9 * K, 512), std::make_pair(9 * K, 9 * K + 512));
}

}  // namespace
}  // namespace kvmig::kvm
