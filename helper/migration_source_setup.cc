// The source's setup phase: connect, HELLO / HELLO_ACK (version and features agreed), the
// first vCPU/device snapshot, and the write traces started. Nothing is paused for long here:
// the guest keeps running while the destination maps its memory.
#include <linux/kvm.h>

#include <cstdio>
#include <random>

#include "helper/migration_source_session.h"

namespace kvmig::helper {
namespace {

std::string random_id() {
  std::random_device rd;
  char buf[40];
  snprintf(buf, sizeof buf, "mig-%08x%08x", rd(), rd());
  return buf;
}

}  // namespace

Result<void> SourceSession::setup() {
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
  hello.vm_name = opt_.vm_name;
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
  hello.features = (opt_.compress != CompressMode::off ? kFeatureCompression : 0) | (opt_.verify ? kFeatureVerify : 0);
  if (!vm_.disks().empty()) hello.features |= kFeatureDisks;
  if (opt_.verify) hello.features |= kFeatureVerifyRanges;  // where memory differs, if it does
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
  // An older destination does not acknowledge rounds: they are then timed to the drained
  // send queues, as before version 3.
  round_acks_ = version_ >= kRoundAckVersion;
  if (opt_.verify && !(features_ & kFeatureVerify))
    return wire_error(WireCode::config_mismatch, "destination cannot --verify");
  report_.compress = features_ & kFeatureCompression;
  // Without acknowledged rounds a compressed round hides the destination's backlog and the
  // switch-over pays for it (docs/protocol.md): `auto` sends raw pages to such a peer; an
  // explicit `on` is the operator's call.
  if (!round_acks_ && opt_.compress == CompressMode::automatic) report_.compress = false;

  // The first snapshot in a process probes the MSR list on vCPU 0, which takes the vCPU's
  // lock, held by a vCPU in KVM_RUN until its next exit (seconds for a guest that rarely
  // exits): pause for that one probe only. Once probed, no vCPU is touched here.
  // While paused anyway, one state save is timed: a part of the switch-over's fixed cost
  // that convergence plans with (round_timing.h, FixedCost). It adds ~0.1 ms to this pause,
  // once; a VM not paused here keeps the assumed figure. The pause itself is not timed here:
  // one sample of it was noise (0.07 and 20.7 ms in two runs a minute apart at load 10, with
  // 3 ms downtimes in both).
  {
    const bool pause = !user_paused_ && !kvm::MachineSnapshot::probed(vm_);
    if (pause) KVMIG_TRY(vm_.pause());
    auto snap = kvm::MachineSnapshot::of(vm_);
    if (snap.ok() && (pause || user_paused_)) {
      auto t1 = Clock::now();
      auto saved = snap->save_parts();
      if (saved.ok()) state_save_seconds_ = std::chrono::duration<double>(Clock::now() - t1).count();
    }
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
  KVMIG_ASSIGN(tracker_, kvm::DirtyTracker::create(vm_.vm_fd(), tc, ring, &vm_.device_dirty()));
  report_.mode = tracker_->mode_name();
  report_.granularity = opt_.granularity;
  report_.streams = opt_.streams;
  KVMIG_TRY(tracker_->start_tracking());
  sender_ = std::make_unique<PageSender>(
      conn_, version_, [this](uint64_t gpa, uint64_t len) { return vm_.memory().host_ptr(gpa, len); },
      report_.compress ? opt_.compress : CompressMode::off, vm_.memory().residency_tells_zero());
  for (const auto& r : vm_.memory().regions()) {
    uint64_t pages = r.size / kPageSize;
    deferred_.push_back({r.slot, r.gpa, pages, std::vector<uint64_t>((pages + 63) / 64)});
    streak_.emplace_back(pages, 0);
  }
  KVMIG_TRY(disks_setup());
  report_.setup_ms = ms_between(start_, Clock::now());
  return ok();
}

}  // namespace kvmig::helper
