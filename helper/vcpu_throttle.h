// VcpuThrottle: slows a guest that dirties memory faster than the link can send it, by
// stunning its vCPUs for a fraction of each period (pause ... resume on a duty cycle, from
// its own thread), as QEMU's auto-converge does. The fraction is capped below 1: a frozen
// guest is a dead service, and a migration must never be the thing that kills it.
#pragma once

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <thread>

#include "base/result.h"
#include "kvm/migratable.h"

namespace kvmig::helper {

class VcpuThrottle {
 public:
  static constexpr double kMaxFraction = 0.95;
  static constexpr int kPeriodMs = 20;

  explicit VcpuThrottle(kvm::Pausable& vm) : vm_(vm) {}
  ~VcpuThrottle() { (void)stop(); }
  VcpuThrottle(const VcpuThrottle&) = delete;
  VcpuThrottle& operator=(const VcpuThrottle&) = delete;

  // Sets the stun fraction (0 = off), starting the thread on first use.
  void set(double fraction);
  double fraction() const { return fraction_.load(); }
  // Ends throttling; returns once the vCPUs run again (or the error of resuming them).
  Result<void> stop();
  // Ends throttling with the vCPUs paused (the switch-over): a guest let loose at full
  // speed between the last decision and the pause would dirty what the decision assumed
  // clean, and that is paid in downtime.
  Result<void> stop_paused();

 private:
  void loop();

  kvm::Pausable& vm_;
  std::atomic<double> fraction_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  bool leave_paused_ = false;
  std::optional<Error> error_;
  std::thread thread_;
};

}  // namespace kvmig::helper
