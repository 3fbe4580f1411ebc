// The fault matrix's bench (tests/integration/fault_*_test.cc): two sites, a group of micro-VMs
// started in parallel at the source (`kvmig vm run --site`), one `kvmig receive --site` per VM,
// `kvmig migrate` under one migration id, and the checks every fault case ends with:
// `kvmig status` per VM, `kvmig recover`, then each VM running exactly once (its live,
// unpaused copies counted through both sides' control sockets) with its guest verifier still
// counting passes and no errors.
//
// Phases are hit exactly through the KVMIG_FAULT test hook (helper/fault_point.h): the side
// stops itself (SIGSTOP) at the step, the test sees it stopped, does its fault, then lets it
// go on (SIGCONT) or kills it.
#pragma once

#include <signal.h>
#include <sys/wait.h>

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "tests/integration/migration_harness.h"

namespace kvmig::testing {

using namespace std::chrono_literals;

#define REQUIRE_FAULT_GUEST()                                                                  \
  if (!have_kvm()) GTEST_SKIP() << "/dev/kvm is not available: the fault matrix runs real VMs"; \
  if (::access(guest64_path().c_str(), R_OK) != 0) GTEST_SKIP() << "test guest not built"

// `args` run with `env` ("K=V") added to this process's environment.
inline Child spawn_env(const std::vector<std::string>& args, const std::vector<std::string>& env,
                       const std::string& out, const std::string& err) {
  return spawn(args, out, err, env);
}

// Child has no move assignment: `to` takes `from`'s process (to's own, if any, is ended).
inline void assign(Child& to, Child from) {
  std::swap(to.pid, from.pid);
  std::swap(to.status, from.status);
}

// Whether `pid` is stopped (SIGSTOP): state T in /proc/PID/stat.
inline bool is_stopped(pid_t pid) {
  std::string stat = read_text("/proc/" + std::to_string(pid) + "/stat");
  size_t paren = stat.rfind(')');
  return paren != std::string::npos && paren + 2 < stat.size() && stat[paren + 2] == 'T';
}

// One VM of the group: its source process, its receiver, its migrate command.
struct GroupVm {
  std::string tag, uuid;
  Child source, receiver, migrate;
};

class FaultBed : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kvmig-fault-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    prepare_sites();
    if (HasFatalFailure() || IsSkipped()) return;
    ASSERT_EQ(kvmig({"site", "init", src_site()}).status, 0);
    ASSERT_EQ(kvmig({"site", "init", dst_site()}).status, 0);
  }
  void TearDown() override {
    for (GroupVm& vm : vms_) {  // a stopped process cannot die of SIGKILL until continued
      if (vm.receiver.pid > 0) ::kill(vm.receiver.pid, SIGCONT);
      if (vm.source.pid > 0) ::kill(vm.source.pid, SIGCONT);
    }
    vms_.clear();
    if (!HasFailure() && !std::getenv("KVMIG_KEEP")) std::filesystem::remove_all(dir_);
    else std::fprintf(stderr, "kept %s\n", dir_.c_str());
  }
  // Before the sites are made (e.g. to put one on a file system of its own).
  virtual void prepare_sites() {}
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  virtual std::string src_site() const { return path("src-site"); }
  virtual std::string dst_site() const { return path("dst-site"); }

  CmdRun kvmig(std::vector<std::string> args, std::chrono::seconds timeout = 60s) {
    std::string tag = "cmd" + std::to_string(++cmds_);
    args.insert(args.begin(), KVMIG_BINARY);
    return run_to_end(args, path(tag), timeout);
  }

  // n VMs (64 MiB, the verifier writing 8 MiB at 8 MiB/s), booted in parallel; each has run a
  // verified pass when this returns.
  // `env[i]` is added to VM i's environment (e.g. a KVMIG_FAULT for its source session).
  void start_group(int n, const std::vector<std::vector<std::string>>& env = {}) {
    static const char* kUuids[] = {"5a1d0c3e-0001-4e6f-9a0b-00000000f501", "5a1d0c3e-0002-4e6f-9a0b-00000000f502",
                                   "5a1d0c3e-0003-4e6f-9a0b-00000000f503", "5a1d0c3e-0004-4e6f-9a0b-00000000f504"};
    for (int i = 0; i < n; ++i) {
      GroupVm vm;
      vm.tag = std::string(1, static_cast<char>('a' + i));
      vm.uuid = kUuids[i];
      assign(vm.source, spawn_env({KVMIG_BINARY, "vm", "run", "--kernel", guest64_path(), "--memory", "64M", "--cmdline",
                         "ws=8M pattern=seq rate=8 passes=0 report_ms=50", "--console", path(vm.tag + ".console"),
                         "--control", path(vm.tag + ".ctl"), "--site", src_site(), "--uuid", vm.uuid, "--name",
                         "vm-" + vm.tag},
                        i < static_cast<int>(env.size()) ? env[i] : std::vector<std::string>{},
                        path(vm.tag + ".vm.out"), path(vm.tag + ".vm.err")));
      vms_.push_back(std::move(vm));
    }
    for (GroupVm& vm : vms_)
      ASSERT_TRUE(wait_until([&] { return !guest_report(path(vm.tag + ".console")).passes.empty() || vm.source.poll(); },
                             60s))
          << read_text(path(vm.tag + ".vm.err"));
  }
  // `prefix` runs the receiver through another command (e.g. `ip netns exec NS`).
  void start_receiver(GroupVm& vm, const std::string& listen, const std::vector<std::string>& env = {},
                      const std::vector<std::string>& prefix = {}) {
    std::vector<std::string> args = prefix;
    for (const std::string& a : std::vector<std::string>{KVMIG_BINARY, "receive", "--listen", listen, "--console",
                                                         path(vm.tag + ".dst.console"), "--control",
                                                         path(vm.tag + ".dst.ctl"), "--site", dst_site()})
      args.push_back(a);
    assign(vm.receiver, spawn_env(args, env, path(vm.tag + ".recv.out"), path(vm.tag + ".recv.err")));
    ASSERT_TRUE(wait_until(
        [&] {
          return read_text(path(vm.tag + ".recv.err")).find("listening on") != std::string::npos || vm.receiver.poll();
        },
        20s))
        << read_text(path(vm.tag + ".recv.err"));
    ASSERT_FALSE(vm.receiver.poll()) << read_text(path(vm.tag + ".recv.err"));
  }
  void start_migrate(GroupVm& vm, const std::string& to, const std::string& id) {
    assign(vm.migrate, spawn({KVMIG_BINARY, "migrate", path(vm.tag + ".ctl"), "--to", to, "--migration", id, "--json",
                              "--max-downtime", "50"},
                             path(vm.tag + ".mig.out"), path(vm.tag + ".mig.err")));
  }
  std::string why(const GroupVm& vm) {
    return "vm " + vm.tag + "\n--- source:\n" + read_text(path(vm.tag + ".vm.err")) + "--- receiver:\n" +
           read_text(path(vm.tag + ".recv.err")) + "--- migrate:\n" + read_text(path(vm.tag + ".mig.err")) +
           read_text(path(vm.tag + ".mig.out"));
  }
  std::string source_phase(const GroupVm& vm) {
    auto p = host::control_request(path(vm.tag + ".ctl"), {{"cmd", "migrate-progress"}});
    return p.ok() ? p->value("phase", std::string()) : std::string();
  }

  // status --json: {uuid: verdict}; `reasons` gets each VM's reason.
  std::map<std::string, std::string> verdicts(const std::string& id, int want_status,
                                              std::map<std::string, std::string>* reasons = nullptr) {
    std::vector<std::string> args{"status", "--site", dst_site(), "--source-site", src_site(), "--migration", id,
                                  "--json"};
    for (const GroupVm& vm : vms_) args.insert(args.end(), {"--vm", vm.uuid});
    CmdRun r = kvmig(args);
    EXPECT_EQ(r.status, want_status) << r.out << r.err;
    std::map<std::string, std::string> out;
    auto j = nlohmann::json::parse(r.out, nullptr, false);
    if (j.is_discarded() || !j.contains("vms")) {
      ADD_FAILURE() << "status printed no JSON: " << r.out << r.err;
      return out;
    }
    for (const auto& vm : j["vms"]) {
      out[vm["vm_uuid"].get<std::string>()] = vm["verdict"].get<std::string>();
      if (reasons) (*reasons)[vm["vm_uuid"].get<std::string>()] = vm["reason"].get<std::string>();
    }
    return out;
  }
  std::map<std::string, std::string> all(const std::string& verdict) {
    std::map<std::string, std::string> m;
    for (const GroupVm& vm : vms_) m[vm.uuid] = verdict;
    return m;
  }
  CmdRun recover(const std::string& id) {
    std::vector<std::string> args{"recover", "--site", dst_site(), "--source-site", src_site(), "--migration", id,
                                  "--json"};
    for (const GroupVm& vm : vms_) args.insert(args.end(), {"--vm", vm.uuid});
    return kvmig(args);
  }

  // The copies of `vm` that run (answer on their control socket and are not paused).
  int running_copies(const GroupVm& vm) {
    int n = 0;
    for (const std::string& ctl : {path(vm.tag + ".ctl"), path(vm.tag + ".dst.ctl")}) {
      auto s = host::control_request(ctl, {{"cmd", "stats"}});
      if (s.ok() && s->value("ok", false) && !s->value("paused", true)) ++n;
    }
    return n;
  }
  // The VM runs exactly once, on `side` ("source" or "destination"), and its verifier there
  // keeps counting passes without an error.
  void expect_runs_once_at(const GroupVm& vm, const std::string& side) {
    EXPECT_EQ(running_copies(vm), 1) << why(vm);
    std::string console = path(vm.tag + (side == "source" ? ".console" : ".dst.console"));
    auto before = guest_report(console).passes.size();
    EXPECT_TRUE(wait_until([&] { return guest_report(console).passes.size() > before + 1; }, 20s))
        << "vm " << vm.tag << " does not run on at the " << side << "\n" << why(vm);
    guest::Report r = guest_report(console);
    EXPECT_TRUE(r.corrupt.empty() && r.errors.empty()) << "vm " << vm.tag << ": " << read_text(console);
    for (const guest::PassLine& p : r.passes) EXPECT_EQ(p.errors, 0u) << "vm " << vm.tag;
  }

  std::string dir_;
  std::vector<GroupVm> vms_;
  int cmds_ = 0;
};

}  // namespace kvmig::testing
