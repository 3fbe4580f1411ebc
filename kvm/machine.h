// Machine: one micro-VM. A VM fd, guest memory, in-kernel irqchip and PIT, N vCPUs with
// their threads, and the port devices. create() builds it empty (no kernel), so restore and
// migration can fill it; load_kernel() boots a Multiboot ELF32 or a 64-bit ELF.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/fd.h"
#include "base/result.h"
#include "kvm/guest_memory.h"
#include "kvm/kvm_system.h"
#include "kvm/machine_stats.h"
#include "kvm/migratable.h"
#include "kvm/vcpu.h"

namespace kvmig::kvm {

class BlockDevice;
class BlockWriteLog;
class DeviceDirty;
class DirtyRingLog;
class IoDevices;
struct RunControl;

struct MachineConfig {
  uint64_t memory = 0;
  int vcpus = 1;
  bool hugepages = false;
  uint32_t dirty_ring_entries = 0;  // 0 = bitmap dirty tracking; else a power of two
  std::string console_path;         // empty = stdout
  // When the user's command started, for the boot-time figures in stats (default: create()).
  std::chrono::steady_clock::time_point start_time{};
};

class Machine : public Pausable {
 public:
  static Result<std::unique_ptr<Machine>> create(const MachineConfig& config);
  ~Machine() override;

  // Loads `path` (ELF32 Multiboot, or ELF64 entered in long mode) and points vCPU 0 at it.
  // Appends tsc_khz=N to the command line unless it has one.
  Result<void> load_kernel(const std::string& path, const std::string& cmdline);
  // Starts one thread per vCPU. vCPU 0 runs from its registers; the others wait for
  // INIT/SIPI in the kernel, as on real hardware.
  Result<void> start();
  // Returns once every vCPU is out of KVM_RUN, its pending I/O completed, and parked; so
  // their state may be read or saved. Bounded latency: a signal kicks each vCPU out. A disk
  // request the host does not finish within kBlkDrainLimit (5 s) fails the pause, vCPUs running.
  Result<void> pause() override;
  Result<void> resume() override;
  bool paused() const;
  // Ends the VM from outside (e.g. after migrating it away); wait() then returns `status`.
  void stop(int status);
  // Blocks until the VM ends: the guest's exit-port status, or the error that ended it
  // (triple fault with registers, KVM failure).
  Result<int> wait();

  GuestMemory& memory() { return memory_; }
  int vm_fd() const { return vm_fd_.get(); }
  std::vector<Vcpu*> vcpus() const;
  KvmSystem& kvm() { return *kvm_; }
  const MachineConfig& config() const { return config_; }
  MachineStats stats() const;
  std::string cmdline() const { return cmdline_; }

  // Each complete guest console line, called on a vCPU thread.
  void set_console_listener(std::function<void(std::string_view)> listener);
  // Called on the vCPU's thread when its dirty ring is full (KVM_EXIT_DIRTY_RING_FULL);
  // must harvest and reset the rings. Without one, a full ring ends the VM with an error.
  // By default, with dirty_ring_entries > 0, the Machine's own DirtyRingLog drains the rings.
  void set_dirty_ring_full_handler(std::function<Result<void>(Vcpu&)> handler);
  // The per-vCPU dirty rings (enabled before the vCPUs, attached to each), or nullptr when
  // MachineConfig::dirty_ring_entries is 0.
  DirtyRingLog* dirty_ring() { return dirty_ring_.get(); }

  // Disks (kvm/block_device.h). attach_disk opens PATH (a raw image or block device) as the
  // next disk, 0, 1, ..; only before start(): the guest finds its disks at boot, and a
  // machine built for an incoming migration or a restore must have the same disks before
  // its state is restored (their state sections must match). Returns the disk's index.
  Result<size_t> attach_disk(const std::string& path, uint64_t block_bytes = 64 * 1024);
  struct DiskInfo {
    std::string path;
    int fd = -1;         // read-write, buffered; owned by the machine, valid while it lives
    uint64_t size = 0;   // bytes
    BlockWriteLog* write_log = nullptr;  // completed guest writes, per block
  };
  std::vector<DiskInfo> disks() const;
  BlockDevice& disk(size_t index) { return *disks_.at(index); }
  BlockWriteLog& disk_write_log(size_t index);
  // The VMM's record of guest pages its devices wrote (disk reads completing, ring
  // statuses); pass it to DirtyTracker::create so migration resends those pages.
  DeviceDirty& device_dirty() { return *device_dirty_; }

 private:
  Machine(const MachineConfig& config, std::unique_ptr<KvmSystem> kvm, Fd vm_fd, GuestMemory memory);
  Result<void> init_devices_and_vcpus();
  void vcpu_thread(size_t index);
  void kick_all();

  MachineConfig config_;
  std::unique_ptr<KvmSystem> kvm_;
  Fd vm_fd_;
  GuestMemory memory_;
  Fd console_fd_;
  std::unique_ptr<IoDevices> io_;
  std::unique_ptr<DeviceDirty> device_dirty_;
  // After memory_ and device_dirty_: destroyed (drained) before what they write into.
  std::vector<std::unique_ptr<BlockDevice>> disks_;
  std::unique_ptr<DirtyRingLog> dirty_ring_;  // declared before vcpus_: outlives their rings
  std::vector<std::unique_ptr<Vcpu>> vcpus_;
  std::unique_ptr<RunControl> ctl_;
  std::string cmdline_;
  bool kernel_loaded_ = false;
  int64_t create_us_ = 0;
};

}  // namespace kvmig::kvm
