// Processes for the migration tests: a source VM in its own process (forked, so a test can
// kill -9 it), `kvmig receive` and `kvmig migrate` as the real binary, and the test guest's
// console read back as a guest::Report.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "guests/guest_report.h"
#include "host/control_server.h"
#include "host/machine_control.h"
#include "host/migrate_command.h"
#include "kvm/machine.h"

namespace kvmig::testing {

inline bool have_kvm() { return ::access("/dev/kvm", R_OK | W_OK) == 0; }

inline std::string guest64_path() {
  std::string p = KVMIG_GUEST;
  return p.substr(0, p.rfind("kvmig-guest.elf")) + "kvmig-guest64.elf";
}

// A test's scratch directory, made fresh for it. Removed when the test passed; kept (and
// named on stderr) when it failed or KVMIG_KEEP is set, so the logs can be read.
class ScratchDir {
 public:
  // `prefix` e.g. "/tmp/kvmig-migration"; six random characters are added.
  explicit ScratchDir(const std::string& prefix) {
    std::string tmpl = prefix + "-XXXXXX";
    if (::mkdtemp(tmpl.data())) dir_ = tmpl;
    EXPECT_FALSE(dir_.empty()) << "mkdtemp " << tmpl << ": " << std::strerror(errno);
  }
  ~ScratchDir() {
    if (dir_.empty()) return;
    if (!::testing::Test::HasFailure() && !std::getenv("KVMIG_KEEP")) {
      std::error_code ec;
      std::filesystem::remove_all(dir_, ec);
    } else {
      std::fprintf(stderr, "kept %s\n", dir_.c_str());
    }
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::string& dir() const { return dir_; }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }

 private:
  std::string dir_;
};

inline std::string read_text(const std::string& path) {
  std::stringstream ss;
  ss << std::ifstream(path).rdbuf();
  return ss.str();
}

inline guest::Report guest_report(const std::string& console) {
  guest::Report r;
  r.feed(read_text(console));
  return r;
}

inline bool wait_until(const std::function<bool()>& cond, std::chrono::milliseconds timeout) {
  auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (cond()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return cond();
}

// A child process; killed (SIGKILL) if still running when destroyed.
struct Child {
  pid_t pid = -1;
  std::optional<int> status;  // exit code, or 128 + signal

  Child() = default;
  Child(Child&& o) noexcept : pid(std::exchange(o.pid, -1)), status(o.status) {}
  ~Child() {
    if (pid > 0 && !status) {
      ::kill(pid, SIGKILL);
      int st;
      ::waitpid(pid, &st, 0);
    }
  }
  bool poll() {
    if (status || pid <= 0) return true;
    int st;
    if (::waitpid(pid, &st, WNOHANG) == pid) status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return status.has_value();
  }
  // Exit status, or nullopt after `timeout`.
  std::optional<int> wait(std::chrono::milliseconds timeout) {
    wait_until([&] { return poll(); }, timeout);
    return status;
  }
  void kill9() {
    if (pid > 0 && !status) ::kill(pid, SIGKILL);
    wait(std::chrono::seconds(10));
  }
};

// Runs `args` (args[0] a path or a command on PATH) with stdout/stderr to files and `env` ("K=V") added to this
// process's environment.
inline Child spawn(const std::vector<std::string>& args, const std::string& out, const std::string& err,
                   const std::vector<std::string>& env = {}) {
  Child c;
  c.pid = ::fork();
  if (c.pid == 0) {
    for (const std::string& kv : env) ::putenv(const_cast<char*>(kv.c_str()));
    int o = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int e = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(o, 1);
    ::dup2(e, 2);
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execvp(argv[0], argv.data());  // args[0] may be a command on PATH (ip netns exec)
    ::_exit(127);
  }
  return c;
}

// What a command printed and how it ended (-1: still running at the timeout).
struct CmdRun {
  int status = -1;
  std::string out, err;
};

// Runs `args` to completion; its output is kept in `out_base`.out and .err.
inline CmdRun run_to_end(const std::vector<std::string>& args, const std::string& out_base,
                         std::chrono::seconds timeout) {
  Child c = spawn(args, out_base + ".out", out_base + ".err");
  CmdRun r;
  r.status = c.wait(timeout).value_or(-1);
  r.out = read_text(out_base + ".out");
  r.err = read_text(out_base + ".err");
  return r;
}

struct SourceSpec {
  uint64_t memory = 256ull << 20;
  int vcpus = 1;
  std::string cmdline;
  uint32_t dirty_ring = 0;
  std::string console;
  std::string control;
};

// A VM process exactly like `kvmig vm run --control SOCK` with the migrate commands: built
// in a forked child of this (single-threaded) test process, so it can be killed like one.
inline Child start_source(const SourceSpec& spec) {
  Child c;
  c.pid = ::fork();
  if (c.pid != 0) return c;
  kvm::MachineConfig config;
  config.memory = spec.memory;
  config.vcpus = spec.vcpus;
  config.dirty_ring_entries = spec.dirty_ring;
  config.console_path = spec.console;
  auto m = kvm::Machine::create(config);
  if (!m.ok()) {
    std::fprintf(stderr, "source: %s\n", m.error().message.c_str());
    ::_exit(125);
  }
  kvm::Machine& vm = **m;
  if (auto r = vm.load_kernel(guest64_path(), spec.cmdline); !r.ok()) {
    std::fprintf(stderr, "source: %s\n", r.error().message.c_str());
    ::_exit(125);
  }
  {
    host::ControlServer control;
    host::register_machine_commands(control, vm);
    host::register_migrate_commands(control, vm);
    if (auto r = control.start(spec.control); !r.ok()) ::_exit(125);
    if (!vm.start().ok()) ::_exit(125);
    auto status = vm.wait();
    control.stop();
    std::fflush(nullptr);
    ::_exit(status.ok() ? *status : 125);
  }
}

}  // namespace kvmig::testing
