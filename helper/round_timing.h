// What the rounds of one migration tell about the link and the destination, for the
// convergence rule and the source's deadlines: pure bookkeeping, no clock, no socket (the
// session measures, this fits).
//
// A round's time, harvest excluded, from its first page to its ROUND_ACK, is modelled as
//     seconds = latency + raw_bytes / bandwidth
// latency: what a round costs whatever its size (ROUND_END on every stream, the
// destination's barrier, ROUND_ACK back, thread wake-ups on both sides), bandwidth: what the
// whole pipeline sustains in uncompressed bytes. A single bytes/seconds figure takes a
// round of 3542 pages in 8.2 ms (mostly latency) for a slow link, and a 1 GiB round for a
// fast one with no latency at all; the final, paused round is small, so it is latency that
// decides its time. The fixed part of the switch-over (final ROUND_ACK, READY, COMMIT, DONE)
// is made of the same round trips, so the latency measured here prices it too.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>

namespace kvmig::helper {

struct RoundSample {
  uint64_t raw_bytes = 0;  // uncompressed page bytes the round carried
  double seconds = 0;      // first page sent to ROUND_ACK read
};

class RoundTiming {
 public:
  // Rounds the fit looks at: enough to span a few sizes, few enough to follow the load.
  static constexpr size_t kWindow = 6;
  // Rounds whose residual (seconds not explained by bandwidth) counts for the latency: the
  // conservative figure is the worst of these, so a loaded host is not priced as idle.
  static constexpr size_t kLatencyWindow = 4;
  // Only rounds whose bytes take at most this long at the fitted bandwidth, i.e. the size of
  // a final round under a budget of a few ms: a big round slower than the fit is throughput
  // noise (the guest and the sender share CPUs), not a cost every round pays.
  static constexpr double kSmallRoundSeconds = 0.01;
  // Latency assumed until a fit or a small round shows it.
  static constexpr double kDefaultLatency = 0.0005;

  // `first_touch`: the round that first writes pages at a fresh destination (round 1): its
  // time is dominated by the destination faulting memory in, which later rounds never pay;
  // it is used only while it is the only round seen.
  void add_round(uint64_t raw_bytes, double seconds, bool first_touch);
  // A harvest of the dirty log; the paused switch-over does one more of the same size.
  void add_harvest(double seconds);

  bool measured() const { return !rounds_.empty() || first_.seconds > 0; }
  // Uncompressed bytes/s (0: no round yet).
  double bandwidth() const { return fit().bandwidth; }
  // Seconds a round costs whatever its size: the fitted latency, raised to the worst
  // residual of the small rounds (kSmallRoundSeconds) among the last kLatencyWindow.
  double latency() const;
  // Slowest of the last kLatencyWindow harvests (0: none yet).
  double harvest() const;
  // Expected seconds of a round carrying `raw_bytes` (infinity: nothing measured).
  double round_seconds(double raw_bytes) const;

  struct Fit {
    double latency = 0;
    double bandwidth = 0;
    bool two_parameters = false;  // latency fitted, not assumed 0
  };
  // Weighted least squares of seconds = latency + raw_bytes / bandwidth over the window,
  // each round weighted by 1/seconds^2 (relative error: a 1 GiB round does not drown the
  // small ones that show the latency). A fit with negative latency, or from rounds all of
  // one size, falls back to a line through the origin.
  Fit fit() const;

 private:
  std::deque<RoundSample> rounds_;  // the newest last
  std::deque<double> harvests_;
  RoundSample first_;
};

// The fixed part of the downtime: everything that does not grow with the final round's
// bytes. `latency` per round trip (RoundTiming::latency): one for the final round's
// ROUND_ACK, one for COMMIT -> DONE (READY follows the final ROUND_ACK once the state is
// loaded); plus a harvest, the measured state save, and `pause` for stopping the vCPUs
// (assumed).
// `resume`: the destination's part of COMMIT -> DONE beyond the round trip (completion
// record, vCPU threads started), which the source cannot time before it happens; assumed
// (kResumeSeconds). At load 10 COMMIT -> DONE took a median 0.6-2.7 ms while a pre-copy
// round trip fitted to ~0.
inline constexpr double kResumeSeconds = 0.001;
struct FixedCost {
  double latency = 0;
  double harvest = 0;
  double state_save = 0;
  double pause = 0;
  double resume = kResumeSeconds;
  double measured() const { return 2 * latency + harvest + state_save + pause + resume; }
};

// What convergence plans with: the measured fixed cost, capped at kMaxFixedShare of the
// budget (past that point waiting does not lower it, and refusing to switch over would trade
// a few ms of downtime for a failed migration: the pages then get the rest of the budget),
// and never below the state save, the one part no load explains away (a budget smaller than
// it still gives up).
inline constexpr double kMaxFixedShare = 0.6;
double planned_fixed_seconds(const FixedCost& cost, double max_downtime);

// How long the source waits for the ROUND_ACK of a round of `raw_bytes` once it is sent, or
// for READY (raw_bytes: what the destination still has to do, e.g. hash for --verify):
// kMinDeadline, or kDeadlineSlack times the round's expected time, or the bytes at
// kSlowestRate (the destination's first touch of memory, ~4 s/GiB on a slow host, with 4x
// headroom), whichever is longest. Silence past it means a destination that stopped
// answering but keeps its sockets open, which the link timeout does not see.
inline constexpr double kMinDeadline = 2.0;
inline constexpr double kDeadlineSlack = 4.0;
inline constexpr double kSlowestRate = 64.0 * (1 << 20);
double reply_deadline(const RoundTiming& timing, uint64_t raw_bytes);

}  // namespace kvmig::helper
