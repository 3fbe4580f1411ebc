// Which disk blocks to send in a pre-copy round, which to hold back as hot, and when the disk
// part of a live migration has converged (after US8560791; docs/disk-migration.md). No file,
// no socket, no clock: the sender harvests the write log and measures, this decides.
//
// The rule, per round:
//  1. Harvest: every block written since the last harvest becomes pending (needs sending);
//     its streak (rounds in a row it was written) and its write count since tracking began
//     are updated. Before round 1 every block of a data extent is pending (the bulk copy).
//  2. Hot: a pending block written this round whose streak reached hot_rounds, or whose
//     writes reached hot_writes, is a hot candidate. Candidates are deferred, hottest
//     (most writes) first, up to max_deferred_bytes = defer_share x pause_budget x bandwidth:
//     deferring more than the pause can carry would only move the problem into the pause.
//     A deferred block left unwritten for a round has cooled: it goes back to the normal
//     rounds (its content is stable now, so sending it live costs the pause nothing).
//  3. Send: pending blocks that are not deferred, cold ones (never written since tracking
//     began, i.e. the bulk copy) first, then the rewritten ones, each in ascending block
//     order (sequential reads), at most max_round_bytes per round so memory rounds
//     interleave with the bulk copy.
//  4. Converged: the pause would carry every pending block (deferred ones included) plus
//     what the guest writes between the harvest and the pause (dirty_rate x switch_gap);
//     the disk part has converged when that, at the measured bandwidth, fits pause_budget.
//  5. Final (source paused, device quiesced): one last harvest, and every pending block,
//     deferred ones included, goes out before the vCPU state.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace kvmig::helper {

struct DiskPlanConfig {
  uint64_t disk_bytes = 0;
  uint64_t block_bytes = 64 << 10;  // power of two; the last block may be partial
  uint8_t hot_rounds = 3;           // written this many harvests in a row: hot
  uint32_t hot_writes = 64;         // or written this many times since tracking began
  double pause_budget = 0.020;      // seconds of pause the disk part may take (issue 4: 20 ms)
  double defer_share = 0.5;         // share of the pause budget hot blocks may fill
  double switch_gap = 0.0005;       // seconds from the deciding harvest to the pause
};

// One harvested block: its index and its write count since tracking began (BlockWriteLog's
// DirtyBlock, restated so this file needs nothing from kvm/).
struct BlockWrites {
  uint64_t index = 0;
  uint32_t writes = 0;
};

// Pure parts of the rule, unit-tested on their own.
bool is_hot_block(uint8_t streak, uint32_t writes, const DiskPlanConfig& config);

struct DiskConvergence {
  bool converged = false;
  double expected_pause = 0;  // seconds the disk part of the pause would take (inf: unknown)
  uint64_t pause_bytes = 0;   // bytes the pause would carry, gap writes included
};
DiskConvergence disk_converged(uint64_t pending_bytes, double bandwidth, double dirty_rate,
                               const DiskPlanConfig& config);

struct DiskRoundPlan {
  std::vector<uint64_t> send;  // block indices, in send order
  uint64_t send_bytes = 0;
  uint64_t deferred_blocks = 0;  // hot, held for the switch-over after this round
  uint64_t deferred_bytes = 0;
  uint64_t newly_deferred = 0;   // blocks deferred this round that were not before
  uint64_t cooled = 0;           // deferred blocks returned to the normal rounds
  uint64_t pending_bytes = 0;    // left pending after this round, deferred included
};

class DiskPrecopyPlan {
 public:
  // `data_blocks`: the blocks the bulk copy must send (those overlapping data extents);
  // blocks of holes are already right at a fresh, sparse destination.
  DiskPrecopyPlan(const DiskPlanConfig& config, std::span<const uint64_t> data_blocks);

  const DiskPlanConfig& config() const { return config_; }
  uint64_t blocks() const { return streak_.size(); }
  uint64_t block_length(uint64_t index) const;
  // Applies one harvest (step 1). Indices past the disk are ignored. Returns the bytes of
  // distinct blocks written since the previous harvest.
  uint64_t observe(std::span<const BlockWrites> dirty);
  // Everything the pause would carry now, deferred blocks included.
  uint64_t pending_bytes() const { return pending_bytes_; }
  uint64_t deferred_bytes() const { return deferred_bytes_; }
  bool bulk_done() const { return bulk_left_ == 0; }
  DiskConvergence convergence(double bandwidth, double dirty_rate) const {
    return disk_converged(pending_bytes_, bandwidth, dirty_rate, config_);
  }
  // Steps 2 and 3 for a live round; the returned blocks count as sent. max_round_bytes 0:
  // no limit. bandwidth 0 (not measured yet): nothing is deferred.
  DiskRoundPlan plan_round(double bandwidth, uint64_t max_round_bytes);
  // Step 5: everything pending, deferred included, ascending.
  DiskRoundPlan plan_final();
  uint32_t rounds() const { return round_; }

 private:
  enum : uint8_t { kPending = 1, kDeferred = 2, kBulk = 4 };
  void set_pending(uint64_t index);
  void clear(uint64_t index);

  DiskPlanConfig config_;
  std::vector<uint8_t> state_;     // kPending | kDeferred | kBulk
  std::vector<uint8_t> streak_;    // rounds in a row written (saturating)
  std::vector<uint32_t> writes_;   // since tracking began
  std::vector<uint32_t> last_dirty_;  // round of the last harvest that saw the block written
  uint32_t round_ = 0;             // harvests observed
  uint64_t pending_bytes_ = 0;
  uint64_t deferred_bytes_ = 0;
  uint64_t bulk_left_ = 0;
};

}  // namespace kvmig::helper
