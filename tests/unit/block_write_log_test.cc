// BlockWriteLog: per-block dirty set and write counts of a disk, pure logic.
#include <gtest/gtest.h>

#include <atomic>
#include <stdexcept>
#include <thread>
#include <vector>

#include "kvm/block_write_log.h"

namespace kvmig::kvm {
namespace {

std::vector<uint64_t> indices(const std::vector<BlockWriteLog::DirtyBlock>& v) {
  std::vector<uint64_t> out;
  for (const auto& b : v) out.push_back(b.index);
  return out;
}

TEST(BlockWriteLog, GeometryRoundsTheLastPartialBlockUp) {
  BlockWriteLog log(10 * 64 * 1024 + 512);
  EXPECT_EQ(log.block_bytes(), 64u * 1024);
  EXPECT_EQ(log.blocks(), 11u);
  EXPECT_EQ(log.disk_bytes(), 10u * 64 * 1024 + 512);
  BlockWriteLog small(1 << 20, 4096);
  EXPECT_EQ(small.blocks(), 256u);
}

TEST(BlockWriteLog, RejectsBlockSizesOutsideTheRange) {
  EXPECT_THROW(BlockWriteLog(1 << 20, 2048), std::invalid_argument);
  EXPECT_THROW(BlockWriteLog(1 << 20, 4 << 20), std::invalid_argument);
  EXPECT_THROW(BlockWriteLog(1 << 20, 96 * 1024), std::invalid_argument);
  EXPECT_NO_THROW(BlockWriteLog(1 << 20, 2 << 20));
}

TEST(BlockWriteLog, MarksNothingUntilStartedAndAfterStop) {
  BlockWriteLog log(1 << 20, 4096);
  EXPECT_FALSE(log.tracking());
  log.mark(0, 4096);
  log.start();
  EXPECT_TRUE(log.harvest().empty());
  log.mark(8192, 1);
  log.stop();
  log.mark(4096 * 10, 4096);
  EXPECT_EQ(indices(log.harvest()), (std::vector<uint64_t>{2}));
}

TEST(BlockWriteLog, MarksEveryTouchedBlockClippedToTheDisk) {
  BlockWriteLog log(100 * 4096 + 100, 4096);  // 101 blocks, the last one partial
  log.start();
  log.mark(4095, 2);            // straddles blocks 0 and 1
  log.mark(63 * 4096, 8192);    // 63 and 64: across a bitmap word
  log.mark(100 * 4096, 1 << 20);  // runs past the end: only block 100
  log.mark(200 * 4096, 4096);   // wholly past the end: nothing
  log.mark(5 * 4096, 0);        // empty: nothing
  EXPECT_EQ(indices(log.harvest()), (std::vector<uint64_t>{0, 1, 63, 64, 100}));
  EXPECT_TRUE(log.harvest().empty());  // harvest cleared the set
}

TEST(BlockWriteLog, CountsWritesSinceStartAcrossHarvests) {
  BlockWriteLog log(1 << 20);
  log.start();
  for (int i = 0; i < 3; ++i) log.mark(0, 512);
  log.mark(70 * 1024, 10);  // block 1
  auto first = log.harvest();
  ASSERT_EQ(first.size(), 2u);
  EXPECT_EQ(first[0].index, 0u);
  EXPECT_EQ(first[0].writes, 3u);
  EXPECT_EQ(first[1].writes, 1u);
  log.mark(100, 1);
  auto second = log.harvest();
  ASSERT_EQ(second.size(), 1u);
  EXPECT_EQ(second[0].writes, 4u);  // counts are since start(), not since the harvest
  log.start();                      // restart clears counts and the set
  log.mark(100, 1);
  auto third = log.harvest();
  ASSERT_EQ(third.size(), 1u);
  EXPECT_EQ(third[0].writes, 1u);
}

// Writers mark blocks while a harvester drains concurrently: every block a writer marked
// must show up in some harvest at or after its mark, and the last write count seen for
// each block must equal the number of marks it got.
TEST(BlockWriteLog, ConcurrentMarksAreNeverLost) {
  constexpr uint64_t kBlocks = 4096;
  constexpr int kWriters = 3;
  constexpr int kRounds = 40;
  BlockWriteLog log(kBlocks * 4096, 4096);
  log.start();
  std::atomic<int> writers_done{0};
  std::atomic<int> harvests{0};
  std::vector<std::thread> writers;
  for (int w = 0; w < kWriters; ++w) {
    writers.emplace_back([&, w] {
      for (int r = 0; r < kRounds; ++r) {
        // Round r waits for harvest r, so marks and harvests really interleave however the
        // threads are scheduled (on a busy host the writers could otherwise finish first).
        while (harvests.load() < r) std::this_thread::yield();
        for (uint64_t b = w; b < kBlocks; b += kWriters) log.mark(b * 4096, 4096);
      }
      writers_done.fetch_add(1);
    });
  }
  std::vector<uint32_t> last_count(kBlocks, 0);
  std::vector<uint64_t> seen(kBlocks, 0);
  auto absorb = [&](const std::vector<BlockWriteLog::DirtyBlock>& v) {
    uint64_t prev = 0;
    bool first = true;
    for (const auto& b : v) {
      ASSERT_LT(b.index, kBlocks);
      if (!first) {
        ASSERT_GT(b.index, prev);  // ascending, no duplicates
      }
      prev = b.index;
      first = false;
      ASSERT_GE(b.writes, last_count[b.index]);  // counts never go down
      last_count[b.index] = b.writes;
      ++seen[b.index];
    }
  };
  while (writers_done.load() < kWriters) {
    absorb(log.harvest());
    harvests.fetch_add(1);
  }
  for (auto& t : writers) t.join();
  absorb(log.harvest());  // whatever was marked after the last concurrent harvest
  EXPECT_GE(harvests.load(), kRounds - 1);
  for (uint64_t b = 0; b < kBlocks; ++b) {
    ASSERT_GE(seen[b], 1u) << "block " << b;
    ASSERT_EQ(last_count[b], static_cast<uint32_t>(kRounds)) << "block " << b;
  }
}

}  // namespace
}  // namespace kvmig::kvm
