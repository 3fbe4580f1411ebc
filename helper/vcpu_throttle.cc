#include "helper/vcpu_throttle.h"

#include <algorithm>
#include <chrono>

namespace kvmig::helper {

void VcpuThrottle::set(double fraction) {
  fraction = std::clamp(fraction, 0.0, kMaxFraction);
  fraction_.store(fraction);
  std::lock_guard lock(mu_);
  if (fraction > 0 && !thread_.joinable()) {
    stopping_ = false;
    thread_ = std::thread([this] { loop(); });
  }
  cv_.notify_all();
}

Result<void> VcpuThrottle::stop_paused() {
  {
    std::lock_guard lock(mu_);
    leave_paused_ = true;
  }
  KVMIG_TRY(stop());
  // The thread may have been idle (no throttle) or stopped mid-run: pause here then.
  return vm_.pause();
}

Result<void> VcpuThrottle::stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
    cv_.notify_all();
  }
  if (thread_.joinable()) thread_.join();
  {
    std::lock_guard lock(mu_);
    leave_paused_ = false;
  }
  fraction_.store(0);
  std::lock_guard lock(mu_);
  if (error_) {
    Error e = *error_;
    error_.reset();
    return e;
  }
  return ok();
}

void VcpuThrottle::loop() {
  using namespace std::chrono;
  const auto period = milliseconds(kPeriodMs);
  std::unique_lock lock(mu_);
  while (!stopping_) {
    double f = fraction_.load();
    if (f <= 0) {
      cv_.wait(lock, [&] { return stopping_ || fraction_.load() > 0; });
      continue;
    }
    const auto stun = duration_cast<microseconds>(period * f);
    lock.unlock();
    auto paused = vm_.pause();
    lock.lock();
    if (!paused.ok()) {
      error_ = paused.error();
      return;
    }
    // Resumed early if stop() comes: the stun must never outlast the throttle.
    cv_.wait_for(lock, stun, [&] { return stopping_; });
    if (stopping_ && leave_paused_) return;
    auto resumed = vm_.resume();
    if (!resumed.ok()) {
      error_ = resumed.error();
      return;
    }
    cv_.wait_for(lock, period - stun, [&] { return stopping_; });
  }
}

}  // namespace kvmig::helper
