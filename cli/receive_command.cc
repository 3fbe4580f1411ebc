// `kvmig receive --listen ADDR`: the destination of a live migration. Waits for one
// `kvmig migrate`, builds the VM from its HELLO, fills it, and on COMMIT runs it on, as
// `kvmig vm run` would: the exit status is then the guest's, and the VM answers on its own
// control socket (so it can be migrated on). A failed or aborted migration discards
// everything and exits 1 with the reason.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <memory>
#include <string>

#include "helper/migration_destination.h"
#include "helper/transport.h"
#include "host/control_server.h"
#include "host/machine_control.h"
#include "cli/vm_state_command.h"
#include "host/migrate_command.h"

namespace {

constexpr int kFailed = 1;
constexpr int kVmError = 125;

struct ReceiveOptions {
  std::string listen;
  std::string console;
  std::string control;
  bool no_control = false;
  int accept_timeout_s = 0;
};

[[noreturn]] void fail(int status, const std::string& message) {
  std::fprintf(stderr, "kvmig: receive: %s\n", message.c_str());
  throw CLI::RuntimeError(status);
}

int run_receive(const ReceiveOptions& opt) {
  auto start = std::chrono::steady_clock::now();
  auto ep = kvmig::helper::parse_endpoint(opt.listen);
  if (!ep.ok()) fail(kVmError, "--listen: " + ep.error().message);
  kvmig::helper::TransportOptions topt;
  auto listener = kvmig::helper::Listener::listen(*ep, topt);
  if (!listener.ok()) fail(kVmError, listener.error().message);
  std::fprintf(stderr, "kvmig: receive: listening on %s\n",
               kvmig::helper::to_string(listener->endpoint()).c_str());
  auto conn = listener->accept();
  if (!conn.ok()) fail(kFailed, "accept: " + conn.error().message);

  kvmig::helper::DestinationOptions dopt;
  dopt.console_path = opt.console;
  dopt.start_time = start;
  auto got = kvmig::helper::receive_machine(*conn, dopt);
  if (!got.ok()) fail(kFailed, "migration failed, nothing kept: " + got.error().message);
  kvmig::kvm::Machine& vm = *got->machine;
  timespec mono{};
  clock_gettime(CLOCK_MONOTONIC, &mono);
  double resumed_us = std::chrono::duration<double, std::micro>(got->resumed_at.time_since_epoch()).count();
  std::fprintf(stderr,
               "kvmig: receive: migration %s completed: %u rounds, %llu pages (%llu zero), %s; VM resumed "
               "at monotonic %.0f us (COMMIT to resume %.3f ms)\n",
               got->migration_id.c_str(), got->rounds, (unsigned long long)got->pages,
               (unsigned long long)got->zero_pages, got->verified ? "memory verified" : "not verified",
               resumed_us, got->commit_to_resume_ms);

  kvmig::host::ControlServer control;
  kvmig::host::register_machine_commands(control, vm);
  kvmig::host::register_migrate_commands(control, vm);
  kvmig::cli::register_state_commands(control, vm);
  if (!opt.no_control) {
    std::string path = opt.control.empty() ? kvmig::host::ControlServer::default_path() : opt.control;
    if (auto r = control.start(path); !r.ok()) {
      if (!opt.control.empty()) std::fprintf(stderr, "kvmig: receive: warning: --control: %s\n", r.error().message.c_str());
      else std::fprintf(stderr, "kvmig: receive: warning: no control socket: %s\n", r.error().message.c_str());
    }
  }
  auto status = vm.wait();
  control.stop();
  if (!status.ok()) fail(kVmError, status.error().message);
  return *status;
}

}  // namespace

void add_receive_command(CLI::App& app) {
  auto opt = std::make_shared<ReceiveOptions>();
  CLI::App* cmd = app.add_subcommand("receive", "Receive a live-migrated VM and run it");
  cmd->add_option("--listen", opt->listen, "Where to listen: ADDR:PORT or unix:PATH")->required();
  cmd->add_option("--console", opt->console, "Write the guest's console to this file (default stdout)");
  cmd->add_option("--control", opt->control, "Control socket path once the VM runs (default /run/kvmig/vm-<pid>.sock)");
  cmd->add_flag("--no-control", opt->no_control, "Do not open a control socket");
  cmd->callback([opt] {
    int status = run_receive(*opt);
    if (status != 0) throw CLI::RuntimeError(status);
  });
}
