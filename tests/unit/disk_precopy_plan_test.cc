#include "helper/disk_precopy_plan.h"

#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

namespace kvmig::helper {
namespace {

constexpr uint64_t kBlock = 64 << 10;

DiskPlanConfig config(uint64_t blocks) {
  DiskPlanConfig c;
  c.disk_bytes = blocks * kBlock;
  c.block_bytes = kBlock;
  c.hot_rounds = 3;
  c.hot_writes = 1000;
  c.pause_budget = 0.020;
  c.defer_share = 0.5;
  c.switch_gap = 0;
  return c;
}

std::vector<uint64_t> range(uint64_t from, uint64_t to) {
  std::vector<uint64_t> v(to - from);
  std::iota(v.begin(), v.end(), from);
  return v;
}

TEST(DiskPlanRule, HotByStreakOrByWriteCount) {
  DiskPlanConfig c = config(1);
  EXPECT_FALSE(is_hot_block(2, 5, c));
  EXPECT_TRUE(is_hot_block(3, 1, c));     // rewritten three rounds in a row
  EXPECT_TRUE(is_hot_block(1, 1000, c));  // rewritten in bursts, many times
  c.hot_rounds = 0;
  c.hot_writes = 0;
  EXPECT_FALSE(is_hot_block(255, 1u << 30, c)) << "0 disables both criteria";
}

TEST(DiskPlanRule, ConvergedWhenPauseBytesFitTheBudget) {
  DiskPlanConfig c = config(1);
  // 20 MB at 1 GB/s: exactly 20 ms.
  auto at = disk_converged(20'000'000, 1e9, 0, c);
  EXPECT_TRUE(at.converged);
  EXPECT_NEAR(at.expected_pause, 0.020, 1e-9);
  EXPECT_FALSE(disk_converged(20'000'001, 1e9, 0, c).converged);
  // What the guest writes until the pause counts too: 50 MB/s for 100 ms adds 5 MB.
  c.switch_gap = 0.1;
  auto gap = disk_converged(16'000'000, 1e9, 50e6, c);
  EXPECT_EQ(gap.pause_bytes, 21'000'000u);
  EXPECT_FALSE(gap.converged);
  // Nothing pending converges even before bandwidth is known; something pending does not.
  EXPECT_TRUE(disk_converged(0, 0, 0, config(1)).converged);
  auto unknown = disk_converged(4096, 0, 0, config(1));
  EXPECT_FALSE(unknown.converged);
  EXPECT_TRUE(std::isinf(unknown.expected_pause));
}

TEST(DiskPlan, BulkCopySendsDataBlocksOnlyWithinTheRoundBudget) {
  auto data = range(10, 20);  // 10 data blocks; the rest of the 100 are holes
  DiskPrecopyPlan plan(config(100), data);
  EXPECT_EQ(plan.pending_bytes(), 10 * kBlock);
  EXPECT_FALSE(plan.bulk_done());
  plan.observe({});
  auto r1 = plan.plan_round(0, 4 * kBlock);
  EXPECT_EQ(r1.send, range(10, 14));
  EXPECT_EQ(r1.send_bytes, 4 * kBlock);
  EXPECT_EQ(r1.pending_bytes, 6 * kBlock);
  plan.observe({});
  auto r2 = plan.plan_round(0, 0);  // no limit: the rest
  EXPECT_EQ(r2.send, range(14, 20));
  EXPECT_TRUE(plan.bulk_done());
  EXPECT_EQ(plan.pending_bytes(), 0u);
  EXPECT_TRUE(plan.convergence(0, 0).converged);
}

TEST(DiskPlan, ColdBlocksMakeTheCutBeforeRewrittenOnes) {
  DiskPrecopyPlan plan(config(100), range(0, 8));
  // Blocks 50 and 2 are written before round 1: 2 is still in the bulk, now warm.
  plan.observe(std::vector<BlockWrites>{{2, 1}, {50, 1}});
  auto r = plan.plan_round(0, 7 * kBlock);
  // The 7 cold bulk blocks (0,1,3..7) fill the budget; the written 2 and 50 wait.
  EXPECT_EQ(r.send, (std::vector<uint64_t>{0, 1, 3, 4, 5, 6, 7}));
  plan.observe({});
  auto r2 = plan.plan_round(0, 0);
  EXPECT_EQ(r2.send, (std::vector<uint64_t>{2, 50}));
}

TEST(DiskPlan, BlockWrittenEveryRoundIsDeferredThenSentAtSwitchover) {
  DiskPrecopyPlan plan(config(100), {});
  const double bw = 1e9;  // cap: 0.5 * 20 ms * 1 GB/s = 10 MB, room for 152 blocks
  std::vector<BlockWrites> hot{{7, 1}};
  for (uint32_t round = 1; round <= 2; ++round) {
    hot[0].writes = round;
    plan.observe(hot);
    auto r = plan.plan_round(bw, 0);
    EXPECT_EQ(r.send, std::vector<uint64_t>{7}) << "not hot yet in round " << round;
  }
  hot[0].writes = 3;
  plan.observe(hot);  // third round in a row
  auto r3 = plan.plan_round(bw, 0);
  EXPECT_TRUE(r3.send.empty());
  EXPECT_EQ(r3.deferred_blocks, 1u);
  EXPECT_EQ(r3.newly_deferred, 1u);
  EXPECT_EQ(plan.pending_bytes(), kBlock) << "a deferred block is still owed";
  hot[0].writes = 4;
  plan.observe(hot);
  auto r4 = plan.plan_round(bw, 0);
  EXPECT_TRUE(r4.send.empty()) << "still hot: not resent every round";
  EXPECT_EQ(r4.newly_deferred, 0u);
  // Converged with the deferred block in the pause: 64 KiB at 1 GB/s is 0.07 ms.
  EXPECT_TRUE(plan.convergence(bw, 0).converged);
  hot[0].writes = 5;
  plan.observe(hot);
  auto fin = plan.plan_final();
  EXPECT_EQ(fin.send, std::vector<uint64_t>{7});
  EXPECT_EQ(fin.deferred_blocks, 1u);
  EXPECT_EQ(plan.pending_bytes(), 0u);
  EXPECT_EQ(plan.deferred_bytes(), 0u);
}

TEST(DiskPlan, DeferredBlockThatCoolsGoesBackToLiveRounds) {
  DiskPrecopyPlan plan(config(10), {});
  for (uint32_t w = 1; w <= 3; ++w) {
    plan.observe(std::vector<BlockWrites>{{4, w}});
    (void)plan.plan_round(1e9, 0);
  }
  EXPECT_EQ(plan.deferred_bytes(), kBlock);
  plan.observe({});  // not written this round: its content is stable now
  auto r = plan.plan_round(1e9, 0);
  EXPECT_EQ(r.cooled, 1u);
  EXPECT_EQ(r.send, std::vector<uint64_t>{4});
  EXPECT_EQ(plan.pending_bytes(), 0u);
  // Written again once: a fresh streak, not hot.
  plan.observe(std::vector<BlockWrites>{{4, 4}});
  EXPECT_EQ(plan.plan_round(1e9, 0).send, std::vector<uint64_t>{4});
}

TEST(DiskPlan, DeferralIsCappedByWhatThePauseCanCarryHottestFirst) {
  DiskPlanConfig c = config(1000);
  c.hot_rounds = 0;
  c.hot_writes = 2;  // hot by count alone
  DiskPrecopyPlan plan(c, {});
  // Bandwidth such that the cap holds exactly 3 blocks: 0.5 * 0.02 * bw = 3 * 64 KiB.
  const double bw = 3.0 * kBlock / (0.5 * 0.020);
  std::vector<BlockWrites> dirty;
  for (uint64_t b = 0; b < 6; ++b) dirty.push_back({b, static_cast<uint32_t>(10 + b)});
  plan.observe(dirty);
  auto r = plan.plan_round(bw, 0);
  EXPECT_EQ(r.deferred_blocks, 3u);
  EXPECT_EQ(r.send, (std::vector<uint64_t>{0, 1, 2})) << "the three hottest (3,4,5) are deferred";
  // Unknown bandwidth: nothing is deferred, everything goes live.
  DiskPrecopyPlan plain(c, {});
  plain.observe(dirty);
  EXPECT_EQ(plain.plan_round(0, 0).send.size(), 6u);
}

TEST(DiskPlan, HeavyWritingKeepsTheDiskFromConvergingUntilItSlows) {
  DiskPrecopyPlan plan(config(4096), {});
  const double bw = 500e6;  // 20 ms carries 10 MB = 152 blocks
  // 400 distinct blocks per round, never the same twice: nothing is hot, all goes live,
  // and the next harvest leaves 400 blocks (26 MB) pending: over budget.
  for (uint64_t round = 0; round < 3; ++round) {
    std::vector<BlockWrites> dirty;
    for (uint64_t i = 0; i < 400; ++i) dirty.push_back({round * 400 + i, 1});
    plan.observe(dirty);
    EXPECT_FALSE(plan.convergence(bw, 0).converged);
    EXPECT_EQ(plan.plan_round(bw, 0).send.size(), 400u);
  }
  std::vector<BlockWrites> few;
  for (uint64_t i = 0; i < 100; ++i) few.push_back({3000 + i, 1});
  plan.observe(few);
  auto c = plan.convergence(bw, 0);
  EXPECT_TRUE(c.converged);
  EXPECT_NEAR(c.expected_pause, 100.0 * kBlock / bw, 1e-9);
}

TEST(DiskPlan, PartialLastBlockAndOutOfRangeIndices) {
  DiskPlanConfig c = config(0);
  c.disk_bytes = 3 * kBlock + 512;
  DiskPrecopyPlan plan(c, std::vector<uint64_t>{3, 99});
  EXPECT_EQ(plan.blocks(), 4u);
  EXPECT_EQ(plan.block_length(3), 512u);
  EXPECT_EQ(plan.pending_bytes(), 512u) << "index 99 is past the disk and ignored";
  plan.observe(std::vector<BlockWrites>{{1000, 1}});
  EXPECT_EQ(plan.pending_bytes(), 512u);
}

}  // namespace
}  // namespace kvmig::helper
