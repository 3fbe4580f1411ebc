#include "helper/migration_destination.h"

#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "helper/disk_precopy_receiver.h"
#include "helper/messages.h"
#include "helper/transport_pages.h"
#include "helper/verify_memory.h"
#include "kvm/guest_memory.h"
#include "kvm/machine_snapshot.h"

namespace kvmig::helper {
namespace {

using Clock = std::chrono::steady_clock;

// The receiving threads (this one and the page threads it starts, which inherit it) run
// at a raised CPU priority where allowed: on a busy host, each wake-up in the switch-over
// (last pages, state, COMMIT) could otherwise wait behind other work while the guest is
// paused. They only wait on sockets, so they take little. Dropped before the VM starts:
// vCPU threads inherit it and must not outrank the host's other work.
class ReceivePriority {
 public:
  ReceivePriority() : tid_(static_cast<id_t>(::gettid())) {
    errno = 0;
    int old = ::getpriority(PRIO_PROCESS, tid_);
    if (errno == 0 && ::setpriority(PRIO_PROCESS, tid_, kNice) == 0) old_ = old;
  }
  ~ReceivePriority() { drop(); }
  void drop() {
    if (old_) (void)::setpriority(PRIO_PROCESS, tid_, *old_);
    old_.reset();
  }
  ReceivePriority(const ReceivePriority&) = delete;
  ReceivePriority& operator=(const ReceivePriority&) = delete;
  static constexpr int kNice = -10;

 private:
  id_t tid_;
  std::optional<int> old_;
};

class Receiver {
 public:
  Receiver(Connection& conn, const DestinationOptions& opt) : conn_(conn), opt_(opt) {}
  ~Receiver() { stop_pages(); }

  Result<ReceivedMachine> run();

 private:
  Result<void> hello();
  Result<void> follow_control();
  Result<void> load_and_ready();
  Result<void> commit();
  Result<void> on_disks(std::span<const uint8_t> payload);
  void page_loop();
  void stop_pages();
  Result<void> send_control(MsgType type, std::span<const uint8_t> payload = {}) {
    std::lock_guard lock(send_mu_);
    return send_message(*conn_.control, version_, type, payload);
  }
  void send_error(const Error& e) {
    WireCode code = wire_code_of(e);
    ErrorMsg m{code == WireCode::none ? WireCode::internal : code, e.message.substr(0, kMaxErrorText)};
    (void)send_control(MsgType::error, encode(m));
  }
  // Unblocks a control read in progress (the page thread failed).
  void interrupt_control() {
    if (auto* fs = dynamic_cast<FdStream*>(conn_.control.get())) ::shutdown(fs->fd(), SHUT_RD);
    else conn_.control->shutdown();
  }

  Connection& conn_;
  DestinationOptions opt_;
  uint16_t version_ = kWireVersion;
  Hello hello_;
  ReceivedMachine out_;
  std::optional<kvm::MachineSnapshot> snapshot_;
  std::set<std::string> part_ids_;
  std::vector<kvm::StateSection> sections_;
  std::optional<Verify> verify_;
  std::unique_ptr<PageRoundLog> round_log_;  // --verify: which round last wrote each page
  bool disks_agreed_ = false;                  // HELLO_ACK accepted the disk feature
  bool verify_ranges_ = false;                 // HELLO_ACK accepted per-piece VERIFY hashes
  std::unique_ptr<DiskPrecopyReceiver> disks_;  // the disks' copies, from DISKS on
  std::mutex send_mu_;
  SessionVm vm_;
  bool started_recorded_ = false;
  bool completed_recorded_ = false;
  Clock::time_point ready_at_;
  ReceivePriority priority_;  // constructed on the receiving thread, before any other thread

  // The page thread and what it shares with the control thread.
  std::thread pages_thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  uint32_t rounds_done_ = 0;
  std::vector<RoundStats> round_stats_;
  std::optional<Error> page_error_;
  bool stopping_ = false;
};

Result<void> Receiver::hello() {
  KVMIG_ASSIGN(Message m, read_message(*conn_.control, 0, opt_.limits));
  if (m.type() == MsgType::error || m.type() == MsgType::abort) return peer_error(m);
  if (m.type() != MsgType::hello)
    return wire_error(WireCode::unexpected, std::string("expected HELLO, got ") + msg_type_name(m.type()));
  KVMIG_ASSIGN(hello_, decode_hello(m.payload, m.header.version));
  // Answer errors from here on in the version the source can read: the lower one.
  KVMIG_ASSIGN(version_, agree_version(hello_.version));
  out_.migration_id = hello_.migration_id;
  if (hello_.streams != conn_.data.size())
    return wire_error(WireCode::config_mismatch, "HELLO says " + std::to_string(hello_.streams) +
                                                     " data streams, the connection has " +
                                                     std::to_string(conn_.data.size()));
  // The layout must be exactly what this host's VMM builds for that much RAM: the pages
  // land by guest-physical address, so any other layout would put them elsewhere.
  uint64_t total = hello_.memory.total();
  std::vector<kvm::SlotPlan> plan = kvm::plan_memory_layout(total);
  bool same = plan.size() == hello_.memory.ranges.size();
  for (size_t i = 0; same && i < plan.size(); ++i)
    same = plan[i].gpa == hello_.memory.ranges[i].gpa && plan[i].size == hello_.memory.ranges[i].size;
  if (!same) return wire_error(WireCode::config_mismatch, "HELLO memory layout is not one this VMM builds");

  kvm::MachineConfig config;
  config.memory = total;
  config.vcpus = static_cast<int>(hello_.vcpus);
  config.hugepages = hello_.hugepages;
  config.dirty_ring_entries = hello_.dirty_ring_entries;
  config.console_path = opt_.console_path;
  config.start_time = opt_.start_time;
  auto machine = kvm::Machine::create(config);
  if (!machine.ok())
    return wire_error(WireCode::config_mismatch, "cannot build the VM here: " + machine.error().message);
  out_.machine = std::move(*machine);
  auto snap = kvm::MachineSnapshot::of(*out_.machine);
  if (!snap.ok()) return wire_error(WireCode::internal, snap.error().message);
  snapshot_.emplace(std::move(*snap));
  for (const std::string& id : snapshot_->part_ids()) part_ids_.insert(id);

  vm_.migration_id = hello_.migration_id;
  vm_.uuid = hello_.vm_uuid;
  vm_.name = hello_.vm_name;
  if (!opt_.disk_paths.empty() && !(hello_.features & kFeatureDisks))
    return wire_error(WireCode::config_mismatch, "--disk given, but the source VM has no disks to migrate");
  if (opt_.events) {
    auto r = opt_.events->on_started(vm_);
    if (!r.ok()) return wire_error(WireCode::internal, "recording the migration start: " + r.error().message);
    started_recorded_ = true;
  }
  HelloAck ack;
  ack.version = version_;
  ack.features = hello_.features & kKnownFeatures;
  // Disks only where there is somewhere to put them: a source with disks and no --disk here
  // stops at once with a clear error, before anything moved.
  if (opt_.disk_paths.empty()) ack.features &= ~kFeatureDisks;
  disks_agreed_ = ack.features & kFeatureDisks;
  // Per-piece hashes only with VERIFY itself.
  if (!(ack.features & kFeatureVerify)) ack.features &= ~kFeatureVerifyRanges;
  verify_ranges_ = ack.features & kFeatureVerifyRanges;
  if (ack.features & kFeatureVerify) round_log_ = std::make_unique<PageRoundLog>(hello_.memory);
  KVMIG_TRY(send_control(MsgType::hello_ack, encode(ack)));
  pages_thread_ = std::thread([this] { page_loop(); });
  return ok();
}

void Receiver::page_loop() {
  kvm::Machine& vm = *out_.machine;
  RoundReceiver rr(conn_, version_, hello_.memory,
                   [&vm](uint64_t gpa, uint64_t len) { return vm.memory().host_ptr(gpa, len); },
                   opt_.limits);
  rr.set_anonymous_target(true);  // kvm::GuestMemory maps guest RAM MAP_PRIVATE | MAP_ANONYMOUS
  rr.set_round_log(round_log_.get());
  for (uint32_t round = 1;; ++round) {
    auto st = rr.receive(round);
    std::lock_guard lock(mu_);
    if (stopping_) return;
    if (!st.ok()) {
      page_error_ = st.error();
      page_error_->prefix("round " + std::to_string(round));
      cv_.notify_all();
      // A closed data stream means the source is going away and closes control too (with
      // its reason first, if it can). Bad data the source does not know about: tell it, and
      // stop waiting on control.
      WireCode code = wire_code_of(*page_error_);
      if (code != WireCode::truncated && code != WireCode::io) {
        send_error(*page_error_);
        interrupt_control();
      }
      return;
    }
    round_stats_.push_back(*st);
    rounds_done_ = round;
    cv_.notify_all();
  }
}

void Receiver::stop_pages() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  if (pages_thread_.joinable()) {
    for (auto& d : conn_.data) d->shutdown();
    pages_thread_.join();
  }
}

Result<void> Receiver::follow_control() {
  uint32_t expect_round = 1;
  const bool want_verify = hello_.features & kFeatureVerify;
  while (sections_.size() < part_ids_.size() || (want_verify && !verify_)) {
    auto msg = read_message(*conn_.control, version_, opt_.limits);
    // The source's own reason (ABORT, ERROR) beats what the page thread saw of it (a closed
    // data stream).
    if (msg.ok() && (msg->type() == MsgType::error || msg->type() == MsgType::abort)) return peer_error(*msg);
    {
      std::lock_guard lock(mu_);
      if (page_error_) return *page_error_;
    }
    if (!msg.ok()) return std::move(msg.error());
    Message& m = *msg;
    switch (m.type()) {
      case MsgType::error:
      case MsgType::abort:
        return peer_error(m);
      case MsgType::round_end: {
        KVMIG_ASSIGN(RoundEnd end, decode_round_end(m.payload));
        if (end.round != expect_round || !sections_.empty())
          return wire_error(WireCode::unexpected, "control ROUND_END of round " + std::to_string(end.round) +
                                                      " where round " + std::to_string(expect_round) +
                                                      " was due");
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return rounds_done_ >= end.round || page_error_; });
        if (page_error_) return *page_error_;
        const RoundStats& st = round_stats_[end.round - 1];
        if (st.pages != end.pages)
          return wire_error(WireCode::malformed, "round " + std::to_string(end.round) + ": control counts " +
                                                     std::to_string(end.pages) + " pages, data streams carried " +
                                                     std::to_string(st.pages));
        out_.pages += st.pages;
        out_.zero_pages += st.zero_pages;
        out_.bytes += st.wire_bytes;
        out_.rounds = end.round;
        ++expect_round;
        // Every page of the round is in guest memory now: say so, so the source times the
        // round to here, not to when its socket buffers took it (version 3 on).
        if (version_ >= kRoundAckVersion)
          KVMIG_TRY(send_control(MsgType::round_ack, encode(RoundAck{end.round, st.pages, st.wire_bytes})));
        if (opt_.events) {
          // A site that can no longer record the completion must fail the migration now,
          // while the source can still run on, not after COMMIT.
          auto r = opt_.events->on_round(vm_);
          if (!r.ok()) return wire_error(WireCode::internal, "round " + std::to_string(end.round) + ": " + r.error().message);
        }
        break;
      }
      case MsgType::state: {
        if (expect_round == 1) return wire_error(WireCode::unexpected, "STATE before any memory round");
        if (disks_agreed_ && !disks_) return wire_error(WireCode::unexpected, "STATE before DISKS");
        KVMIG_ASSIGN(kvm::StateSection s,
                     decode_state(m.payload, [&](std::string_view id) { return part_ids_.count(std::string(id)) > 0; },
                                  opt_.limits.max_control_payload));
        for (const auto& have : sections_)
          if (have.id == s.id) return wire_error(WireCode::malformed, "STATE section '" + s.id + "' sent twice");
        sections_.push_back(std::move(s));
        break;
      }
      case MsgType::disks:
        KVMIG_TRY(on_disks(m.payload));
        break;
      case MsgType::disk_blocks:
        if (!disks_ || !sections_.empty())
          return wire_error(WireCode::unexpected, "DISK_BLOCKS before DISKS or after STATE");
        KVMIG_TRY(disks_->on_blocks(m.payload));
        break;
      case MsgType::verify: {
        if (!want_verify || verify_) return wire_error(WireCode::unexpected, "VERIFY not agreed or sent twice");
        KVMIG_ASSIGN(Verify v, decode_verify(m.payload, verify_ranges_));
        verify_ = v;
        break;
      }
      default:
        return wire_error(WireCode::unexpected,
                          std::string(msg_type_name(m.type())) + " during pre-copy/switch-over");
    }
  }
  return ok();
}

// DISKS: open the copies (created, locked, sized), attach them to the machine as its disks, so
// their device state sections can be restored, and answer DISKS_READY.
Result<void> Receiver::on_disks(std::span<const uint8_t> payload) {
  if (!disks_agreed_ || disks_) return wire_error(WireCode::unexpected, "DISKS not agreed or sent twice");
  KVMIG_ASSIGN(DisksMsg declared, decode_disks(payload));
  KVMIG_ASSIGN(disks_, DiskPrecopyReceiver::open(declared, opt_.disk_paths, {}));
  for (size_t i = 0; i < declared.disks.size(); ++i) {
    auto a = out_.machine->attach_disk(opt_.disk_paths[i], declared.disks[i].block_bytes);
    if (!a.ok()) return wire_error(WireCode::config_mismatch, "attaching disk " + std::to_string(i) + ": " + a.error().message);
  }
  // The machine has more parts now: their state sections are part of what must arrive.
  auto snap = kvm::MachineSnapshot::of(*out_.machine);
  if (!snap.ok()) return wire_error(WireCode::internal, snap.error().message);
  snapshot_.emplace(std::move(*snap));
  part_ids_.clear();
  for (const std::string& id : snapshot_->part_ids()) part_ids_.insert(id);
  return send_control(MsgType::disks_ready, encode(disks_->ready()));  // chains: which layers are held
}

Result<void> Receiver::load_and_ready() {
  // Every round is in (each control ROUND_END waited for its data); the page thread now
  // waits for a round that will never come. It is stopped after READY: joining its
  // threads is not worth a moment of the source's downtime.
  kvm::Machine& vm = *out_.machine;
  if (verify_) {
    // Where memory differs goes to this side's log in full (the ERROR text is short).
    std::string detail;
    auto checked = check_verify(*verify_, vm.memory().regions(), round_log_.get(), &detail);
    if (!detail.empty()) fputs(detail.c_str(), stderr);
    KVMIG_TRY(checked);
    out_.verified = true;
  }
  // The disks durable before READY: after it the source may be gone for good.
  if (disks_) {
    auto sync_begin = Clock::now();
    KVMIG_TRY(disks_->finish());
    out_.disk_sync_ms = std::chrono::duration<double, std::milli>(Clock::now() - sync_begin).count();
    out_.disk_bytes = disks_->stats().data_bytes;
  }
  auto r = snapshot_->restore_parts(sections_);
  if (!r.ok()) return wire_error(WireCode::internal, "loading state: " + r.error().message);
  KVMIG_TRY(send_control(MsgType::ready));
  ready_at_ = Clock::now();
  stop_pages();
  return ok();
}

Result<void> Receiver::commit() {
  KVMIG_ASSIGN(Message m, read_message(*conn_.control, version_, opt_.limits));
  if (m.type() == MsgType::error || m.type() == MsgType::abort) return peer_error(m);
  if (m.type() != MsgType::commit)
    return wire_error(WireCode::unexpected, std::string("expected COMMIT, got ") + msg_type_name(m.type()));
  KVMIG_TRY(decode_empty(m.payload, MsgType::commit));
  auto begin = Clock::now();
  // Durably "completed" before a single guest instruction runs here; if that cannot be
  // written, the VM must not run (the source stays in doubt until the checker decides).
  if (opt_.events) {
    auto r = opt_.events->on_completed(vm_);
    if (!r.ok()) return wire_error(WireCode::internal, "recording the migration completion: " + r.error().message);
    completed_recorded_ = true;
  }
  auto recorded = Clock::now();
  priority_.drop();
  auto started = out_.machine->start();
  if (!started.ok()) return wire_error(WireCode::internal, "starting the VM: " + started.error().message);
  out_.resumed_at = Clock::now();
  out_.commit_to_resume_ms = std::chrono::duration<double, std::milli>(out_.resumed_at - begin).count();
  // The VM runs here now; a lost DONE leaves the source in doubt, which is its checker's job.
  (void)send_control(MsgType::done);
  if (getenv("KVMIG_TRACE_SWITCHOVER"))
    fprintf(stderr, "switchover(dst): ready->commit=%.3f record=%.3f start=%.3f done_sent=%.3f\n",
            std::chrono::duration<double, std::milli>(begin - ready_at_).count(),
            std::chrono::duration<double, std::milli>(recorded - begin).count(),
            std::chrono::duration<double, std::milli>(out_.resumed_at - recorded).count(),
            std::chrono::duration<double, std::milli>(Clock::now() - out_.resumed_at).count());
  return ok();
}

Result<ReceivedMachine> Receiver::run() {
  Result<void> r = hello();
  if (r.ok()) r = follow_control();
  if (r.ok()) r = load_and_ready();
  if (r.ok()) r = commit();
  if (!r.ok()) {
    send_error(r.error());
    stop_pages();
    conn_.control->shutdown();
    out_.machine.reset();  // discarded: it never ran
    if (disks_) disks_->discard();  // and so are the disk copies it would have run on
    if (opt_.events && started_recorded_ && !completed_recorded_) {
      auto a = opt_.events->on_aborted(vm_, r.error().message);
      if (!a.ok()) r.error().message += " (recording the abort failed too: " + a.error().message + ")";
    }
    return std::move(r.error());
  }
  return std::move(out_);
}

}  // namespace

Result<ReceivedMachine> receive_machine(Connection& connection, const DestinationOptions& options) {
  Receiver receiver(connection, options);
  return receiver.run();
}

}  // namespace kvmig::helper
