// `kvmig receive --listen ADDR`: the destination of a live migration. Waits for one
// `kvmig migrate`, builds the VM from its HELLO, fills it, and on COMMIT runs it on, as
// `kvmig vm run` would: the exit status is then the guest's, and the VM answers on its own
// control socket (so it can be migrated on). A failed or aborted migration discards
// everything and exits 1 with the reason.
// With --site DIR (a site made by `kvmig site init`; it is not created here, see
// host/micro_vm_site.h) the session records migration_started and the placeholder before
// HELLO_ACK, migration_completed before the VM's first instruction, aborted on failure.
// With --disk PATH (once per disk of the source VM) the VM's disks move with it: each copy is
// opened (created) when the source declares its disks, long before the source pauses.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <array>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "helper/migration_destination.h"
#include "helper/transport.h"
#include "host/control_server.h"
#include "host/machine_control.h"
#include "cli/vm_state_command.h"
#include "host/micro_vm_site.h"
#include "host/migrate_command.h"
#include "host/site_records.h"

namespace {

constexpr int kFailed = 1;
constexpr int kVmError = 125;

struct ReceiveOptions {
  std::string listen;
  std::string console;
  std::string control;
  bool no_control = false;
  int accept_timeout_s = 0;
  std::string site;
  std::vector<std::string> disks;  // the copies of the source VM's disks, in its disk order
};

// ReceivedMachine does not say which VM arrived; the session's events do. Forwards to the
// site when there is one, and keeps the UUID so the VM migrates on under the same identity.
class ReceivedIdentity : public kvmig::helper::SessionEvents {
 public:
  explicit ReceivedIdentity(kvmig::host::MicroVmSite* site) : site_(site) {}
  kvmig::Result<void> on_started(const kvmig::helper::SessionVm& vm) override {
    if (site_) KVMIG_TRY(site_->on_started(vm));
    uuid_ = vm.uuid;
    name_ = vm.name;
    return kvmig::ok();
  }
  kvmig::Result<void> on_round(const kvmig::helper::SessionVm& vm) override {
    return site_ ? site_->on_round(vm) : kvmig::ok();
  }
  kvmig::Result<void> on_completed(const kvmig::helper::SessionVm& vm) override {
    return site_ ? site_->on_completed(vm) : kvmig::ok();
  }
  kvmig::Result<void> on_aborted(const kvmig::helper::SessionVm& vm, const std::string& reason) override {
    return site_ ? site_->on_aborted(vm, reason) : kvmig::ok();
  }
  const std::array<uint8_t, 16>& uuid() const { return uuid_; }
  const std::string& name() const { return name_; }

 private:
  kvmig::host::MicroVmSite* site_;
  std::array<uint8_t, 16> uuid_{};
  std::string name_;  // from HELLO: the VM migrates on under it
};

[[noreturn]] void fail(int status, const std::string& message) {
  std::fprintf(stderr, "kvmig: receive: %s\n", message.c_str());
  throw CLI::RuntimeError(status);
}

int run_receive(const ReceiveOptions& opt) {
  auto start = std::chrono::steady_clock::now();
  auto ep = kvmig::helper::parse_endpoint(opt.listen);
  if (!ep.ok()) fail(kVmError, "--listen: " + ep.error().message);
  std::unique_ptr<kvmig::host::MicroVmSite> site;
  if (!opt.site.empty()) {
    if (opt.no_control) fail(kVmError, "--site needs a control socket: recovery stops the VM through it");
    auto s = kvmig::host::MicroVmSite::open(opt.site);
    if (!s.ok()) fail(kVmError, "--site: " + s.error().message);
    site = std::move(*s);
  }
  ReceivedIdentity identity(site.get());
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
  dopt.events = &identity;
  dopt.disk_paths = opt.disks;
  auto got = kvmig::helper::receive_machine(*conn, dopt);
  if (!got.ok()) fail(kFailed, "migration failed, nothing kept: " + got.error().message);
  kvmig::kvm::Machine& vm = *got->machine;
  timespec mono{};
  clock_gettime(CLOCK_MONOTONIC, &mono);
  double resumed_us = std::chrono::duration<double, std::micro>(got->resumed_at.time_since_epoch()).count();
  std::fprintf(stderr,
               "kvmig: receive: migration %s of %s completed: %u rounds, %llu pages (%llu zero), %s; VM resumed "
               "at monotonic %.0f us (COMMIT to resume %.3f ms)\n",
               got->migration_id.c_str(), kvmig::host::uuid_text(identity.uuid()).c_str(), got->rounds, (unsigned long long)got->pages,
               (unsigned long long)got->zero_pages, got->verified ? "memory verified" : "not verified",
               resumed_us, got->commit_to_resume_ms);
  if (!opt.disks.empty())
    std::fprintf(stderr, "kvmig: receive: disks: %llu bytes written, final sync %.3f ms (in the pause)\n",
                 (unsigned long long)got->disk_bytes, got->disk_sync_ms);

  kvmig::host::ControlServer control;
  kvmig::host::register_machine_commands(control, vm);
  kvmig::host::register_migrate_commands(control, vm, {identity.uuid(), site.get(), identity.name()});
  kvmig::cli::register_state_commands(control, vm);
  if (!opt.no_control) {
    std::string path = opt.control.empty() ? kvmig::host::ControlServer::default_path() : opt.control;
    if (auto r = control.start(path); !r.ok()) {
      // The VM runs already: a missing socket is reported, not fatal.
      if (!opt.control.empty()) std::fprintf(stderr, "kvmig: receive: warning: --control: %s\n", r.error().message.c_str());
      else std::fprintf(stderr, "kvmig: receive: warning: no control socket: %s\n", r.error().message.c_str());
    } else if (site) {
      std::error_code ec;
      std::string socket = std::filesystem::absolute(control.path(), ec).string();
      if (ec) socket = control.path();
      if (auto c = site->set_control(socket); !c.ok())
        std::fprintf(stderr, "kvmig: receive: warning: --site: %s\n", c.error().message.c_str());
    }
  }
  auto status = vm.wait();
  control.stop();
  if (site) site->leave();
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
  cmd->add_option("--site", opt->site, "Record the migration in this site (made by `kvmig site init`)");
  cmd->add_option("--disk", opt->disks,
                  "Where the copy of the source VM's next disk goes (repeat, in its disk order): a new or "
                  "empty file, created at the disk's size (docs/disk-migration.md)");
  cmd->callback([opt] {
    int status = run_receive(*opt);
    if (status != 0) throw CLI::RuntimeError(status);
  });
}
