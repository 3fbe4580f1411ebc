// QemuProcess: starts one qemu-system-x86_64 and owns it by pid, so that tests and
// benchmarks that compare kvmig with QEMU stop exactly the QEMUs they started, and none
// outlives its owner (SIGKILL on destruction, and PR_SET_PDEATHSIG if the owner dies).
// qemu_guest_args() builds the command line that runs a Multiboot guest (the test guest)
// with its console on a file and QMP on a unix socket.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "base/result.h"

namespace kvmig::host {

// The first executable `name` in $PATH, or "" when there is none.
std::string find_in_path(const std::string& name);

struct QemuGuestOptions {
  std::string qemu = "qemu-system-x86_64";
  std::string accel = "kvm";  // "kvm" or "tcg"
  // Empty: "host,-arch-capabilities" with kvm (kvm-pvm refuses IA32_ARCH_CAPABILITIES, and
  // hiding it is harmless on hardware KVM), QEMU's default model with tcg.
  std::string cpu;
  std::string memory = "1280M";  // QEMU -m syntax
  int smp = 1;
  std::string kernel;   // Multiboot ELF32
  std::string append;   // guest command line
  std::string qmp_socket;
  std::string console_path;  // the guest's port 0xe9 output goes to this file
  // "defer" for a destination (then migrate-incoming), a URI, or "" for a source.
  std::string incoming;
  std::vector<std::string> extra;  // appended as is
};

// The full argv (argv[0] = options.qemu). Fails when a required option is empty or invalid.
Result<std::vector<std::string>> qemu_guest_args(const QemuGuestOptions& options);

class QemuProcess {
 public:
  using Ms = std::chrono::milliseconds;

  // Starts argv[0] (a path, or a name looked up in $PATH) with stdin on /dev/null and
  // stdout+stderr appended to `log_path` (or /dev/null when empty).
  static Result<QemuProcess> start(const std::vector<std::string>& argv,
                                   const std::string& log_path = "");

  QemuProcess() = default;
  QemuProcess(QemuProcess&& other) noexcept;
  QemuProcess& operator=(QemuProcess&& other) noexcept;
  QemuProcess(const QemuProcess&) = delete;
  QemuProcess& operator=(const QemuProcess&) = delete;
  ~QemuProcess();  // kill() if still running

  pid_t pid() const { return pid_; }
  bool running();  // reaps the child if it has exited
  // Waits for the process to exit; returns its exit code (128 + signal if killed).
  Result<int> wait(Ms timeout);
  // SIGTERM, then SIGKILL if it has not exited within `grace`; returns the exit code.
  int terminate(Ms grace = Ms(3000));
  void kill();  // SIGKILL and reap; no-op when not running
  const std::string& log_path() const { return log_path_; }
  // The last `max_bytes` of the log, for error messages ("qemu-system-x86_64: ...").
  std::string log_tail(size_t max_bytes = 400) const;

 private:
  bool reap(bool block);

  pid_t pid_ = -1;
  int exit_code_ = -1;
  std::string log_path_;
};

// Reads a file that another process appends to (a QEMU console file), a chunk at a time.
class FileTail {
 public:
  explicit FileTail(std::string path) : path_(std::move(path)) {}
  // Bytes appended since the last call; "" when none or when the file does not exist yet.
  Result<std::string> read_new();

 private:
  std::string path_;
  uint64_t offset_ = 0;
};

}  // namespace kvmig::host
