// The source side of live disk migration (docs/disk-migration.md): the disks of a running VM
// move with it. Each disk is an image fd plus the block device's BlockWriteLog. At start the
// logs are started and the data extents scanned (the bulk copy: holes are never read); each
// round then harvests the logs into the per-disk DiskPrecopyPlan, reads the blocks the plan
// picks with io_uring (registered buffers, 32 reads in flight) and sends them as
// DISK_BLOCKS on the migration's control stream, all-zero blocks as markers. The final round,
// with the VM paused, sends every block still owed, deferred hot ones included.
//
// The images are only ever read. Reads race with the guest's writes by design: a write that
// completes after a block's harvest is marked again and the block resent in a later round.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "base/result.h"
#include "helper/disk_precopy_messages.h"
#include "helper/disk_precopy_plan.h"
#include "helper/transport.h"
#include "kvm/block_write_log.h"

namespace kvmig::helper {

class UringEngine;

struct DiskSource {
  int fd = -1;         // the image, readable, buffered
  int direct_fd = -1;  // the same image opened O_DIRECT, or -1
  kvm::BlockWriteLog* log = nullptr;  // the device's log: its disk_bytes and block_bytes rule
  // A chain's top (helper/disk_chain_migration.h): replaces the holes of what was read from
  // `fd` with the lower layers' bytes, so a block carries what the guest reads there.
  std::function<Result<void>(uint64_t offset, uint8_t* buf, uint64_t length)> fill_holes;
};

struct DiskSenderOptions {
  DiskPlanConfig plan;            // the hot/cold rule's knobs (disk size and block are per disk)
  uint32_t chunk = 1 << 20;       // bytes per read and per DISK_BLOCKS (at least one block)
  unsigned queue_depth = 32;      // reads in flight
  uint32_t index_base = 0;        // DISK_BLOCKS index of disk 0 (copied chain layers follow the disks)
};

struct DiskRoundStats {
  uint32_t round = 0;
  uint64_t blocks = 0;           // blocks sent this round
  uint64_t bytes = 0;            // disk bytes they cover
  uint64_t zero_bytes = 0;       // of those, sent as zero markers
  uint64_t wire_bytes = 0;       // DISK_BLOCKS bytes, headers included
  uint64_t dirty_bytes = 0;      // distinct bytes the harvest before it found written
  uint64_t deferred_blocks = 0;  // hot, held back after this round
  uint64_t newly_deferred = 0;
  uint64_t cooled = 0;
  double seconds = 0;
};

class DiskPrecopySender {
 public:
  // Starts every log, then scans each image's data extents (in that order: a write before
  // the scan is in what the scan sees, a write after it is in the log).
  static Result<std::unique_ptr<DiskPrecopySender>> create(std::vector<DiskSource> disks,
                                                           const DiskSenderOptions& options);
  ~DiskPrecopySender();

  const DisksMsg& declaration() const { return declared_; }
  // Declares disk `disk`'s lower layers (base first) in DISKS: before declare().
  void set_lower(size_t disk, std::vector<MigrationLayer> lower) { declared_.disks[disk].lower = std::move(lower); }
  // After declare(): the destination's answer for each declared lower layer.
  const DisksReady& ready() const { return ready_; }
  // Sends DISKS and waits for DISKS_READY (an ERROR from the destination is returned).
  Result<void> declare(Stream& control, uint16_t version);
  // Harvests every log into its plan. Returns distinct bytes written since the last harvest.
  uint64_t observe();
  // Whether the pause could carry what is owed now, at the bandwidth measured by the
  // rounds so far (or `bandwidth` when given), with the guest writing `dirty_rate` bytes/s.
  DiskConvergence convergence(double dirty_rate, double bandwidth = 0) const;
  // One live round after observe(): at most max_bytes (0: no limit) of the blocks the plans
  // pick, hot ones deferred.
  Result<DiskRoundStats> send_round(Stream& control, uint16_t version, uint64_t max_bytes);
  // The last round, with the guest paused and its disk writes completed: harvest once more
  // and send everything owed.
  Result<DiskRoundStats> send_final(Stream& control, uint16_t version);
  // Stops the logs (after the migration, either way).
  void stop_tracking();

  double bandwidth() const { return bandwidth_; }
  uint64_t pending_bytes() const;
  bool bulk_done() const;
  uint32_t rounds() const { return round_; }
  const DiskPrecopyPlan& plan(size_t disk) const { return plans_[disk]; }

 private:
  DiskPrecopySender() = default;
  Result<void> send_blocks(Stream& control, uint16_t version, size_t disk,
                           std::span<const uint64_t> blocks, DiskRoundStats& stats);

  std::vector<DiskSource> disks_;
  std::vector<DiskPrecopyPlan> plans_;
  DisksMsg declared_;
  DisksReady ready_;
  DiskSenderOptions options_;
  std::unique_ptr<UringEngine> engine_;
  std::vector<bool> direct_ok_;  // per disk: O_DIRECT not refused yet
  uint32_t round_ = 0;
  double bandwidth_ = 0;         // bytes/s of the last round big enough to measure
  uint64_t last_dirty_bytes_ = 0;
};

}  // namespace kvmig::helper
