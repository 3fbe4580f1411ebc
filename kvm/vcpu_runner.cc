#include "kvm/vcpu_runner.h"

#include "kvm/kvm_uapi.h"
#include <signal.h>

#include <cerrno>
#include <cstring>
#include <mutex>

#include "kvm/io_devices.h"
#include "kvm/ioctl.h"
#include "kvm/vcpu.h"

namespace kvmig::kvm {

namespace {

constexpr int kKickSignal = SIGUSR1;
thread_local kvm_run* t_run = nullptr;

void on_kick(int) {
  kvm_run* run = t_run;
  if (run) __atomic_store_n(&run->immediate_exit, 1, __ATOMIC_RELAXED);
}

void park(RunControl& ctl) {
  std::unique_lock lock(ctl.mu);
  ++ctl.parked;
  ctl.cv.notify_all();
  ctl.cv.wait(lock, [&] { return !ctl.pause_requested.load() || ctl.stop_requested.load(); });
  --ctl.parked;
}

std::string vcpu_name(const Vcpu& vcpu) { return "vCPU " + std::to_string(vcpu.index()); }

}  // namespace

void RunControl::finish(int exit_status) {
  std::lock_guard lock(mu);
  if (!ended) {
    ended = true;
    status = exit_status;
  }
  stop_requested.store(true);
  cv.notify_all();
}

void RunControl::fail(Error e) {
  std::lock_guard lock(mu);
  if (!ended) {
    ended = true;
    error = std::move(e);
  }
  stop_requested.store(true);
  cv.notify_all();
}

void install_kick_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_handler = on_kick;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  // no SA_RESTART: KVM_RUN must return EINTR
    sigaction(kKickSignal, &sa, nullptr);
  });
}

void kick_thread(pthread_t thread) { pthread_kill(thread, kKickSignal); }

void run_vcpu(Vcpu& vcpu, RunControl& ctl, IoDevices& io, const std::function<void()>& kick_all) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, kKickSignal);
  pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
  kvm_run* run = vcpu.run();
  t_run = run;
  // After an I/O or MMIO exit, KVM finishes the instruction only on the next KVM_RUN; a
  // vCPU parked before that would be saved mid-instruction. So a pause first re-enters with
  // immediate_exit set: KVM completes the instruction and returns EINTR without running
  // another. An instruction that needs more exits (an MMIO access KVM splits in fragments,
  // e.g. one straddling a page boundary) returns with its next exit instead, which is
  // handled like any other, and the vCPU re-enters until KVM says EINTR. Parking at that
  // next exit would drop it: that part of a write never reaches the device, a read would
  // complete on resume with stale data (tests/integration/vcpu_pause_io_test.cc).
  bool pending_completion = false;

  auto end_with = [&](Error e) {
    ctl.fail(std::move(e));
    kick_all();
  };

  while (true) {
    __atomic_store_n(&run->immediate_exit, 0, __ATOMIC_SEQ_CST);
    if (ctl.stop_requested.load()) break;
    if (ctl.pause_requested.load()) {
      if (!pending_completion) {
        park(ctl);
        continue;
      }
      __atomic_store_n(&run->immediate_exit, 1, __ATOMIC_SEQ_CST);  // complete, run no further
    }

    auto r = kvm_ioctl(vcpu.fd(), KVM_RUN, "KVM_RUN");
    // EAGAIN: an AP waiting for SIPI was woken (INIT/SIPI arrived); KVM wants another run.
    if (!r.ok() && r.error().sys_errno == EAGAIN) continue;
    if (!r.ok()) {
      end_with(std::move(r.error().prefix(vcpu_name(vcpu))));
      break;
    }
    pending_completion = false;
    if (*r == -EINTR) {
      ctl.exits_intr.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    switch (run->exit_reason) {
      case KVM_EXIT_IO: {
        ctl.exits_io.fetch_add(1, std::memory_order_relaxed);
        auto* data = reinterpret_cast<uint8_t*>(run) + run->io.data_offset;
        auto res = io.handle_io(vcpu.index(), run->io.port, run->io.direction == KVM_EXIT_IO_OUT, run->io.size,
                                run->io.count, data);
        pending_completion = true;
        if (res.exit) {
          ctl.finish(static_cast<int>(res.status));
          kick_all();
        }
        break;
      }
      case KVM_EXIT_MMIO:
        ctl.exits_mmio.fetch_add(1, std::memory_order_relaxed);
        io.handle_mmio(vcpu.index(), run->mmio.phys_addr, run->mmio.is_write, run->mmio.len, run->mmio.data);
        pending_completion = true;
        break;
      case KVM_EXIT_HLT:
        // Only without an in-kernel LAPIC; kvmig always has one, so just go on.
        ctl.exits_hlt.fetch_add(1, std::memory_order_relaxed);
        break;
      case KVM_EXIT_INTR:
      case KVM_EXIT_IRQ_WINDOW_OPEN:
        ctl.exits_intr.fetch_add(1, std::memory_order_relaxed);
        break;
      case KVM_EXIT_SHUTDOWN:
        ctl.exits_shutdown.fetch_add(1, std::memory_order_relaxed);
        end_with(Error{"guest triple fault (KVM_EXIT_SHUTDOWN) on " + vcpu.dump_registers()});
        break;
      case KVM_EXIT_DIRTY_RING_FULL: {
        ctl.exits_dirty_ring_full.fetch_add(1, std::memory_order_relaxed);
        Result<void> res = ctl.dirty_ring_full ? ctl.dirty_ring_full(vcpu)
                                               : Result<void>(Error{vcpu_name(vcpu) + ": dirty ring full and nobody harvests it"});
        if (!res.ok()) end_with(res.error());
        break;
      }
      case KVM_EXIT_FAIL_ENTRY:
        ctl.exits_other.fetch_add(1, std::memory_order_relaxed);
        end_with(Error{"KVM_RUN: entry failed, hardware reason " +
                       std::to_string(run->fail_entry.hardware_entry_failure_reason) + " on " + vcpu.dump_registers()});
        break;
      case KVM_EXIT_INTERNAL_ERROR:
        ctl.exits_other.fetch_add(1, std::memory_order_relaxed);
        end_with(Error{"KVM_RUN: internal error, suberror " + std::to_string(run->internal.suberror) + " on " +
                       vcpu.dump_registers()});
        break;
      case KVM_EXIT_SYSTEM_EVENT:
        ctl.exits_other.fetch_add(1, std::memory_order_relaxed);
        end_with(Error{vcpu_name(vcpu) + ": guest requested system event " + std::to_string(run->system_event.type)});
        break;
      default:
        ctl.exits_other.fetch_add(1, std::memory_order_relaxed);
        end_with(Error{vcpu_name(vcpu) + ": unexpected KVM exit reason " + std::to_string(run->exit_reason) + " on " +
                       vcpu.dump_registers()});
        break;
    }
  }
  t_run = nullptr;
}

}  // namespace kvmig::kvm
