// The vCPU thread loop and the pause protocol shared between it and Machine.
//
// Kicking a vCPU out of KVM_RUN, race-free (QEMU's scheme since KVM_CAP_IMMEDIATE_EXIT):
// SIGUSR1 stays unblocked in vCPU threads, with a handler (no SA_RESTART) that sets
// kvm_run->immediate_exit of the vCPU its thread runs. A pauser first sets pause_requested,
// then signals the thread. The thread clears immediate_exit, then reads pause_requested,
// then enters KVM_RUN (the clear is a seq_cst store, the read a seq_cst load, so neither
// moves past the other). Either it sees the request and parks, or the signal comes after
// that read: delivered before KVM_RUN, the handler has set immediate_exit and KVM_RUN
// returns EINTR at once; delivered during KVM_RUN, the kernel returns EINTR. No window
// loses a kick, and no signal is left pending to be eaten later. A stray SIGUSR1 costs one
// extra EINTR, and a SIGUSR1 to a non-vCPU thread does nothing (instead of killing kvmig).
#pragma once

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "base/result.h"
#include "kvm/machine_stats.h"

namespace kvmig::kvm {

class IoDevices;
class Vcpu;

struct RunControl {
  std::mutex mu;
  std::condition_variable cv;
  std::atomic<bool> pause_requested{false};
  std::atomic<bool> stop_requested{false};
  std::vector<std::thread> threads;
  int alive = 0;   // threads not yet returned
  int parked = 0;  // threads waiting in park()
  bool paused = false;
  bool started = false;
  // How the VM ended: the first finish() or fail() wins.
  bool ended = false;
  int status = 0;
  std::optional<Error> error;
  std::function<Result<void>(Vcpu&)> dirty_ring_full;

  std::atomic<uint64_t> exits_io{0}, exits_mmio{0}, exits_hlt{0}, exits_intr{0}, exits_shutdown{0},
      exits_dirty_ring_full{0}, exits_other{0};
  uint64_t pauses = 0;
  double pause_min_us = 0, pause_max_us = 0, pause_sum_us = 0;

  // Record the end (under mu) and ask every thread to stop; the caller then kicks them.
  void finish(int exit_status);
  void fail(Error e);
};

// Installs the process-wide SIGUSR1 handler (once).
void install_kick_handler();
// Sends the kick signal to a vCPU thread.
void kick_thread(pthread_t thread);

// Runs `vcpu` until the VM stops; `kick_all` interrupts the other vCPUs when this one ends it.
void run_vcpu(Vcpu& vcpu, RunControl& ctl, IoDevices& io, const std::function<void()>& kick_all);

}  // namespace kvmig::kvm
