// `kvmig vm run`: boots a kernel in kvmig's micro-VMM and runs it until the guest leaves
// through the exit port; kvmig's exit status is the guest's. kvmig's own failures (bad
// input, KVM errors, a triple fault) print one line and exit with kVmError.
// With --site DIR the VM is registered in that site's registry (UUID, name, control socket)
// for `kvmig status`/`recover`, and a migration away records source_released there.
#include <signal.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>

#include "host/control_server.h"
#include "cli/vm_state_command.h"
#include "host/machine_control.h"
#include "host/micro_vm_site.h"
#include "host/migrate_command.h"
#include "host/site_records.h"
#include "kvm/guest_memory.h"
#include "kvm/machine.h"

namespace {

using kvmig::kvm::Machine;
using kvmig::kvm::MachineConfig;

constexpr int kVmError = 125;  // kvmig itself failed (as `docker run` does), not the guest

struct VmRunOptions {
  std::string kernel;
  std::string memory = "1G";
  int vcpus = 1;
  std::string cmdline;
  std::string console;
  bool hugepages = false;
  std::string control;
  bool no_control = false;
  uint32_t dirty_ring = 0;
  bool verbose = false;
  std::string site;
  std::string uuid;
  std::string name;
  std::vector<std::string> disks;
};

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "kvmig: error: %s\n", message.c_str());
  throw CLI::RuntimeError(kVmError);
}

// SIGINT/SIGTERM end the VM cleanly (socket removed, console flushed) instead of killing
// kvmig mid-write. block_stop_signals() runs before any thread starts (every thread inherits
// the mask), so only StopOnSignal's thread ever takes them.
sigset_t stop_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

void block_stop_signals() {
  sigset_t set = stop_signals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

class StopOnSignal {
 public:
  explicit StopOnSignal(Machine& machine) : set_(stop_signals()) {
    thread_ = std::thread([this, &machine] {
      timespec tick{0, 100 * 1000 * 1000};
      while (!done_) {
        int sig = sigtimedwait(&set_, nullptr, &tick);
        if (sig > 0) machine.stop(128 + sig);
      }
    });
  }
  ~StopOnSignal() {
    done_ = true;
    thread_.join();
  }

 private:
  sigset_t set_;
  std::atomic<bool> done_{false};
  std::thread thread_;
};

void print_stats(const Machine& machine) {
  kvmig::kvm::MachineStats s = machine.stats();
  std::fprintf(stderr,
               "kvmig: vm: create %.3f ms, first console byte %.3f ms after start; exits io=%llu mmio=%llu intr=%llu "
               "other=%llu; unknown io=%llu mmio=%llu; pauses=%llu (min/avg/max %.1f/%.1f/%.1f us)\n",
               s.create_us / 1000.0, s.first_console_byte_us / 1000.0, (unsigned long long)s.exits_io,
               (unsigned long long)s.exits_mmio, (unsigned long long)s.exits_intr, (unsigned long long)s.exits_other,
               (unsigned long long)s.unknown_io, (unsigned long long)s.unknown_mmio, (unsigned long long)s.pauses,
               s.pause_min_us, s.pause_avg_us, s.pause_max_us);
}

int run_vm(const VmRunOptions& opt, std::chrono::steady_clock::time_point start) {
  block_stop_signals();
  auto memory = kvmig::kvm::parse_size(opt.memory);
  if (!memory.ok()) fail("--memory: " + memory.error().message);
  // Identity and site first: bad input must fail before a VM is built.
  kvmig::cli::VmSite vm_site = kvmig::cli::open_vm_site(opt.uuid, opt.name, opt.site, opt.no_control);
  auto& site = vm_site.site;
  const kvmig::host::MigrateIdentity& identity = vm_site.identity;
  MachineConfig config;
  config.memory = *memory;
  config.vcpus = opt.vcpus;
  config.hugepages = opt.hugepages;
  config.dirty_ring_entries = opt.dirty_ring;
  config.console_path = opt.console;
  config.start_time = start;

  auto machine = Machine::create(config);
  if (!machine.ok()) fail(machine.error().message);
  Machine& vm = **machine;
  if (auto r = vm.load_kernel(opt.kernel, opt.cmdline); !r.ok()) fail(r.error().message);
  kvmig::cli::attach_disks(vm, opt.disks);
  if (opt.verbose) std::fprintf(stderr, "kvmig: vm: cmdline '%s'\n", vm.cmdline().c_str());

  kvmig::host::ControlServer control;
  kvmig::host::register_machine_commands(control, vm);
  kvmig::cli::register_state_commands(control, vm);
  kvmig::host::register_migrate_commands(control, vm, identity);
  kvmig::cli::start_control(control, opt.control, opt.no_control, opt.verbose, vm_site);

  StopOnSignal stop_on_signal(vm);
  if (auto r = vm.start(); !r.ok()) {
    control.stop();
    if (site) site->leave();
    fail(r.error().message);
  }
  auto status = vm.wait();
  control.stop();
  if (site) site->leave();
  if (opt.verbose) {
    print_stats(vm);
    kvmig::cli::print_disk_stats(vm);
  }
  if (!status.ok()) fail(status.error().message);
  return *status;
}

}  // namespace

void add_vm_command(CLI::App& app) {
  CLI::App* vm = app.add_subcommand("vm", "Run and control kvmig micro-VMs");
  vm->require_subcommand(1);
  auto opt = std::make_shared<VmRunOptions>();
  CLI::App* run = vm->add_subcommand("run", "Boot a Multiboot ELF32 or ELF64 kernel and run it until it exits");
  run->add_option("--kernel", opt->kernel, "Kernel: Multiboot ELF32 (as qemu -kernel) or ELF64 (entered in long mode)")
      ->required();
  run->add_option("--memory", opt->memory, "Guest RAM, e.g. 512M, 1G (default 1G)");
  run->add_option("--vcpus", opt->vcpus, "Number of vCPUs (default 1)")->check(CLI::Range(1, 254));
  run->add_option("--cmdline", opt->cmdline, "Kernel command line (tsc_khz=N is appended when missing)");
  run->add_option("--console", opt->console, "Write the guest's port-0xe9 console to this file (default stdout)");
  run->add_flag("--hugepages", opt->hugepages, "Back guest RAM with reserved 2 MiB hugetlbfs pages");
  run->add_option("--control", opt->control, "Control socket path (default /run/kvmig/vm-<pid>.sock)");
  run->add_flag("--no-control", opt->no_control, "Do not open a control socket");
  run->add_option("--dirty-ring", opt->dirty_ring, "Dirty ring entries per vCPU (power of two; 0 = bitmap)");
  run->add_option("--site", opt->site, "Register the VM in this site (made by `kvmig site init`) for status/recover");
  run->add_option("--uuid", opt->uuid, "The VM's UUID (default: a new one with --site); carried to the destination");
  run->add_option("--name", opt->name, "The VM's name in the site registry (needs --site; default its UUID)");
  run->add_option("--disk", opt->disks,
                  "Attach a disk: PATH[,block=SIZE] (raw image or block device, or the top of a kvmig "
                  "base + delta chain, recognised by its PATH.kvmig-delta descriptor; block = write-tracking "
                  "granularity, 4K..2M, default 64K); repeatable, up to 4");
  run->add_flag("-v,--verbose", opt->verbose, "Print boot timing and exit counters on stderr");
  run->callback([opt] {
    auto start = std::chrono::steady_clock::now();
    int status = run_vm(*opt, start);
    if (status != 0) throw CLI::RuntimeError(status);
  });
}
