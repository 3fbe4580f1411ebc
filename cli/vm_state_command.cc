// `kvmig vm save`: asks a running VM, over its control socket, to save itself to a file.
// `kvmig vm restore`: builds an empty machine of the saved shape in this process, loads the
// file into it and runs it on, as `kvmig vm run` would (same exit status convention).
#include "cli/vm_state_command.h"

#include <limits.h>
#include <stdlib.h>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>

#include "host/machine_control.h"
#include "host/micro_vm_site.h"
#include "host/migrate_command.h"
#include "host/site_records.h"
#include "kvm/block_device.h"
#include "kvm/machine_snapshot.h"
#include "kvm/state_file.h"

namespace kvmig::cli {
namespace {

constexpr int kVmError = 125;  // kvmig itself failed, not the guest (as `kvmig vm run`)

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "kvmig: error: %s\n", message.c_str());
  throw CLI::RuntimeError(kVmError);
}

double gb_per_s(uint64_t bytes, double seconds) { return seconds > 0 ? bytes / seconds / 1e9 : 0; }

struct SaveOptions {
  std::string control;
  std::string output;
  bool keep_running = false;
};

struct RestoreOptions {
  std::string file;
  std::string console;
  std::string control;
  bool no_control = false;
  std::string site;  // as `vm run --site`: registered there, so status/recover reach it
  std::string uuid;
  std::string name;
  std::vector<std::string> disks;
  bool verbose = false;
};

// The VM process has its own working directory: send it an absolute path.
std::string absolute(const std::string& path) {
  if (!path.empty() && path[0] == '/') return path;
  char cwd[PATH_MAX];
  if (::getcwd(cwd, sizeof(cwd)) == nullptr) fail("getcwd: " + std::string(std::strerror(errno)));
  return std::string(cwd) + "/" + path;
}

void run_save(const SaveOptions& opt) {
  nlohmann::json request{{"cmd", "save"}, {"path", absolute(opt.output)},
                         {"keep_running", opt.keep_running}};
  auto reply = host::control_request(opt.control, request);
  if (!reply.ok()) fail(reply.error().message);
  if (!reply->value("ok", false)) fail("save: " + reply->value("error", std::string("no reason given")));
  std::fprintf(stderr, "kvmig: saved %s: %.2f GiB guest, %.1f MiB of pages, %.3f s (%.2f GB/s)\n",
               opt.output.c_str(), reply->value("guest_bytes", 0.0) / (1ull << 30),
               reply->value("data_bytes", 0.0) / (1 << 20), reply->value("seconds", 0.0),
               gb_per_s(reply->value("guest_bytes", 0ull), reply->value("seconds", 0.0)));
  if (opt.keep_running) return;
  // The VM ends now; its process may close the socket before the reply gets out, which is
  // fine: the save itself was already confirmed.
  auto stopped = host::control_request(opt.control, {{"cmd", "stop"}, {"status", 0}});
  if (stopped.ok() && !stopped->value("ok", false))
    fail("stop after save: " + stopped->value("error", std::string("no reason given")));
}

int run_restore(const RestoreOptions& opt) {
  // Identity and site before anything is built, as `vm run` checks them.
  VmSite vm_site = open_vm_site(opt.uuid, opt.name, opt.site, opt.no_control);
  auto& site = vm_site.site;
  const host::MigrateIdentity& identity = vm_site.identity;
  auto reader = kvm::StateFileReader::open(opt.file);
  if (!reader.ok()) fail(reader.error().message);
  auto config = kvm::read_machine_config(*reader);
  if (!config.ok()) fail(config.error().message);
  config->console_path = opt.console;

  auto machine = kvm::Machine::create(*config);
  if (!machine.ok()) fail(machine.error().message);
  kvm::Machine& vm = **machine;
  // The disks' contents are not in the state file, only their ring positions: the same
  // disks must be attached, in the same order, before the state is restored.
  attach_disks(vm, opt.disks);
  auto stats = kvm::restore_machine(*reader, vm);
  if (!stats.ok()) fail(stats.error().message);
  std::fprintf(stderr, "kvmig: restored %s: %.2f GiB guest, %.1f MiB of pages, %.3f s (%.2f GB/s)\n",
               opt.file.c_str(), stats->guest_bytes / double(1ull << 30),
               stats->data_bytes / double(1 << 20), stats->seconds,
               gb_per_s(stats->guest_bytes, stats->seconds));

  host::ControlServer control;
  host::register_machine_commands(control, vm);
  host::register_migrate_commands(control, vm, identity);
  register_state_commands(control, vm);
  start_control(control, opt.control, opt.no_control, opt.verbose, vm_site);
  if (auto r = vm.start(); !r.ok()) {
    control.stop();
    if (site) site->leave();
    fail(r.error().message);
  }
  auto status = vm.wait();
  control.stop();
  if (site) site->leave();
  if (opt.verbose) print_disk_stats(vm);
  if (!status.ok()) fail(status.error().message);
  return *status;
}

}  // namespace

void attach_disks(kvm::Machine& machine, const std::vector<std::string>& specs) {
  for (const std::string& text : specs) {
    auto spec = kvm::parse_disk_spec(text);
    if (!spec.ok()) fail("--disk: " + spec.error().message);
    auto index = machine.attach_disk(spec->path, spec->block_bytes);
    if (!index.ok()) fail("--disk: " + index.error().message);
  }
}

void print_disk_stats(kvm::Machine& machine) {
  for (size_t i = 0; i < machine.disks().size(); ++i) {
    kvm::BlockDevice& d = machine.disk(i);
    kvm::BlockDeviceStats s = d.stats();
    std::fprintf(stderr,
                 "kvmig: disk %zu (%s, %s): reads=%llu (%.1f MiB) writes=%llu (%.1f MiB) flushes=%llu "
                 "bad_requests=%llu io_errors=%llu ring_errors=%llu\n",
                 i, d.path().c_str(), d.direct() ? "O_DIRECT" : "buffered", (unsigned long long)s.reads,
                 s.bytes_read / 1048576.0, (unsigned long long)s.writes, s.bytes_written / 1048576.0,
                 (unsigned long long)s.flushes, (unsigned long long)s.bad_requests, (unsigned long long)s.io_errors,
                 (unsigned long long)s.ring_errors);
  }
}

VmSite open_vm_site(const std::string& uuid, const std::string& name, const std::string& site_dir,
                    bool no_control) {
  VmSite v{.uuid = uuid, .name = name, .dir = site_dir};
  if (!v.uuid.empty()) {
    auto u = host::canonical_uuid(v.uuid);
    if (!u.ok()) fail("--uuid: " + u.error().message);
    v.uuid = *u;
  }
  if (!name.empty() && site_dir.empty()) fail("--name needs --site (the name lives in the site's registry)");
  if (name.size() > 255) fail("--name: at most 255 characters");
  if (!site_dir.empty()) {
    if (no_control) fail("--site needs a control socket: recovery stops and resumes the VM through it");
    auto s = host::MicroVmSite::open(site_dir);
    if (!s.ok()) fail("--site: " + s.error().message);
    v.site = std::move(*s);
    v.identity.events = v.site.get();
    v.identity.vm_name = name;
    if (v.uuid.empty()) v.uuid = host::random_uuid();
  }
  if (!v.uuid.empty()) {
    auto bytes = host::uuid_bytes(v.uuid);
    if (!bytes.ok()) fail("--uuid: " + bytes.error().message);
    v.identity.vm_uuid = *bytes;
  }
  return v;
}

void start_control(host::ControlServer& control, const std::string& path, bool no_control, bool verbose,
                   VmSite& v) {
  if (!no_control) {
    std::string where = path.empty() ? host::ControlServer::default_path() : path;
    if (auto r = control.start(where); !r.ok()) {
      if (!path.empty()) fail("--control: " + r.error().message);
      if (v.site) fail("--site: no control socket: " + r.error().message);
      std::fprintf(stderr, "kvmig: warning: no control socket: %s\n", r.error().message.c_str());
    } else if (verbose) {
      std::fprintf(stderr, "kvmig: vm: control socket %s\n", where.c_str());
    }
  }
  if (v.site) {
    std::error_code ec;
    std::string socket = std::filesystem::absolute(control.path(), ec).string();
    if (ec) socket = control.path();
    if (auto r = v.site->register_running(v.uuid, v.name, socket); !r.ok()) {
      control.stop();
      fail("--site: " + r.error().message);
    }
    std::fprintf(stderr, "kvmig: vm: %s registered at site %s\n", v.uuid.c_str(), v.dir.c_str());
  }
}

void register_state_commands(host::ControlServer& server, kvm::Machine& machine) {
  server.register_command("save", [&machine](const nlohmann::json& req) -> Result<nlohmann::json> {
    if (!req.contains("path") || !req["path"].is_string() || req["path"].get<std::string>().empty())
      return Error{"save: needs a non-empty string \"path\""};
    if (req.contains("keep_running") && !req["keep_running"].is_boolean())
      return Error{"save: \"keep_running\" must be true or false"};
    std::string path = req["path"];
    bool keep_running = req.value("keep_running", false);
    bool was_paused = machine.paused();
    KVMIG_TRY(machine.pause());
    auto stats = kvm::save_machine(machine, path);
    // A failed save leaves the VM as it found it: nothing was lost, so it runs on.
    if (!stats.ok()) {
      if (!was_paused) (void)machine.resume();
      return std::move(stats.error());
    }
    bool resumed = keep_running && !was_paused;
    if (resumed) KVMIG_TRY(machine.resume());
    return nlohmann::json{{"path", path},
                          {"guest_bytes", stats->guest_bytes},
                          {"data_bytes", stats->data_bytes},
                          {"file_bytes", stats->file_bytes},
                          {"seconds", stats->seconds},
                          {"paused", !resumed}};
  });
  server.register_command("stop", [&machine](const nlohmann::json& req) -> Result<nlohmann::json> {
    if (req.contains("status") && !req["status"].is_number_integer())
      return Error{"stop: \"status\" must be an integer"};
    machine.stop(req.value("status", 0));
    return nlohmann::json{{"stopping", true}};
  });
}

void add_vm_state_commands(CLI::App& app) {
  CLI::App* vm = app.get_subcommand("vm");
  auto save_opt = std::make_shared<SaveOptions>();
  CLI::App* save = vm->add_subcommand("save", "Pause a running VM and save its whole state to a file");
  save->add_option("--control", save_opt->control, "The VM's control socket")->required();
  save->add_option("--output", save_opt->output, "State file to write (appears only when complete)")
      ->required();
  save->add_flag("--keep-running", save_opt->keep_running,
                 "Resume the VM after saving (default: the VM ends once saved)");
  save->callback([save_opt] { run_save(*save_opt); });

  auto restore_opt = std::make_shared<RestoreOptions>();
  CLI::App* restore = vm->add_subcommand("restore", "Run a VM on from a state file written by `vm save`");
  restore->add_option("file", restore_opt->file, "State file")->required();
  restore->add_option("--console", restore_opt->console, "Write the guest's console to this file (default stdout)");
  restore->add_option("--control", restore_opt->control, "Control socket path (default /run/kvmig/vm-<pid>.sock)");
  restore->add_flag("--no-control", restore_opt->no_control, "Do not open a control socket");
  restore->add_option("--site", restore_opt->site,
                      "Register the VM in this site (made by `kvmig site init`) for status/recover, as `vm run --site`");
  restore->add_option("--uuid", restore_opt->uuid, "The VM's UUID (default: a new one with --site)");
  restore->add_option("--name", restore_opt->name, "The VM's name in the site registry (needs --site)");
  restore->add_option("--disk", restore_opt->disks,
                      "Disk PATH[,block=SIZE], as given to `vm run` (the state file holds no disk contents)");
  restore->add_flag("-v,--verbose", restore_opt->verbose, "Print disk counters on stderr at the end");
  restore->callback([restore_opt] {
    int status = run_restore(*restore_opt);
    if (status != 0) throw CLI::RuntimeError(status);
  });
}

}  // namespace kvmig::cli
