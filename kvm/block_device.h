// kvmig's paravirtual block device ("kblk", kvm/block_ring.h, docs/block-device.md): the
// guest's request ring on one side, a BlockBackend (io_uring on an image file or block
// device) on the other, a BlockWriteLog of completed guest writes for live disk migration.
//
// Threads: doorbells arrive on vCPU threads (port I/O), completions on the backend's
// thread. One mutex orders both. Every descriptor is copied out of guest memory once, then
// validated (op, length, alignment, buffer inside guest RAM, sectors inside the disk); a
// bad one gets kBlkBadRequest and nothing is read or written. Every byte the device writes
// into guest memory (read data, statuses, the used counter) is marked in DeviceDirty after
// the write, so live migration resends those pages.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "base/result.h"
#include "kvm/block_backend.h"
#include "kvm/block_ring.h"
#include "kvm/block_write_log.h"
#include "kvm/migratable.h"

namespace kvmig::kvm {

class DeviceDirty;
class GuestMemory;

inline constexpr uint32_t kBlkSectionVersion = 1;
// How long a pause (or a save) waits for the host to finish the guest's requests in flight.
// A host I/O that hangs longer (a dead NFS server, a failing disk retrying) fails the pause
// instead of freezing the VM and whoever paused it: a stuck pause is a frozen guest.
inline constexpr std::chrono::milliseconds kBlkDrainLimit{5000};

struct BlockDeviceStats {
  uint64_t reads = 0, writes = 0, flushes = 0;
  uint64_t bytes_read = 0, bytes_written = 0;
  uint64_t bad_requests = 0, io_errors = 0, ring_errors = 0;
};

class BlockDevice final : public Snapshottable {
 public:
  // Disk `index` (0 .. kBlkMaxDisks-1) answers ports kBlkPortBase + kBlkPortStride * index.
  static Result<std::unique_ptr<BlockDevice>> open(int index, const std::string& path, uint64_t block_bytes,
                                                   GuestMemory& memory, DeviceDirty& dirty);
  ~BlockDevice() override;  // drains, then closes the backend

  int index() const { return index_; }
  uint16_t port_base() const { return static_cast<uint16_t>(kBlkPortBase + kBlkPortStride * index_); }
  const std::string& path() const { return backend_->path(); }
  int fd() const { return backend_->fd(); }
  uint64_t size() const { return backend_->size(); }
  bool direct() const { return backend_->direct(); }
  BlockWriteLog& write_log() { return log_; }
  BlockDeviceStats stats() const;

  // One register access; `offset` is relative to port_base(). Runs on a vCPU thread.
  void handle_port(uint16_t offset, bool out, uint8_t size, uint8_t* data);
  // Returns once no request is in flight. With the vCPUs parked, nothing starts a new one,
  // so the ring, the disk and guest memory stay as they are until they resume. After
  // `limit` with requests still in flight, an error naming the disk and how many (the
  // requests go on; the caller must let the VM run, it cannot be paused consistently).
  Result<void> drain(std::chrono::milliseconds limit = kBlkDrainLimit);
  uint32_t in_flight() const;

  std::string snapshot_id() const override { return "dev.blk." + std::to_string(index_); }
  // "dev.blk.N" v1: uint64 ring gpa, uint32 entries (0 = no ring), uint32 consumed index,
  // uint32 used counter, uint32 status bits, uint64 staged ring address. Drains first
  // (bounded: a hung host I/O fails the save).
  Result<StateSection> save() override;
  Result<void> restore(const StateSection& section) override;

 private:
  BlockDevice(int index, uint64_t block_bytes, uint64_t disk_bytes, GuestMemory& memory, DeviceDirty& dirty);
  struct Slot {
    BlkDescriptor desc{};
    bool busy = false;
  };
  uint32_t read_register(uint16_t offset);
  void write_register(uint16_t offset, uint32_t value);
  void set_ring_locked(std::unique_lock<std::mutex>& lock, uint64_t gpa, uint32_t entries);
  void doorbell_locked(uint32_t avail);
  void pump_locked();
  // Why `d` may not run, or nullptr if it may.
  const char* invalid_reason(const BlkDescriptor& d) const;
  void complete_locked(uint32_t slot, uint8_t status);
  void on_completion(uint64_t slot, int64_t result);
  uint8_t* ring_host() const;
  void note_bad(const char* what, uint32_t slot);
  void hold_if_asked();

  // Test hook, KVMIG_DISK_HOLD=PATH: while PATH exists, every completion waits before it
  // reaches the device, exactly as if the host I/O hung (the requests stay in flight). Lets
  // tests/integration/disk_migration_test.cc prove a hung disk fails a pause instead of
  // freezing the VM, with the very binary users run. Unset, it costs one branch per request.
  std::string hold_path_;

  int index_;
  GuestMemory& memory_;
  DeviceDirty& dirty_;
  BlockWriteLog log_;

  mutable std::mutex mu_;
  std::condition_variable idle_;
  uint64_t staged_ring_ = 0;  // RING_LO/HI as last written
  uint64_t ring_gpa_ = 0;
  uint32_t entries_ = 0;      // 0: no ring
  uint32_t avail_ = 0;        // last doorbell value
  uint32_t cons_ = 0;         // next descriptor to take
  uint32_t used_ = 0;         // completions so far (mirrored into the ring header)
  uint32_t status_ = 0;       // kBlkStatus* bits, sticky
  uint32_t in_flight_ = 0;
  std::vector<Slot> slots_;
  BlockDeviceStats stats_;
  std::unique_ptr<BlockBackend> backend_;  // last: destroyed first, its thread calls into us
};

// A Snapshottable that forwards to a device the machine owns (MachineSnapshot owns parts).
std::unique_ptr<Snapshottable> block_device_part(BlockDevice& device);

}  // namespace kvmig::kvm
