// The source's switch-over and commit: pause, last harvest plus the deferred hot pages,
// vCPU/device state (and --verify's hash), READY; then COMMIT, DONE, and the release record.
// From the pause on every step is downtime (KVMIG_TRACE_SWITCHOVER=1 prints each one).
#include <cstdio>
#include <cstdlib>

#include "helper/fault_point.h"
#include "helper/migration_source_session.h"
#include "helper/verify_memory.h"

namespace kvmig::helper {

Result<Message> SourceSession::read_control() {
  KVMIG_ASSIGN(Message m, read_message(*conn_.control, version_, WireLimits{}));
  if (m.type() == MsgType::error || m.type() == MsgType::abort) return peer_error(m);
  return m;
}

Result<Message> SourceSession::read_control_within(double seconds, const std::string& what) {
  // Waits for the first byte only: a peer that begins a message sends the rest with it, and
  // a cut link mid-message is the link timeout's.
  KVMIG_ASSIGN(bool readable, wait_readable(*conn_.control, seconds));
  if (!readable) {
    char buf[160];
    snprintf(buf, sizeof buf, "the destination sent no %s within %.1f s (stopped answering)", what.c_str(), seconds);
    return wire_error(WireCode::io, buf);
  }
  return read_control();
}

Result<void> SourceSession::switchover() {
  progress_->phase = kSwitchover;
  sender_->wait_drained(kSourceDrainLimit);
  report_.precopy_ms = ms_between(precopy_start_, Clock::now());
  pause_at_ = Clock::now();
  // Not vm_.paused(): in the middle of a stun that says "paused" although the throttle is
  // about to resume the VM. What counts is whether the VM was paused before we began.
  if (!user_paused_) {
    paused_by_us_ = true;
    KVMIG_TRY(throttle_.stop_paused());
  }
  // The last harvest, while paused: together with what pre-copy sent and the deferred hot
  // pages, this is all of guest memory as it now stands.
  trace_.push_back({"pause", Clock::now()});
  uint64_t pages = 0;
  KVMIG_ASSIGN(std::vector<kvm::DirtyBitmap> send, harvest_counted(pages));
  trace_.push_back({"harvest", Clock::now()});
  for (size_t i = 0; i < send.size(); ++i)
    for (size_t w = 0; w < send[i].bits.size(); ++w) send[i].bits[w] |= deferred_[i].bits[w];
  // Tracking stays on until DONE: switching it off re-registers every memory slot, which
  // costs milliseconds on some hosts (shadow paging), and nothing writes while paused.
  KVMIG_ASSIGN(RoundStats st, send_round({}, send, false));
  trace_.push_back({"final_pages", Clock::now()});
  report_.final_pages = st.pages;
  RoundRecord rec;
  rec.round = round_;
  rec.pages = st.pages;
  rec.zero_pages = st.zero_pages;
  rec.wire_bytes = st.wire_bytes;
  rec.dirty_pages = pages;
  rec.verdict = "final";
  report_.rounds.push_back(rec);
  // The last disk blocks, deferred hot ones included, before the state that will run on them.
  KVMIG_TRY(disk_final());

  auto state_begin = Clock::now();
  KVMIG_ASSIGN(std::vector<kvm::StateSection> sections, snapshot_->save_parts());
  trace_.push_back({"state_save", Clock::now()});
  for (const auto& s : sections) {
    std::vector<uint8_t> payload = encode(s);
    report_.state_bytes += payload.size() + kHeaderSize;
    KVMIG_TRY(send_message(*conn_.control, version_, MsgType::state, payload));
  }
  report_.bytes += report_.state_bytes;
  if (features_ & kFeatureVerify) {
    // Per-piece hashes where the destination takes them: a mismatch then says where.
    const auto& ram = vm_.memory().regions();
    Verify v = (features_ & kFeatureVerifyRanges) ? verify_pieces(ram, verify_piece_bytes(vm_.memory().ram_size()))
                                                  : verify_whole(ram);
    KVMIG_TRY(send_message(*conn_.control, version_, MsgType::verify, encode(v)));
    report_.verified = true;
  }
  report_.state_ms = ms_between(state_begin, Clock::now());
  trace_.push_back({"state_send", Clock::now()});
  // The final round is acknowledged like the others, before READY (which follows STATE).
  if (round_acks_) {
    KVMIG_TRY(await_round_ack());
    trace_.push_back({"final_ack", Clock::now()});
  }
  // READY follows once the destination has loaded the state (and hashed all of memory for
  // --verify): owed is that work, not the link's.
  const uint64_t ready_owes = (features_ & kFeatureVerify) ? vm_.memory().ram_size() : 0;
  KVMIG_ASSIGN(Message ready, read_control_within(reply_deadline(timing_, ready_owes), "READY"));
  trace_.push_back({"ready", Clock::now()});
  if (ready.type() != MsgType::ready)
    return wire_error(WireCode::unexpected, std::string("expected READY, got ") + msg_type_name(ready.type()));
  KVMIG_TRY(decode_empty(ready.payload, MsgType::ready));
  fault_point("source", "ready");  // test hook (helper/fault_point.h)
  report_.switchover_ms = ms_between(pause_at_, Clock::now());
  return ok();
}

Result<void> SourceSession::commit() {
  progress_->phase = kCommit;
  auto begin = Clock::now();
  commit_sent_ = true;  // from here on the VM must not resume on its own, even if the send fails
  KVMIG_TRY(send_message(*conn_.control, version_, MsgType::commit));
  KVMIG_ASSIGN(Message done, read_control());
  if (done.type() != MsgType::done)
    return wire_error(WireCode::unexpected, std::string("expected DONE, got ") + msg_type_name(done.type()));
  KVMIG_TRY(decode_empty(done.payload, MsgType::done));
  auto now = Clock::now();
  report_.commit_ms = ms_between(begin, now);
  // Pause to DONE: an upper bound of pause -> destination's first vCPU run, by the one-way
  // latency of DONE (tens of microseconds on one host); the same method between hosts. The
  // destination logs its resume time (CLOCK_MONOTONIC) for an exact figure on one host.
  report_.downtime_ms = ms_between(pause_at_, now);
  // Out of the downtime window; this copy never runs again, so a failure here is moot.
  (void)tracker_->stop_tracking();
  disks_stop();
  trace_.push_back({"done", now});
  if (getenv("KVMIG_TRACE_SWITCHOVER")) {
    std::string line = "switchover:";
    Clock::time_point prev = pause_at_;
    for (const auto& [what, t] : trace_) {
      char buf[64];
      snprintf(buf, sizeof buf, " %s=%.3f", what, ms_between(prev, t));
      line += buf;
      prev = t;
    }
    fprintf(stderr, "%s final_pages=%llu\n", line.c_str(), static_cast<unsigned long long>(report_.final_pages));
  }
  if (opt_.events) {
    // The VM runs at the destination now; this copy stays paused for good either way.
    auto r = opt_.events->on_released(vm_id_);
    if (!r.ok()) report_.error = "recording the release failed: " + r.error().message;
  }
  return ok();
}

}  // namespace kvmig::helper
