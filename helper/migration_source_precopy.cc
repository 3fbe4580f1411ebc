// The source's pre-copy phase: harvest the write traces, ask the convergence function whether
// to go on, defer pages rewritten every round, send the rest while the guest runs.
#include <algorithm>
#include <cmath>

#include "helper/convergence.h"
#include "helper/fault_point.h"
#include "helper/migration_source_session.h"
#include "helper/round_timing.h"

namespace kvmig::helper {
namespace {

// From the harvest a switch-over is decided on to the pause: the throttle thread stopped
// and the vCPUs kicked out of KVM_RUN. Pages the guest dirties meanwhile are paid in downtime.
constexpr double kSwitchGapSeconds = 0.0005;
// At most this share of guest RAM is deferred as hot: the rest must converge normally.
constexpr uint64_t kMaxDeferredDivisor = 4;

}  // namespace

Result<std::vector<kvm::DirtyBitmap>> SourceSession::harvest_counted(uint64_t& pages) {
  KVMIG_ASSIGN(std::vector<kvm::DirtyBitmap> dirty, tracker_->harvest());
  if (dirty.size() != deferred_.size()) return Error{"harvest: slot count changed"};
  pages = 0;
  for (const auto& b : dirty) pages += count_bits(b.bits);
  return dirty;
}

Result<RoundStats> SourceSession::send_round(std::span<const kvm::DirtyBitmap> rearm,
                                       std::span<const kvm::DirtyBitmap> send, bool live) {
  ++round_;
  KVMIG_ASSIGN(RoundStats st, sender_->send_round(round_, live ? tracker_.get() : nullptr, rearm, send,
                                                  /*fresh_destination=*/round_ == 1));
  RoundEnd end;
  end.round = round_;
  end.pages = st.pages - sender_->skipped_zero_pages();  // what the data streams carried
  end.zero_pages = st.zero_pages - sender_->skipped_zero_pages();
  end.wire_bytes = st.wire_bytes;
  KVMIG_TRY(send_message(*conn_.control, version_, MsgType::round_end, encode(end)));
  sent_ = RoundAck{round_, end.pages, st.wire_bytes};
  sent_raw_ = st.raw_bytes;
  add_stats(st);
  progress_->iteration.store(round_);
  if (live && round_ == 1) fault_point("source", "precopy");  // test hook (helper/fault_point.h)
  return st;
}

Result<void> SourceSession::await_round_ack() {
  KVMIG_ASSIGN(Message m, read_control_within(reply_deadline(timing_, sent_raw_),
                                              "ROUND_ACK of round " + std::to_string(sent_.round)));
  if (m.type() != MsgType::round_ack)
    return wire_error(WireCode::unexpected, "expected ROUND_ACK of round " + std::to_string(sent_.round) +
                                                ", got " + msg_type_name(m.type()));
  KVMIG_ASSIGN(RoundAck ack, decode_round_ack(m.payload));
  return check_round_ack(ack, sent_.round, sent_.pages, sent_.bytes);
}

Result<void> SourceSession::precopy() {
  progress_->phase = kPrecopy;
  precopy_start_ = Clock::now();
  uint64_t prev_dirty_bytes = 0;
  Clock::time_point last_harvest = Clock::now();
  const uint64_t max_deferred = vm_.memory().ram_size() / kPageSize / kMaxDeferredDivisor;
  for (;;) {
    uint64_t dirty_pages = 0;
    auto harvest_begin = Clock::now();
    KVMIG_ASSIGN(std::vector<kvm::DirtyBitmap> dirty, harvest_counted(dirty_pages));
    auto now = Clock::now();
    // Not the first harvest: it reports (and re-protects) all of memory, the paused one only
    // what the last round left dirty, as the later ones do.
    if (round_ > 0) timing_.add_harvest(std::chrono::duration<double>(now - harvest_begin).count());
    double since = std::chrono::duration<double>(now - last_harvest).count();
    last_harvest = now;
    uint64_t deferred_pages = 0;
    for (const auto& d : deferred_) deferred_pages += count_bits(d.bits);
    double dirty_rate = round_ > 0 && since > 0 ? dirty_pages * kPageSize / since : 0;
    uint64_t dirty_bytes = (dirty_pages + deferred_pages) * kPageSize;

    // The switch-over's fixed cost and the final round's throughput, as this link and host
    // show them now (helper/round_timing.h): a constant here was right on an idle host and
    // far too low on a loaded one, where a higher bandwidth (compressed rounds) then chose a
    // final round the budget had no room for.
    const FixedCost fixed{timing_.latency(), timing_.harvest(), state_save_seconds_, pause_seconds_};
    ConvergenceInput in;
    in.dirty_bytes = dirty_bytes;
    in.prev_dirty_bytes = prev_dirty_bytes;
    in.bandwidth = timing_.bandwidth();
    in.dirty_rate = dirty_rate;
    in.state_seconds = planned_fixed_seconds(fixed, opt_.max_downtime);
    in.switch_gap = kSwitchGapSeconds;
    in.max_downtime = opt_.max_downtime;
    in.elapsed = std::chrono::duration<double>(now - precopy_start_).count();
    in.timeout = opt_.timeout;
    in.iteration = round_;
    in.throttle = throttle_.fraction();
    in.max_throttle = VcpuThrottle::kMaxFraction;
    ConvergenceDecision d = decide_round(in);
    // The disks have their own budget: memory fitting its own is not enough while the disks
    // still owe more than theirs (docs/disk-migration.md, step 4).
    const bool disks_owe = !disks_converged();
    if (disks_owe && d.verdict == Verdict::switch_over) {
      d.verdict = Verdict::keep_copying;
      d.reason = "memory fits, the disks do not yet";
    }
    // While the disks owe more than their budget, the rounds go on for them, a few ms apart:
    // memory not shrinking between such rounds says nothing about memory, and a stepped-up
    // vCPU throttle would slow the guest (its disk writes too) without shortening the disk
    // copy. The throttle is held until the disks fit; memory's rule applies from then on.
    if (disks_owe && d.verdict == Verdict::throttle && d.throttle > throttle_.fraction()) {
      d.verdict = Verdict::keep_copying;
      d.throttle = throttle_.fraction();
      d.reason = "memory does not converge yet; throttle held while the disks copy";
    }
    prev_dirty_bytes = dirty_bytes;
    if (round_ > 0) report_.dirty_rate = dirty_rate;
    progress_->remaining.store(dirty_bytes);
    progress_->dirty_rate.store(static_cast<uint64_t>(dirty_rate));
    progress_->expected_downtime_us.store(
        std::isfinite(d.expected_downtime) ? static_cast<uint64_t>(d.expected_downtime * 1e6) : 0);
    if (!report_.rounds.empty()) report_.rounds.back().verdict = verdict_name(d.verdict);
    if (d.verdict == Verdict::give_up) return wire_error(WireCode::aborted, std::string("gave up: ") + d.reason);
    // What was just harvested stays in the tracker (nothing rearmed it): the paused
    // harvest of the switch-over sees it again.
    if (d.verdict == Verdict::switch_over) {
      // The estimate next to the actual downtime in the report, to keep the model honest.
      report_.fixed_ms_measured = fixed.measured() * 1000;
      report_.fixed_ms_estimate = in.state_seconds * 1000;
      report_.latency_ms_estimate = fixed.latency * 1000;
      report_.harvest_ms_estimate = fixed.harvest * 1000;
      report_.pause_ms_assumed = fixed.pause * 1000;
      report_.resume_ms_assumed = fixed.resume * 1000;
      report_.state_save_ms_measured = fixed.state_save * 1000;
      report_.bandwidth_mbps_estimate = in.bandwidth / 1e6;
      report_.expected_downtime_ms = d.expected_downtime * 1000;
      return ok();
    }
    // A VM its operator paused stays paused: nothing to throttle.
    if (!user_paused_) throttle_.set(d.throttle);
    report_.max_throttle = std::max(report_.max_throttle, d.throttle);
    progress_->throttle_pct.store(static_cast<uint64_t>(d.throttle * 100));

    // Hot pages (dirty hot_rounds rounds in a row) wait for the switch-over instead of
    // going out every round; a deferred page left clean this round goes out now.
    std::vector<kvm::DirtyBitmap> send = dirty;
    for (size_t i = 0; i < dirty.size(); ++i) {
      update_rewrite_history(streak_[i], dirty[i].bits, dirty[i].pages);
      if (round_ > 0)
        defer_hot_pages(streak_[i], send[i].bits, deferred_[i].bits, opt_.hot_rounds, max_deferred);
    }
    auto begin = Clock::now();
    KVMIG_ASSIGN(RoundStats st, send_round(dirty, send, true));
    // The round has moved when the destination has applied it (ROUND_ACK): a round that
    // fits in the socket buffers (compressed rounds do) is "sent" long before, and timing it
    // to that would take the destination's backlog for bandwidth, switch over too early and
    // pay the backlog in downtime. It also means the next decision is never made while the
    // destination still owes a round. An older destination: the drained send queues.
    if (round_acks_) {
      KVMIG_TRY(await_round_ack());
    } else {
      sender_->wait_drained(kSourceDrainLimit);
    }
    double secs = std::chrono::duration<double>(Clock::now() - begin).count();
    // In uncompressed bytes, as the dirty bytes it is divided into are: a compressed round
    // carries far more pages per wire byte. Round 1 fills a fresh destination, whose first
    // touch of each page later rounds never pay again.
    timing_.add_round(st.raw_bytes, secs, /*first_touch=*/round_ == 1);
    RoundRecord rec;
    rec.round = round_;
    rec.pages = st.pages;
    rec.zero_pages = st.zero_pages;
    rec.wire_bytes = st.wire_bytes;
    rec.dirty_pages = dirty_pages;
    for (const auto& dd : deferred_) rec.deferred_pages += count_bits(dd.bits);
    rec.ms = secs * 1000;
    rec.throttle = throttle_.fraction();
    report_.rounds.push_back(rec);
    // A disk round after each memory round, outside its timing: memory bandwidth stays memory's.
    KVMIG_TRY(disk_round());
  }
}

}  // namespace kvmig::helper
