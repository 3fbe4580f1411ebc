// The source's migration session, shared by the files that implement its phases (private to
// helper/: callers use migrate_machine() in migration_source.h):
//   migration_source_setup.cc       connect, HELLO / HELLO_ACK, first snapshot, start the traces
//   migration_source_precopy.cc     the pre-copy round loop: harvest, converge, defer hot, send
//   migration_source_switchover.cc  pause, last pages, state, READY, then COMMIT / DONE
//   migration_source.cc             the phases in order, and the failure path before COMMIT
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "base/fd.h"
#include "helper/disk_precopy_sender.h"
#include "helper/migration_source.h"
#include "helper/page_sender.h"
#include "helper/round_timing.h"
#include "helper/vcpu_throttle.h"
#include "helper/messages.h"
#include "kvm/dirty_tracker.h"
#include "kvm/machine_snapshot.h"

namespace kvmig::helper {

// How long a round (and the switch-over) waits for the destination to take in what was sent.
inline constexpr std::chrono::milliseconds kSourceDrainLimit{10000};

class SourceSession {
 public:
  SourceSession(kvm::Machine& vm, const SourceOptions& opt, MigrationProgress* progress)
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
  // read_control(), but a destination silent for `seconds` (alive, sockets open: the link
  // timeout does not see it) is an error naming `what` (round_timing.h, reply_deadline).
  Result<Message> read_control_within(double seconds, const std::string& what);
  // Version 3 on: reads the destination's ROUND_ACK of the round sent last and checks it
  // against what the data streams carried (docs/protocol.md, "Round acknowledgement").
  Result<void> await_round_ack();
  void fail_before_commit(const Error& error);
  // The disk part (migration_source_disks.cc, docs/disk-migration.md); no-ops without disks.
  Result<void> disks_setup();
  bool disks_converged();  // harvests the disks' write logs: call once per round
  Result<void> disk_round();
  Result<void> disk_final();
  void disks_stop();
  void add_stats(const RoundStats& st) {
    report_.bytes += st.wire_bytes;
    report_.pages += st.pages;
    report_.zero_pages += st.zero_pages;
    report_.compressed_batches += st.compressed_batches;
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
  bool round_acks_ = false;  // the agreed version has ROUND_ACK: rounds are timed to it
  RoundAck sent_;            // the round sent last, as its ROUND_ACK must echo it
  uint64_t sent_raw_ = 0;    // its uncompressed page bytes: what its deadline scales with
  RoundTiming timing_;       // latency + bytes / bandwidth, fitted from the rounds so far
  // Measured in setup when it pauses the VM anyway (else assumed): part of convergence's
  // fixed cost, with the vCPU pause (assumed: kicking the vCPUs out of KVM_RUN).
  double state_save_seconds_ = 0.0002, pause_seconds_ = 0.0003;
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
  std::unique_ptr<DiskPrecopySender> disks_;
  std::vector<Fd> disk_direct_fds_;
  double disk_dirty_rate_ = 0;
  Clock::time_point disk_observed_at_;
};

}  // namespace kvmig::helper
