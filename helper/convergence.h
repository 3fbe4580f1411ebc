// "Is it time to stop copying?": one small pure function, decided once per pre-copy round,
// plus the bookkeeping that keeps hot pages (rewritten every round) from being resent every
// round. No VM, no clock, no socket here: the session measures, this decides.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace kvmig::helper {

struct ConvergenceInput {
  uint64_t dirty_bytes = 0;       // still to send if we stopped now, deferred hot pages included
  uint64_t prev_dirty_bytes = 0;  // the same, one round earlier (0: no earlier round)
  double bandwidth = 0;           // uncompressed bytes/s a round's pages move at (0: not measured)
  double dirty_rate = 0;          // bytes/s of distinct pages the guest dirtied last round
  // The switch-over's fixed cost, whatever the pages: state save, pause, harvest, the final
  // ROUND_ACK and COMMIT/DONE round trips (measured: helper/round_timing.h). Over the budget
  // on its own: give up.
  double state_seconds = 0;
  // Seconds from the harvest the decision is made on to the pause. The guest keeps
  // dirtying at dirty_rate (throttled) during them, and those pages join the final round.
  double switch_gap = 0;
  double max_downtime = 0.005;    // seconds the guest may stay paused
  double elapsed = 0;             // seconds since pre-copy began
  double timeout = 0;             // seconds; 0 = no limit
  uint32_t iteration = 0;         // rounds completed
  double throttle = 0;            // stun fraction in force during the last round
  double max_throttle = 0.95;     // never freeze the guest: a frozen guest is a dead service
};

enum class Verdict {
  keep_copying,  // another round
  switch_over,   // pause, send the rest and the state: downtime fits the budget
  throttle,      // another round with vCPUs stunned for `throttle` of their time
  give_up,       // cannot meet the budget: abort, the source keeps running
};
const char* verdict_name(Verdict verdict);

struct ConvergenceDecision {
  Verdict verdict = Verdict::keep_copying;
  double throttle = 0;           // stun fraction for the next round (every verdict)
  double expected_downtime = 0;  // seconds, if we switched over now (infinity: unknown)
  const char* reason = "";
};

// Pre-copy must shrink the backlog by at least this share of the link each round; a guest
// dirtying faster is throttled until it does.
inline constexpr double kShrinkShare = 0.5;
// With less than this fraction of progress between rounds, pre-copy is stuck (typically on
// hot pages) and the throttle is stepped up.
inline constexpr double kStallProgress = 0.1;
inline constexpr double kStallStep = 0.2;

ConvergenceDecision decide_round(const ConvergenceInput& in);

// Per-page streak of consecutive rounds in which the page was dirty (saturating at 255).
// Call once per round with that round's harvested bitmap.
void update_rewrite_history(std::vector<uint8_t>& streak, std::span<const uint64_t> dirty_bits,
                            uint64_t pages);

// Moves pages dirty this round with a streak >= hot_rounds from `send` to `deferred` (they
// go once, at switch-over), up to max_deferred pages in total; moves deferred pages whose
// streak broke (not dirtied this round: their content is stable now) back to `send`.
// Returns the number of deferred pages afterwards.
uint64_t defer_hot_pages(std::span<const uint8_t> streak, std::span<uint64_t> send,
                         std::span<uint64_t> deferred, uint8_t hot_rounds,
                         uint64_t max_deferred);

}  // namespace kvmig::helper
