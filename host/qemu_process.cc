#include "host/qemu_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <thread>

#include "base/fd.h"

namespace kvmig::host {

using Clock = std::chrono::steady_clock;

std::string find_in_path(const std::string& name) {
  if (name.find('/') != std::string::npos) return access(name.c_str(), X_OK) == 0 ? name : "";
  const char* path = std::getenv("PATH");
  std::string_view rest = path ? path : "";
  while (!rest.empty()) {
    size_t colon = rest.find(':');
    std::filesystem::path candidate = std::filesystem::path(rest.substr(0, colon)) / name;
    if (access(candidate.c_str(), X_OK) == 0) return candidate.string();
    rest = colon == std::string_view::npos ? std::string_view{} : rest.substr(colon + 1);
  }
  return "";
}

Result<std::vector<std::string>> qemu_guest_args(const QemuGuestOptions& o) {
  if (o.accel != "kvm" && o.accel != "tcg")
    return Error{"QEMU accel must be kvm or tcg, not '" + o.accel + "'"};
  if (o.kernel.empty()) return Error{"QEMU guest: no kernel given"};
  if (o.qmp_socket.empty()) return Error{"QEMU guest: no QMP socket path given"};
  if (o.console_path.empty()) return Error{"QEMU guest: no console file given"};
  if (o.smp < 1 || o.smp > 32) return Error{"QEMU guest: smp must be 1..32"};
  // Commas separate QEMU's sub-options: a path with one would be cut there.
  for (const std::string* p : {&o.qmp_socket, &o.console_path})
    if (p->find(',') != std::string::npos) return Error{"QEMU guest: ',' in path " + *p};
  std::string cpu = o.cpu;
  if (cpu.empty() && o.accel == "kvm") cpu = "host,-arch-capabilities";
  std::vector<std::string> a = {
      o.qemu, "-accel", o.accel, "-m", o.memory, "-smp", std::to_string(o.smp),
      // -nographic alone would also claim stdio for the serial port and the monitor.
      "-nographic", "-serial", "none", "-monitor", "none", "-no-reboot",
      "-kernel", o.kernel, "-append", o.append,
      "-device", "isa-debugcon,iobase=0xe9,chardev=console",
      "-chardev", "file,id=console,path=" + o.console_path,
      "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
      "-qmp", "unix:" + o.qmp_socket + ",server=on,wait=off"};
  if (!cpu.empty()) a.insert(a.begin() + 1, {"-cpu", cpu});
  if (!o.incoming.empty()) a.insert(a.end(), {"-incoming", o.incoming});
  a.insert(a.end(), o.extra.begin(), o.extra.end());
  return a;
}

Result<QemuProcess> QemuProcess::start(const std::vector<std::string>& argv,
                                       const std::string& log_path) {
  if (argv.empty()) return Error{"QEMU: empty command line"};
  std::string exe = find_in_path(argv[0]);
  if (exe.empty()) return Error{"QEMU: " + argv[0] + " not found (is qemu-system-x86 installed?)"};
  Fd devnull(::open("/dev/null", O_RDWR | O_CLOEXEC));
  if (!devnull) return Error::from_errno("open /dev/null");
  Fd log;
  if (!log_path.empty()) {
    log.reset(::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
    if (!log) return Error::from_errno("QEMU: open log " + log_path);
  }
  // Everything the child needs is built before fork(): after it only async-signal-safe calls.
  std::vector<std::string> args = argv;
  std::vector<char*> cargv;
  for (std::string& s : args) cargv.push_back(s.data());
  cargv.push_back(nullptr);
  int out = log ? log.get() : devnull.get();
  pid_t parent = getpid();
  pid_t pid = ::fork();
  if (pid < 0) return Error::from_errno("QEMU: fork");
  if (pid == 0) {
    // A QEMU must not outlive the test or benchmark that started it, even if that crashes.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(126);
    dup2(devnull.get(), 0);
    dup2(out, 1);
    dup2(out, 2);
    execv(exe.c_str(), cargv.data());
    _exit(127);
  }
  QemuProcess p;
  p.pid_ = pid;
  p.log_path_ = log_path;
  return p;
}

QemuProcess::QemuProcess(QemuProcess&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)),
      exit_code_(other.exit_code_),
      log_path_(std::move(other.log_path_)) {}

QemuProcess& QemuProcess::operator=(QemuProcess&& other) noexcept {
  if (this != &other) {
    kill();
    pid_ = std::exchange(other.pid_, -1);
    exit_code_ = other.exit_code_;
    log_path_ = std::move(other.log_path_);
  }
  return *this;
}

QemuProcess::~QemuProcess() { kill(); }

bool QemuProcess::reap(bool block) {
  if (pid_ < 0) return true;
  int status = 0;
  pid_t r;
  do r = ::waitpid(pid_, &status, block ? 0 : WNOHANG);
  while (r < 0 && errno == EINTR);
  if (r == 0) return false;
  if (r < 0) {
    exit_code_ = -1;  // not our child any more (reaped elsewhere): treat as gone
  } else if (WIFEXITED(status)) {
    exit_code_ = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    exit_code_ = 128 + WTERMSIG(status);
  }
  pid_ = -1;
  return true;
}

bool QemuProcess::running() { return !reap(false); }

Result<int> QemuProcess::wait(Ms timeout) {
  auto deadline = Clock::now() + timeout;
  while (!reap(false)) {
    if (Clock::now() >= deadline)
      return Error{"QEMU pid " + std::to_string(pid_) + " still running after " +
                       std::to_string(timeout.count()) + " ms",
                   ETIMEDOUT};
    std::this_thread::sleep_for(Ms(10));
  }
  return exit_code_;
}

int QemuProcess::terminate(Ms grace) {
  if (pid_ < 0) return exit_code_;
  ::kill(pid_, SIGTERM);
  if (wait(grace)) return exit_code_;
  kill();
  return exit_code_;
}

void QemuProcess::kill() {
  if (pid_ < 0) return;
  ::kill(pid_, SIGKILL);
  reap(true);
}

std::string QemuProcess::log_tail(size_t max_bytes) const {
  if (log_path_.empty()) return "";
  Fd fd(::open(log_path_.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return "";
  struct stat st {};
  if (fstat(fd.get(), &st) != 0) return "";
  off_t from = st.st_size > static_cast<off_t>(max_bytes) ? st.st_size - max_bytes : 0;
  std::string out(static_cast<size_t>(st.st_size - from), '\0');
  ssize_t n = pread(fd.get(), out.data(), out.size(), from);
  out.resize(n > 0 ? static_cast<size_t>(n) : 0);
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  for (char& c : out)
    if (c == '\n') c = ' ';  // one-line error messages
  return out;
}

Result<std::string> FileTail::read_new() {
  Fd fd(::open(path_.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT) return std::string();
    return Error::from_errno("open " + path_);
  }
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t n = pread(fd.get(), buf, sizeof buf, static_cast<off_t>(offset_));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Error::from_errno("read " + path_);
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
    offset_ += static_cast<uint64_t>(n);
  }
  return out;
}

}  // namespace kvmig::host
