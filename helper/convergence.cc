#include "helper/convergence.h"

#include <algorithm>
#include <limits>

namespace kvmig::helper {

const char* verdict_name(Verdict verdict) {
  switch (verdict) {
    case Verdict::keep_copying: return "keep_copying";
    case Verdict::switch_over: return "switch_over";
    case Verdict::throttle: return "throttle";
    case Verdict::give_up: return "give_up";
  }
  return "unknown";
}

ConvergenceDecision decide_round(const ConvergenceInput& in) {
  ConvergenceDecision d;
  const double cap = std::clamp(in.max_throttle, 0.0, 0.99);
  const double current = std::clamp(in.throttle, 0.0, cap);
  d.throttle = current;
  d.expected_downtime = std::numeric_limits<double>::infinity();
  // The final round: what is dirty now, plus what the guest dirties until it is paused.
  const double final_bytes =
      static_cast<double>(in.dirty_bytes) + std::max(0.0, in.dirty_rate) * std::max(0.0, in.switch_gap);
  if (final_bytes == 0) {
    d.expected_downtime = in.state_seconds;
  } else if (in.bandwidth > 0) {
    d.expected_downtime = final_bytes / in.bandwidth + in.state_seconds;
  }

  if (in.timeout > 0 && in.elapsed >= in.timeout) {
    d.verdict = Verdict::give_up;
    d.reason = "timeout before memory converged";
    return d;
  }
  // No amount of copying or throttling shortens the fixed part of the switch-over.
  if (in.state_seconds > in.max_downtime) {
    d.verdict = Verdict::give_up;
    d.reason = "the switch-over's fixed cost alone exceeds the max downtime";
    return d;
  }
  if (d.expected_downtime <= in.max_downtime) {
    d.verdict = Verdict::switch_over;
    d.reason = "remaining dirty memory fits the downtime budget";
    return d;
  }
  if (in.bandwidth <= 0) {
    d.verdict = Verdict::keep_copying;
    d.reason = "bandwidth not measured yet";
    return d;
  }

  // The guest's own rate, as if unthrottled: the measured rate is already slowed by `current`.
  const double raw_rate = in.dirty_rate / (1.0 - current);
  if (raw_rate > kShrinkShare * in.bandwidth) {
    // Stun in proportion, so that (1 - s) * raw_rate is the share of the link we can afford.
    double s = std::min(cap, 1.0 - kShrinkShare * in.bandwidth / raw_rate);
    d.verdict = Verdict::throttle;
    d.throttle = s;
    d.reason = "guest dirties faster than the link drains: throttling in proportion";
    return d;
  }
  const bool stalled = in.iteration >= 2 && in.prev_dirty_bytes > 0 &&
                       static_cast<double>(in.dirty_bytes) >
                           (1.0 - kStallProgress) * static_cast<double>(in.prev_dirty_bytes);
  if (stalled && current < cap) {
    d.verdict = Verdict::throttle;
    d.throttle = std::min(cap, current + kStallStep);
    d.reason = "no progress between rounds (hot pages): stepping the throttle up";
    return d;
  }
  d.verdict = Verdict::keep_copying;
  // Keep an earlier throttle: releasing it now would give back the progress it bought.
  d.reason = stalled ? "no progress, throttle at its cap: waiting for the timeout"
                     : "converging";
  return d;
}

void update_rewrite_history(std::vector<uint8_t>& streak, std::span<const uint64_t> dirty_bits,
                            uint64_t pages) {
  streak.resize(pages, 0);
  for (uint64_t p = 0; p < pages; ++p) {
    bool dirty = p / 64 < dirty_bits.size() && ((dirty_bits[p / 64] >> (p % 64)) & 1);
    streak[p] = dirty ? static_cast<uint8_t>(std::min(255, streak[p] + 1)) : 0;
  }
}

uint64_t defer_hot_pages(std::span<const uint8_t> streak, std::span<uint64_t> send,
                         std::span<uint64_t> deferred, uint8_t hot_rounds,
                         uint64_t max_deferred) {
  const uint64_t words = std::min(send.size(), deferred.size());
  const uint64_t pages = std::min<uint64_t>(streak.size(), words * 64);
  uint64_t count = 0;
  // Cooled pages first, so their slots count as free for newly hot pages.
  for (uint64_t p = 0; p < pages; ++p) {
    uint64_t bit = uint64_t{1} << (p % 64);
    if (!(deferred[p / 64] & bit)) continue;
    if (streak[p] == 0) {
      deferred[p / 64] &= ~bit;
      send[p / 64] |= bit;
    } else {
      ++count;
    }
  }
  if (hot_rounds == 0) hot_rounds = 1;
  for (uint64_t p = 0; p < pages; ++p) {
    uint64_t bit = uint64_t{1} << (p % 64);
    if (!(send[p / 64] & bit)) continue;
    if (streak[p] >= hot_rounds && !(deferred[p / 64] & bit) && count < max_deferred) {
      send[p / 64] &= ~bit;
      deferred[p / 64] |= bit;
      ++count;
    } else if (deferred[p / 64] & bit) {
      send[p / 64] &= ~bit;  // still hot and already deferred: do not send it this round
    }
  }
  return count;
}

}  // namespace kvmig::helper
