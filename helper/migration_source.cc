// migrate_machine(): the source session's phases in order (setup, pre-copy, switch-over,
// commit) and, on a failure before COMMIT, the way back to a running VM here.
#include "helper/migration_source.h"

#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <optional>

#include "helper/migration_source_session.h"

namespace kvmig::helper {
namespace {

// Raises this thread's CPU priority for the switch-over (ms), as far as allowed: on a busy
// host every wake-up of the session thread (the drained socket, READY, DONE) can otherwise
// wait a scheduler slice behind other work, and the guest is paused all that time. Without
// CAP_SYS_NICE nothing changes. Restored on destruction.
class SwitchoverPriority {
 public:
  SwitchoverPriority() : tid_(static_cast<id_t>(::gettid())) {
    errno = 0;
    int old = ::getpriority(PRIO_PROCESS, tid_);
    if (errno == 0 && ::setpriority(PRIO_PROCESS, tid_, kNice) == 0) old_ = old;
  }
  ~SwitchoverPriority() {
    if (old_) (void)::setpriority(PRIO_PROCESS, tid_, *old_);
  }
  SwitchoverPriority(const SwitchoverPriority&) = delete;
  SwitchoverPriority& operator=(const SwitchoverPriority&) = delete;
  static constexpr int kNice = -10;

 private:
  id_t tid_;
  std::optional<int> old_;
};

}  // namespace

void SourceSession::fail_before_commit(const Error& error) {
  (void)throttle_.stop();
  if (tracker_) (void)tracker_->stop_tracking();
  disks_stop();
  if (conn_.control) {
    // Best effort: tell the destination why, so it discards with a reason, not a broken pipe.
    WireCode code = wire_code_of(error);
    ErrorMsg m{code == WireCode::none ? WireCode::internal : code, error.message.substr(0, kMaxErrorText)};
    (void)send_message(*conn_.control, version_,
                       code == WireCode::aborted ? MsgType::abort : MsgType::error, encode(m));
    conn_.control->shutdown();
    for (auto& d : conn_.data) d->shutdown();
  }
  if (paused_by_us_) {
    auto r = vm_.resume();
    if (!r.ok()) report_.error += "; resuming the VM failed: " + r.error().message;
    paused_by_us_ = false;
  }
}

MigrationReport SourceSession::run() {
  Result<void> r = setup();
  if (r.ok()) r = precopy();
  {
    SwitchoverPriority priority;
    if (r.ok()) r = switchover();
    if (r.ok()) r = commit();
  }
  report_.iterations = round_;
  double wire_ms = report_.precopy_ms + report_.switchover_ms;
  report_.bandwidth_mbps = wire_ms > 0 ? report_.bytes / (wire_ms / 1000) / 1e6 : 0;
  if (r.ok()) {
    report_.result = "completed";
    progress_->phase = kDone;
  } else if (commit_sent_) {
    report_.result = "in-doubt";
    report_.error = "after COMMIT: " + r.error().message +
                    " (the VM stays paused here until the status checker decides)";
    progress_->phase = kFailed;
  } else {
    report_.result = "failed";
    report_.error = r.error().message;
    fail_before_commit(r.error());
    progress_->phase = kFailed;
  }
  report_.total_ms = ms_between(start_, Clock::now());
  return report_;
}

MigrationReport migrate_machine(kvm::Machine& machine, const SourceOptions& options,
                                MigrationProgress* progress) {
  SourceSession session(machine, options, progress);
  return session.run();
}

}  // namespace kvmig::helper
