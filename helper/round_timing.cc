#include "helper/round_timing.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace kvmig::helper {
namespace {

template <typename T>
void push_bounded(std::deque<T>& q, T v, size_t max) {
  q.push_back(v);
  while (q.size() > max) q.pop_front();
}

}  // namespace

void RoundTiming::add_round(uint64_t raw_bytes, double seconds, bool first_touch) {
  if (!(seconds > 0) || !std::isfinite(seconds)) return;  // a clock that did not move says nothing
  RoundSample s{raw_bytes, seconds};
  if (first_touch) first_ = s;
  else push_bounded(rounds_, s, kWindow);
}

void RoundTiming::add_harvest(double seconds) {
  if (seconds >= 0 && std::isfinite(seconds)) push_bounded(harvests_, seconds, kLatencyWindow);
}

RoundTiming::Fit RoundTiming::fit() const {
  std::deque<RoundSample> one;
  const std::deque<RoundSample>* rs = &rounds_;
  if (rounds_.empty()) {
    if (!(first_.seconds > 0)) return {};
    one.push_back(first_);
    rs = &one;
  }
  double s = 0, sx = 0, sxx = 0, st = 0, sxt = 0;
  for (const RoundSample& r : *rs) {
    const double w = 1 / (r.seconds * r.seconds), x = static_cast<double>(r.raw_bytes), t = r.seconds;
    s += w, sx += w * x, sxx += w * x * x, st += w * t, sxt += w * x * t;
  }
  Fit f;
  if (sxx <= 0) return f;  // no bytes in any round: the rounds were all latency, no bandwidth
  // Two parameters need rounds of clearly different sizes; otherwise (or when noise puts the
  // intercept below 0) the line goes through the origin: all of a round's time is bytes.
  const double det = s * sxx - sx * sx;
  if (rs->size() >= 2 && det > 1e-3 * s * sxx) {
    const double c = (s * sxt - sx * st) / det;
    const double l = (sxx * st - sx * sxt) / det;
    if (c > 0 && l >= 0) {
      f.latency = l;
      f.bandwidth = 1 / c;
      f.two_parameters = true;
      return f;
    }
  }
  f.bandwidth = sxt > 0 ? sxx / sxt : 0;
  return f;
}

double RoundTiming::latency() const {
  const Fit f = fit();
  double l = f.latency;
  bool seen = f.two_parameters;
  // Small rounds show the latency; the worst recent one is the latency a loaded host shows now.
  const size_t n = rounds_.size(), from = n > kLatencyWindow ? n - kLatencyWindow : 0;
  for (size_t i = from; i < n; ++i) {
    const RoundSample& r = rounds_[i];
    const double bytes_time = f.bandwidth > 0 ? static_cast<double>(r.raw_bytes) / f.bandwidth : 0;
    if (bytes_time > kSmallRoundSeconds) continue;
    l = std::max(l, r.seconds - bytes_time);
    seen = true;
  }
  return seen ? l : std::max(l, kDefaultLatency);
}

double RoundTiming::harvest() const {
  double h = 0;
  for (double v : harvests_) h = std::max(h, v);
  return h;
}

double RoundTiming::round_seconds(double raw_bytes) const {
  const Fit f = fit();
  if (raw_bytes <= 0) return measured() ? latency() : std::numeric_limits<double>::infinity();
  if (f.bandwidth <= 0) return std::numeric_limits<double>::infinity();
  return latency() + raw_bytes / f.bandwidth;
}

double planned_fixed_seconds(const FixedCost& cost, double max_downtime) {
  const double capped = std::min(cost.measured(), kMaxFixedShare * std::max(0.0, max_downtime));
  return std::max(cost.state_save, capped);
}

double reply_deadline(const RoundTiming& timing, uint64_t raw_bytes) {
  double d = std::max(kMinDeadline, static_cast<double>(raw_bytes) / kSlowestRate);
  const double expected = timing.round_seconds(static_cast<double>(raw_bytes));
  if (std::isfinite(expected)) d = std::max(d, kDeadlineSlack * expected);
  return d;
}

}  // namespace kvmig::helper
