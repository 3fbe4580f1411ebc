// `kvmig migrate SOCK --to ADDR`: asks the running VM behind control socket SOCK to migrate
// itself to a `kvmig receive` listening at ADDR. The VM's own process is the source (it owns
// the memory); this command passes the options, shows progress on a terminal, prints the
// report, and on success tells the source VM to end. Exit status: 0 completed, 1 failed (the
// VM runs on at the source), 3 in doubt (paused at the source until the status checker
// decides), 125 bad input or no answer from the VM.
// `--migration ID` names the migration in both sites' records (several calls may share one id:
// a group); without it an id is made here. The report names it ("migration_id"), since it is
// what `kvmig status --migration` and `kvmig recover --migration` ask for.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "helper/migration_report.h"
#include "host/control_server.h"
#include "host/migrate_command.h"
#include "host/site_records.h"
#include "kvm/guest_memory.h"

namespace {

constexpr int kFailed = 1;
constexpr int kInDoubt = 3;
constexpr int kUsage = 125;

struct MigrateOptions {
  std::string control;
  std::string to;
  // Several streams by default: the destination's first touch of each page is the slow part
  // of round 1, and N streams fault pages in on N threads.
  int streams = 4;
  // auto by default: the test guest's pages (and a typical idle guest's) shrink ~100x, so an
  // idle 1280 MiB guest moves 0.1 MiB instead of 64 MiB. Rounds are timed to the
  // destination's ROUND_ACK (wire version 3), so a compressed round's backlog is not taken
  // for bandwidth, and convergence plans with the switch-over's fixed cost measured in this
  // migration (per-round latency, harvest, state save: helper/round_timing.h) instead of a
  // 1 ms constant, so auto's higher bandwidth does not buy a bigger final round than off's
  // (median 117 vs 158 pages on hot1g at load 8-10). Downtime medians of the two modes were
  // within that load's scheduling noise either way (docs/benchmarks.md, "Compression by
  // default"). A version-2 destination gets raw pages under auto.
  std::string compress = "auto";
  bool verify = false;
  std::string tracking = "bitmap";
  std::string granularity = "4K";
  double max_downtime_ms = 5;
  double timeout_s = 60;
  bool json = false;
  bool no_progress = false;
  std::string migration;
};

[[noreturn]] void fail(int status, const std::string& message) {
  std::fprintf(stderr, "kvmig: migrate: %s\n", message.c_str());
  throw CLI::RuntimeError(status);
}

// Polls the VM's progress on a second connection while the migrate request is pending.
class ProgressBar {
 public:
  explicit ProgressBar(std::string control) {
    thread_ = std::thread([this, control] {
      std::unique_lock lock(mu_);
      while (!cv_.wait_for(lock, std::chrono::milliseconds(200), [&] { return done_; })) {
        lock.unlock();
        auto p = kvmig::host::control_request(control, {{"cmd", "migrate-progress"}});
        if (p.ok() && p->value("ok", false))
          std::fprintf(stderr, "\r%s\033[K", kvmig::helper::progress_line(*p).c_str());
        lock.lock();
      }
      std::fprintf(stderr, "\r\033[K");
    });
  }
  ~ProgressBar() {
    {
      std::lock_guard lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

int run_migrate(const MigrateOptions& opt) {
  auto granularity = kvmig::kvm::parse_size(opt.granularity);
  if (!granularity.ok()) fail(kUsage, "--trace-granularity: " + granularity.error().message);
  if (opt.tracking != "bitmap" && opt.tracking != "ring")
    fail(kUsage, "--dirty-tracking must be bitmap or ring, not '" + opt.tracking + "'");
  std::string migration_id = opt.migration.empty() ? kvmig::host::new_migration_id() : opt.migration;
  if (auto r = kvmig::host::check_migration_id(migration_id); !r.ok()) fail(kUsage, "--migration: " + r.error().message);
  nlohmann::json request{{"cmd", "migrate"},
                         {"migration_id", migration_id},
                         {"to", opt.to},
                         {"streams", opt.streams},
                         {"compress", opt.compress},
                         {"verify", opt.verify},
                         {"dirty_tracking", opt.tracking},
                         {"granularity", *granularity},
                         {"max_downtime_ms", opt.max_downtime_ms},
                         {"timeout_s", opt.timeout_s}};
  kvmig::Result<nlohmann::json> reply = kvmig::Error{"not sent"};
  {
    std::unique_ptr<ProgressBar> bar;
    if (!opt.no_progress && ::isatty(STDERR_FILENO)) bar = std::make_unique<ProgressBar>(opt.control);
    reply = kvmig::host::control_request(opt.control, request);
  }
  // Without a reply the outcome is unknown here; the id lets `kvmig status` find it out.
  if (!reply.ok()) fail(kUsage, "migration " + migration_id + ": " + reply.error().message);
  if (!reply->value("ok", false))
    fail(kUsage, "migration " + migration_id + ": " + reply->value("error", std::string("no reason given")));
  nlohmann::json report = *reply;
  report.erase("ok");
  std::string result = report.value("result", std::string("failed"));
  if (opt.json) std::printf("%s\n", report.dump().c_str());
  auto summary = kvmig::helper::report_summary(kvmig::helper::MigrationReport::from_json(report));
  if (!opt.json)
    std::fprintf(stderr, "kvmig: migrate: migration %s of %s: %s\n",
                 report.value("migration_id", migration_id).c_str(),
                 report.value("vm_uuid", std::string("?")).c_str(), summary.c_str());
  if (result == "completed") {
    // The destination runs the VM now: end the source's copy. Its process may close the
    // socket before replying; that is fine, the migration itself was confirmed by DONE.
    auto fin = kvmig::host::control_request(opt.control, {{"cmd", "migrate-finish"}});
    if (fin.ok() && !fin->value("ok", false))
      std::fprintf(stderr, "kvmig: migrate: warning: %s\n", fin->value("error", std::string()).c_str());
    return 0;
  }
  std::fprintf(stderr, "kvmig: migrate: %s: %s\n", result.c_str(), report.value("error", std::string("no reason")).c_str());
  return result == "in-doubt" ? kInDoubt : kFailed;
}

}  // namespace

void add_migrate_command(CLI::App& app) {
  auto opt = std::make_shared<MigrateOptions>();
  CLI::App* cmd = app.add_subcommand("migrate", "Live-migrate a running VM to a `kvmig receive`");
  cmd->add_option("vm", opt->control, "The VM's control socket")->required();
  cmd->add_option("--to", opt->to, "Destination: HOST:PORT or unix:PATH")->required();
  cmd->add_option("--streams", opt->streams, "Data streams (1..16, default 4)")->check(CLI::Range(1, 16));
  cmd->add_option("--compress", opt->compress,
                  "zstd on page batches: auto (default: where it shrinks them and saves time), on "
                  "(wherever it shrinks them), off")
      ->check(CLI::IsMember({"auto", "on", "off"}));
  cmd->add_flag("--verify", opt->verify, "Compare an XXH3 of all guest RAM before COMMIT");
  cmd->add_option("--dirty-tracking", opt->tracking, "bitmap (default) or ring");
  cmd->add_option("--trace-granularity", opt->granularity, "Dirty trace unit, 4K..2M (default 4K)");
  cmd->add_option("--max-downtime", opt->max_downtime_ms, "Downtime budget in ms (default 5)");
  cmd->add_option("--timeout", opt->timeout_s, "Give up pre-copy after this many seconds (default 60; 0 = never)");
  cmd->add_option("--migration", opt->migration, "Migration id for the site records (default: a new mig-<hex>); share it to group VMs");
  cmd->add_flag("--json", opt->json, "Print the report as JSON on stdout");
  cmd->add_flag("--no-progress", opt->no_progress, "No progress bar, even on a terminal");
  cmd->callback([opt] {
    int status = run_migrate(*opt);
    if (status != 0) throw CLI::RuntimeError(status);
  });
}
