#include "helper/disk_precopy_plan.h"

#include <algorithm>
#include <limits>

namespace kvmig::helper {

bool is_hot_block(uint8_t streak, uint32_t writes, const DiskPlanConfig& config) {
  // Streak catches a block rewritten every round (a journal, a log tail); the write count
  // catches one rewritten in bursts with quiet rounds between (a superblock, an index root).
  return (config.hot_rounds > 0 && streak >= config.hot_rounds) ||
         (config.hot_writes > 0 && writes >= config.hot_writes);
}

DiskConvergence disk_converged(uint64_t pending_bytes, double bandwidth, double dirty_rate,
                               const DiskPlanConfig& config) {
  DiskConvergence c;
  double gap_bytes = std::max(0.0, dirty_rate) * std::max(0.0, config.switch_gap);
  double bytes = static_cast<double>(pending_bytes) + gap_bytes;
  c.pause_bytes = static_cast<uint64_t>(bytes);
  if (bytes == 0) {
    c.expected_pause = 0;
  } else if (bandwidth > 0) {
    c.expected_pause = bytes / bandwidth;
  } else {
    c.expected_pause = std::numeric_limits<double>::infinity();
  }
  c.converged = c.expected_pause <= config.pause_budget;
  return c;
}

DiskPrecopyPlan::DiskPrecopyPlan(const DiskPlanConfig& config, std::span<const uint64_t> data_blocks)
    : config_(config) {
  uint64_t n = config_.block_bytes ? (config_.disk_bytes + config_.block_bytes - 1) / config_.block_bytes : 0;
  state_.assign(n, 0);
  streak_.assign(n, 0);
  writes_.assign(n, 0);
  last_dirty_.assign(n, 0);
  for (uint64_t b : data_blocks) {
    if (b >= n || (state_[b] & kPending)) continue;
    set_pending(b);
    state_[b] |= kBulk;
    ++bulk_left_;
  }
}

uint64_t DiskPrecopyPlan::block_length(uint64_t index) const {
  uint64_t begin = index * config_.block_bytes;
  return std::min(config_.block_bytes, config_.disk_bytes - begin);
}

void DiskPrecopyPlan::set_pending(uint64_t b) {
  if (!(state_[b] & kPending)) {
    state_[b] |= kPending;
    pending_bytes_ += block_length(b);
  }
}

void DiskPrecopyPlan::clear(uint64_t b) {
  if (state_[b] & kPending) pending_bytes_ -= block_length(b);
  if (state_[b] & kDeferred) deferred_bytes_ -= block_length(b);
  if (state_[b] & kBulk) --bulk_left_;
  state_[b] = 0;
}

uint64_t DiskPrecopyPlan::observe(std::span<const BlockWrites> dirty) {
  ++round_;
  uint64_t bytes = 0;
  for (const BlockWrites& d : dirty) {
    if (d.index >= state_.size() || last_dirty_[d.index] == round_) continue;
    uint64_t b = d.index;
    streak_[b] = last_dirty_[b] != 0 && last_dirty_[b] + 1 == round_
                     ? static_cast<uint8_t>(std::min(255, streak_[b] + 1))
                     : 1;
    last_dirty_[b] = round_;
    writes_[b] = std::max(writes_[b], d.writes);
    set_pending(b);
    bytes += block_length(b);
  }
  return bytes;
}

DiskRoundPlan DiskPrecopyPlan::plan_round(double bandwidth, uint64_t max_round_bytes) {
  DiskRoundPlan plan;
  const uint64_t n = state_.size();
  // Hot candidates: written in the latest harvest and hot by streak or count. Deferred blocks
  // the latest harvest did not see have cooled and rejoin the normal rounds.
  std::vector<uint64_t> hot;
  for (uint64_t b = 0; b < n; ++b) {
    if (!(state_[b] & kPending)) continue;
    bool written_now = round_ > 0 && last_dirty_[b] == round_;
    if (written_now && is_hot_block(streak_[b], writes_[b], config_)) {
      hot.push_back(b);
    } else if (state_[b] & kDeferred) {
      state_[b] &= ~kDeferred;
      deferred_bytes_ -= block_length(b);
      ++plan.cooled;
    }
  }
  // Hottest first, up to what the pause can afford; candidates past the cap go out live.
  std::stable_sort(hot.begin(), hot.end(), [&](uint64_t a, uint64_t b) { return writes_[a] > writes_[b]; });
  const double cap = bandwidth > 0 ? config_.defer_share * config_.pause_budget * bandwidth : 0;
  uint64_t kept = 0;
  for (uint64_t b : hot) {
    uint64_t len = block_length(b);
    bool fits = static_cast<double>(kept + len) <= cap;
    bool was = state_[b] & kDeferred;
    if (fits) {
      kept += len;
      if (!was) {
        state_[b] |= kDeferred;
        deferred_bytes_ += len;
        ++plan.newly_deferred;
      }
    } else if (was) {
      state_[b] &= ~kDeferred;
      deferred_bytes_ -= len;
    }
  }
  // Cold (never written since tracking began) first, then the rewritten blocks; ascending
  // within each pass, so reads stay sequential.
  for (int pass = 0; pass < 2; ++pass) {
    for (uint64_t b = 0; b < n; ++b) {
      if ((state_[b] & (kPending | kDeferred)) != kPending) continue;
      if ((writes_[b] == 0) != (pass == 0)) continue;
      uint64_t len = block_length(b);
      if (max_round_bytes && !plan.send.empty() && plan.send_bytes + len > max_round_bytes) {
        pass = 2;
        break;
      }
      plan.send.push_back(b);
      plan.send_bytes += len;
    }
  }
  // A round sends its blocks in ascending order (one sequential sweep of the disk); the
  // cold-first order above decided only which blocks make the cut.
  std::sort(plan.send.begin(), plan.send.end());
  for (uint64_t b : plan.send) clear(b);
  for (uint64_t b = 0; b < n; ++b)
    if (state_[b] & kDeferred) ++plan.deferred_blocks;
  plan.deferred_bytes = deferred_bytes_;
  plan.pending_bytes = pending_bytes_;
  return plan;
}

DiskRoundPlan DiskPrecopyPlan::plan_final() {
  DiskRoundPlan plan;
  for (uint64_t b = 0; b < state_.size(); ++b) {
    if (!(state_[b] & kPending)) continue;
    if (state_[b] & kDeferred) ++plan.deferred_blocks;
    plan.send.push_back(b);
    plan.send_bytes += block_length(b);
  }
  plan.deferred_bytes = deferred_bytes_;
  for (uint64_t b : plan.send) clear(b);
  plan.pending_bytes = pending_bytes_;
  return plan;
}

}  // namespace kvmig::helper
