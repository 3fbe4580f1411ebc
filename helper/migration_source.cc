#include "helper/migration_source.h"

#include <linux/kvm.h>
#include <poll.h>
#include <sys/resource.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <memory>
#include <random>

#include "helper/convergence.h"
#include "helper/messages.h"
#include "helper/page_sender.h"
#include "helper/vcpu_throttle.h"
#include "kvm/dirty_tracker.h"
#include "kvm/machine_snapshot.h"

namespace kvmig::helper {
namespace {

// The fixed part of the downtime, whatever the pages: saving the vCPU/device state (0.1 ms),
// sending it, restoring it, and the READY / COMMIT / DONE round trips and resume. Measured
// ~0.6 ms in total on one idle host (KVMIG_TRACE_SWITCHOVER=1 prints each step).
constexpr double kStateSeconds = 0.001;
// From the harvest a switch-over is decided on to the pause: the throttle thread stopped
// and the vCPUs kicked out of KVM_RUN. Pages the guest dirties meanwhile are paid in downtime.
constexpr double kSwitchGapSeconds = 0.0005;
// At most this share of guest RAM is deferred as hot: the rest must converge normally.
constexpr uint64_t kMaxDeferredDivisor = 4;
// How long a round waits for the destination to take in what was sent.
constexpr std::chrono::milliseconds kDrainLimit{10000};

std::string random_id() {
  std::random_device rd;
  char buf[40];
  snprintf(buf, sizeof buf, "mig-%08x%08x", rd(), rd());
  return buf;
}

// Raises this thread's CPU priority for the switch-over (ms), as far as allowed: on a busy
// host every wake-up of the session thread (the drained socket, READY, DONE) can otherwise
// wait a scheduler slice behind other work, and the guest is paused all that time. Without
// CAP_SYS_NICE nothing changes. Restored on destruction.
class SwitchoverPriority {
 public:
  SwitchoverPriority() : tid_(static_cast<id_t>(::gettid())) {
    errno = 0;
    int old = ::getpriority(PRIO_PROCESS, tid_);
    if (errno == 0 && ::setpriority(PRIO_PROCESS, tid_, kNice) == 0) old_ = old;
  }
  ~SwitchoverPriority() {
    if (old_) (void)::setpriority(PRIO_PROCESS, tid_, *old_);
  }
  SwitchoverPriority(const SwitchoverPriority&) = delete;
  SwitchoverPriority& operator=(const SwitchoverPriority&) = delete;
  static constexpr int kNice = -10;

 private:
  id_t tid_;
  std::optional<int> old_;
};

uint64_t memory_hash(const kvm::GuestMemory& memory) {
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  for (const auto& r : memory.regions()) XXH3_64bits_update(st, r.host, r.size);
  uint64_t h = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  return h;
}

class Session {
 public:
  Session(kvm::Machine& vm, const SourceOptions& opt, MigrationProgress* progress)
      : vm_(vm), opt_(opt), progress_(progress ? progress : &own_progress_), throttle_(vm) {}

  MigrationReport run();

 private:
  Result<void> setup();
  Result<void> precopy();
  Result<void> switchover();
  Result<void> commit();
  Result<std::vector<kvm::DirtyBitmap>> harvest_counted(uint64_t& pages);
  Result<RoundStats> send_round(std::span<const kvm::DirtyBitmap> rearm,
                                std::span<const kvm::DirtyBitmap> send, bool live);
  Result<Message> read_control();
  void fail_before_commit(const Error& error);
  void add_stats(const RoundStats& st) {
    report_.bytes += st.wire_bytes;
    report_.pages += st.pages;
    report_.zero_pages += st.zero_pages;
    progress_->transferred.store(report_.bytes);
  }

  kvm::Machine& vm_;
  SourceOptions opt_;
  MigrationProgress own_progress_;
  MigrationProgress* progress_;
  VcpuThrottle throttle_;
  MigrationReport report_;
  Connection conn_;
  uint16_t version_ = kWireVersion;
  uint64_t features_ = 0;
  std::unique_ptr<kvm::DirtyTracker> tracker_;
  std::optional<kvm::MachineSnapshot> snapshot_;
  std::unique_ptr<PageSender> sender_;
  std::vector<kvm::DirtyBitmap> deferred_;     // hot pages owed at the switch-over
  std::vector<std::vector<uint8_t>> streak_;  // per slot, per page
  uint32_t round_ = 0;
  SessionVm vm_id_;
  bool user_paused_ = false;  // paused by its operator before the migration began
  bool paused_by_us_ = false;
  bool commit_sent_ = false;
  Clock::time_point start_ = Clock::now(), precopy_start_, pause_at_;
  std::vector<std::pair<const char*, Clock::time_point>> trace_;  // switch-over steps
};

Result<Message> Session::read_control() {
  KVMIG_ASSIGN(Message m, read_message(*conn_.control, version_, WireLimits{}));
  if (m.type() == MsgType::error || m.type() == MsgType::abort) return peer_error(m);
  return m;
}

Result<void> Session::setup() {
  progress_->phase = kSetup;
  user_paused_ = vm_.paused();
  TransportOptions topt;
  topt.streams = opt_.streams;
  auto conn = connect(opt_.to, topt);
  if (!conn.ok()) return std::move(conn.error().prefix("connect to destination"));
  conn_ = std::move(*conn);

  Hello hello;
  hello.migration_id = opt_.migration_id.empty() ? random_id() : opt_.migration_id;
  hello.vm_uuid = opt_.vm_uuid;
  if (hello.vm_uuid == std::array<uint8_t, 16>{}) {
    std::random_device rd;
    for (auto& b : hello.vm_uuid) b = static_cast<uint8_t>(rd());
  }
  vm_id_.migration_id = hello.migration_id;
  vm_id_.uuid = hello.vm_uuid;
  hello.vcpus = static_cast<uint32_t>(vm_.vcpus().size());
  for (const auto& r : vm_.memory().regions()) hello.memory.ranges.push_back({r.gpa, r.size});
  hello.dirty_ring_entries = vm_.config().dirty_ring_entries;
  hello.hugepages = vm_.config().hugepages;
  hello.streams = static_cast<uint32_t>(opt_.streams);
  hello.features = (opt_.compress ? kFeatureCompression : 0) | (opt_.verify ? kFeatureVerify : 0);
  KVMIG_TRY(send_message(*conn_.control, kWireVersion, MsgType::hello, encode(hello)));
  // The answer's version is the agreed one; accept any a peer may speak for this first reply.
  KVMIG_ASSIGN(Message ack_msg, read_message(*conn_.control, 0, WireLimits{}));
  if (ack_msg.type() == MsgType::error || ack_msg.type() == MsgType::abort) return peer_error(ack_msg);
  if (ack_msg.type() != MsgType::hello_ack)
    return wire_error(WireCode::unexpected, std::string("expected HELLO_ACK, got ") + msg_type_name(ack_msg.type()));
  KVMIG_ASSIGN(HelloAck ack, decode_hello_ack(ack_msg.payload));
  KVMIG_ASSIGN(version_, agree_version(ack.version));
  if (ack.version != ack_msg.header.version)
    return wire_error(WireCode::bad_version, "HELLO_ACK agrees on a version its own header does not carry");
  if (ack.features & ~hello.features)
    return wire_error(WireCode::malformed, "HELLO_ACK accepts features that were not offered");
  features_ = ack.features;
  if (opt_.verify && !(features_ & kFeatureVerify))
    return wire_error(WireCode::config_mismatch, "destination cannot --verify");
  report_.compress = features_ & kFeatureCompression;

  // The first snapshot in a process probes the MSR list on vCPU 0, which takes the vCPU's
  // lock, held by a vCPU in KVM_RUN until its next exit (seconds for a guest that rarely
  // exits): pause for that one probe only. Once probed, no vCPU is touched here.
  {
    const bool pause = !user_paused_ && !kvm::MachineSnapshot::probed(vm_);
    if (pause) KVMIG_TRY(vm_.pause());
    auto snap = kvm::MachineSnapshot::of(vm_);
    if (pause) KVMIG_TRY(vm_.resume());
    if (!snap.ok()) return std::move(snap.error());
    snapshot_.emplace(std::move(*snap));
  }

  kvm::DirtyTracker::Config tc;
  tc.granularity = opt_.granularity;
  for (const auto& r : vm_.memory().regions())
    tc.slots.push_back({r.slot, r.gpa, r.size, r.host,
                        vm_.memory().slot_flags(r.slot) & ~uint32_t{KVM_MEM_LOG_DIRTY_PAGES}});
  kvm::DirtyRingLog* ring = nullptr;
  if (opt_.ring) {
    ring = vm_.dirty_ring();
    if (!ring)
      return Error{"--dirty-tracking=ring: this VM has no dirty ring (start it with --dirty-ring N)"};
  }
  KVMIG_ASSIGN(tracker_, kvm::DirtyTracker::create(vm_.vm_fd(), tc, ring, nullptr));
  report_.mode = tracker_->mode_name();
  report_.granularity = opt_.granularity;
  report_.streams = opt_.streams;
  KVMIG_TRY(tracker_->start_tracking());
  sender_ = std::make_unique<PageSender>(
      conn_, version_, [this](uint64_t gpa, uint64_t len) { return vm_.memory().host_ptr(gpa, len); },
      report_.compress);
  for (const auto& r : vm_.memory().regions()) {
    uint64_t pages = r.size / kPageSize;
    deferred_.push_back({r.slot, r.gpa, pages, std::vector<uint64_t>((pages + 63) / 64)});
    streak_.emplace_back(pages, 0);
  }
  report_.setup_ms = ms_between(start_, Clock::now());
  return ok();
}

Result<std::vector<kvm::DirtyBitmap>> Session::harvest_counted(uint64_t& pages) {
  KVMIG_ASSIGN(std::vector<kvm::DirtyBitmap> dirty, tracker_->harvest());
  if (dirty.size() != deferred_.size()) return Error{"harvest: slot count changed"};
  pages = 0;
  for (const auto& b : dirty) pages += count_bits(b.bits);
  return dirty;
}

Result<RoundStats> Session::send_round(std::span<const kvm::DirtyBitmap> rearm,
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
  add_stats(st);
  progress_->iteration.store(round_);
  return st;
}

Result<void> Session::precopy() {
  progress_->phase = kPrecopy;
  precopy_start_ = Clock::now();
  uint64_t prev_dirty_bytes = 0;
  double bandwidth = 0;
  Clock::time_point last_harvest = Clock::now();
  const uint64_t max_deferred = vm_.memory().ram_size() / kPageSize / kMaxDeferredDivisor;
  for (;;) {
    uint64_t dirty_pages = 0;
    KVMIG_ASSIGN(std::vector<kvm::DirtyBitmap> dirty, harvest_counted(dirty_pages));
    auto now = Clock::now();
    double since = std::chrono::duration<double>(now - last_harvest).count();
    last_harvest = now;
    uint64_t deferred_pages = 0;
    for (const auto& d : deferred_) deferred_pages += count_bits(d.bits);
    double dirty_rate = round_ > 0 && since > 0 ? dirty_pages * kPageSize / since : 0;
    uint64_t dirty_bytes = (dirty_pages + deferred_pages) * kPageSize;

    ConvergenceInput in;
    in.dirty_bytes = dirty_bytes;
    in.prev_dirty_bytes = prev_dirty_bytes;
    in.bandwidth = bandwidth;
    in.dirty_rate = dirty_rate;
    in.state_seconds = kStateSeconds;
    in.switch_gap = kSwitchGapSeconds;
    in.max_downtime = opt_.max_downtime;
    in.elapsed = std::chrono::duration<double>(now - precopy_start_).count();
    in.timeout = opt_.timeout;
    in.iteration = round_;
    in.throttle = throttle_.fraction();
    in.max_throttle = VcpuThrottle::kMaxFraction;
    ConvergenceDecision d = decide_round(in);
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
    if (d.verdict == Verdict::switch_over) return ok();
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
    sender_->wait_drained(kDrainLimit);
    double secs = std::chrono::duration<double>(Clock::now() - begin).count();
    // Bandwidth from rounds big enough to measure it; tiny rounds are mostly latency.
    if (st.wire_bytes >= (1u << 20) || bandwidth == 0) bandwidth = secs > 0 ? st.wire_bytes / secs : 0;
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
  }
}

Result<void> Session::switchover() {
  progress_->phase = kSwitchover;
  sender_->wait_drained(kDrainLimit);
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
    Verify v{memory_hash(vm_.memory()), vm_.memory().ram_size()};
    KVMIG_TRY(send_message(*conn_.control, version_, MsgType::verify, encode(v)));
    report_.verified = true;
  }
  report_.state_ms = ms_between(state_begin, Clock::now());
  trace_.push_back({"state_send", Clock::now()});
  KVMIG_ASSIGN(Message ready, read_control());
  trace_.push_back({"ready", Clock::now()});
  if (ready.type() != MsgType::ready)
    return wire_error(WireCode::unexpected, std::string("expected READY, got ") + msg_type_name(ready.type()));
  KVMIG_TRY(decode_empty(ready.payload, MsgType::ready));
  report_.switchover_ms = ms_between(pause_at_, Clock::now());
  return ok();
}

Result<void> Session::commit() {
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

void Session::fail_before_commit(const Error& error) {
  (void)throttle_.stop();
  if (tracker_) (void)tracker_->stop_tracking();
  if (conn_.control) {
    // Best effort: tell the destination why, so it discards with a reason, not a broken pipe.
    WireCode code = wire_code_of(error);
    ErrorMsg m{code == WireCode::none ? WireCode::internal : code, error.message.substr(0, kMaxErrorText)};
    (void)send_message(*conn_.control, version_,
                       code == WireCode::aborted ? MsgType::abort : MsgType::error, encode(m));
    conn_.control->shutdown();
    for (auto& d : conn_.data) d->shutdown();
  }
  if (paused_by_us_) {
    auto r = vm_.resume();
    if (!r.ok()) report_.error += "; resuming the VM failed: " + r.error().message;
    paused_by_us_ = false;
  }
}

MigrationReport Session::run() {
  Result<void> r = setup();
  if (r.ok()) r = precopy();
  {
    SwitchoverPriority priority;
    if (r.ok()) r = switchover();
    if (r.ok()) r = commit();
  }
  report_.iterations = round_;
  double wire_ms = report_.precopy_ms + report_.switchover_ms;
  report_.bandwidth_mbps = wire_ms > 0 ? report_.bytes / (wire_ms / 1000) / 1e6 : 0;
  if (r.ok()) {
    report_.result = "completed";
    progress_->phase = kDone;
  } else if (commit_sent_) {
    report_.result = "in-doubt";
    report_.error = "after COMMIT: " + r.error().message +
                    " (the VM stays paused here until the status checker decides)";
    progress_->phase = kFailed;
  } else {
    report_.result = "failed";
    report_.error = r.error().message;
    fail_before_commit(r.error());
    progress_->phase = kFailed;
  }
  report_.total_ms = ms_between(start_, Clock::now());
  return report_;
}

}  // namespace

MigrationReport migrate_machine(kvm::Machine& machine, const SourceOptions& options,
                                MigrationProgress* progress) {
  Session session(machine, options, progress);
  return session.run();
}

}  // namespace kvmig::helper
