// qemu_migration: the QEMU half of the kvmig-vs-QEMU migration benchmark. Starts a source
// and a destination QEMU running the test guest, lets the guest touch its working set,
// live-migrates it over loopback TCP through QMP, checks that the guest keeps passing on the
// destination, and prints ONE JSON line with the same field names as `kvmig migrate --json`:
//   {"tool":"qemu","scenario":...,"total_ms":...,"downtime_ms":...,"setup_ms":...,"bytes":...,
//    "iterations":...,"zero_pages":...,"pages":...,"dirty_rate":...,"bandwidth_mbps":...,
//    "result":"completed"|"timeout"|"failed", "error":..., ...}
// "completed" means QEMU completed AND the guest kept passing on the destination with no
// corrupt page. "timeout": pre-copy did not converge in --timeout s (then cancelled).
// Exit status: 0 completed, 1 otherwise (the JSON line says why), 2 bad command line.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <thread>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "guests/guest_report.h"
#include "host/qemu_process.h"
#include "host/qmp_client.h"

using namespace kvmig;
using namespace kvmig::host;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
using Ms = std::chrono::milliseconds;

namespace {

struct Options {
  std::string qemu = "qemu-system-x86_64";
  std::string accel = "kvm";
  std::string cpu;
  std::string memory = "1280M";
  int smp = 1;
  std::string guest = KVMIG_GUEST;
  std::string cmdline = "ws=256M pattern=seq";
  std::string scenario;
  int downtime_ms = 0;          // 0: QEMU's default (300 ms)
  uint64_t max_bandwidth = 0;   // bytes/s; 0: QEMU's default (128 MiB/s)
  int multifd_zstd = 0;         // > 0: multifd with this many channels, each compressing with zstd
  int warm_passes = 2;          // source passes before migrating (pass 1 touches the whole set)
  double boot_timeout_s = 120;
  double timeout_s = 120;       // for the migration itself
  int verify_passes = 3;        // passes the destination must add after the switch
  double verify_timeout_s = 60;
  bool keep = false;
};

// One QEMU with its QMP connection and the guest's console.
struct Side {
  QemuProcess process;
  std::optional<QmpClient> qmp;
  std::optional<FileTail> console;
  guest::Report report;

  Result<void> poll() {
    KVMIG_ASSIGN(std::string bytes, console->read_new());
    report.feed(bytes);
    return ok();
  }
  // Lowest pass count over the vCPUs that reported (0 before every vCPU did).
  uint64_t min_pass(uint32_t vcpus) const {
    auto last = report.last_pass();
    if (last.size() < vcpus || last.empty()) return 0;
    uint64_t n = UINT64_MAX;
    for (auto& [cpu, p] : last) n = std::min(n, p.n);
    return n;
  }
  bool bad() const { return !report.corrupt.empty() || !report.errors.empty(); }
  std::string what_went_wrong() const {
    if (!report.errors.empty()) return report.errors.front();
    if (!report.corrupt.empty())
      return "guest saw " + std::to_string(report.corrupt.size()) + " corrupt page(s), first " +
             std::to_string(report.corrupt.front().page);
    return "";
  }
};

Result<Side> start_side(const Options& o, const std::string& dir, const std::string& name,
                        bool incoming) {
  QemuGuestOptions q;
  q.qemu = o.qemu;
  q.accel = o.accel;
  q.cpu = o.cpu;
  q.memory = o.memory;
  q.smp = o.smp;
  q.kernel = o.guest;
  q.append = o.cmdline;
  q.qmp_socket = dir + "/" + name + ".qmp";
  q.console_path = dir + "/" + name + ".console";
  if (incoming) q.incoming = "defer";
  KVMIG_ASSIGN(auto args, qemu_guest_args(q));
  Side side;
  KVMIG_ASSIGN(side.process, QemuProcess::start(args, dir + "/" + name + ".log"));
  auto client = QmpClient::connect(q.qmp_socket, Ms(15000));
  if (!client)
    return Error{name + " QEMU: " + client.error().message + " [" + side.process.log_tail() + "]"};
  side.qmp.emplace(std::move(*client));
  side.console.emplace(q.console_path);
  return side;
}

// Polls `side`'s console until `done` holds; fails on a corrupt/error line, QEMU exiting, or
// the timeout.
Result<void> watch(Side& side, const std::string& name, double timeout_s,
                   const std::function<bool()>& done) {
  auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
  for (;;) {
    KVMIG_TRY(side.poll());
    if (side.bad()) return Error{name + " guest: " + side.what_went_wrong()};
    if (done()) return ok();
    if (!side.process.running())
      return Error{name + " QEMU exited [" + side.process.log_tail() + "]"};
    if (Clock::now() >= deadline)
      return Error{name + " guest: not enough passes after " + std::to_string(timeout_s) + " s",
                   ETIMEDOUT};
    std::this_thread::sleep_for(Ms(20));
  }
}

// Same names and units as kvmig's MigrationReport (helper/migration_report.h): pages count
// zero pages too, dirty_rate is bytes/s, bandwidth_mbps is MB/s (10^6). QEMU's own numbers
// (normal pages, dirty pages/s, Mbit/s) are kept under qemu_*.
void put_stats(json& out, const MigrationInfo& m, bool completed) {
  out["status"] = m.status;
  out["total_ms"] = m.total_time_ms;
  out["downtime_ms"] = completed ? json(m.downtime_ms) : json(nullptr);
  out["setup_ms"] = m.setup_time_ms;
  out["bytes"] = m.ram_transferred;
  out["iterations"] = m.dirty_sync_count;
  out["zero_pages"] = m.duplicate_pages;
  out["pages"] = m.normal_pages + m.duplicate_pages;
  out["dirty_rate"] = m.dirty_pages_rate * m.page_size;
  out["bandwidth_mbps"] = m.mbps / 8;
  out["ram_total"] = m.ram_total;
  out["qemu_normal_pages"] = m.normal_pages;
  out["qemu_dirty_pages_rate"] = m.dirty_pages_rate;
  out["qemu_mbit_s"] = m.mbps;
}

// Bytes the loopback interface has sent. QEMU 7.2 counts multifd pages before compression
// (ram.transferred = pages x 4 KiB), so with multifd the bytes on the wire are taken from
// here: the difference over the migration, which runs over loopback (TCP/IP headers and
// anything else on lo at the time included, so an upper bound).
std::optional<uint64_t> loopback_tx_bytes() {
  std::ifstream f("/sys/class/net/lo/statistics/tx_bytes");
  uint64_t v = 0;
  if (!(f >> v)) return std::nullopt;
  return v;
}

// Runs the whole benchmark; fills `out` as far as it got. Returns the failure, if any.
Result<void> run(const Options& o, const std::string& dir, json& out) {
  uint32_t vcpus = static_cast<uint32_t>(o.smp);
  auto t0 = Clock::now();
  KVMIG_ASSIGN(Side src, start_side(o, dir, "source", false));
  KVMIG_ASSIGN(Side dst, start_side(o, dir, "destination", true));

  // Pass 1 writes every page: only after it is the working set really in guest RAM.
  KVMIG_TRY(watch(src, "source", o.boot_timeout_s,
                  [&] { return src.min_pass(vcpus) >= static_cast<uint64_t>(o.warm_passes); }));
  if (!src.report.start) return Error{"source guest printed no start line"};
  out["boot_ms"] = std::chrono::duration_cast<Ms>(Clock::now() - t0).count();
  out["ws_pages"] = src.report.start->ws_pages;

  if (o.multifd_zstd > 0) {
    // QEMU's own answer to compressible memory, kvmig's default being compression: multifd
    // channels, each with zstd. Both sides must agree before the destination listens.
    for (Side* side : {&src, &dst}) {
      KVMIG_TRY(side->qmp->migrate_set_capabilities({{"multifd", true}}));
      KVMIG_TRY(side->qmp->migrate_set_parameters(
          {{"multifd-channels", o.multifd_zstd}, {"multifd-compression", "zstd"}}));
    }
    out["multifd_channels"] = o.multifd_zstd;
    out["multifd_compression"] = "zstd";
  }
  KVMIG_TRY(dst.qmp->migrate_incoming("tcp:127.0.0.1:0"));
  KVMIG_ASSIGN(MigrationInfo listening, dst.qmp->query_migrate());
  if (!listening.incoming_port) return Error{"destination QEMU reports no listening port"};
  json params = json::object();
  if (o.downtime_ms > 0) params["downtime-limit"] = o.downtime_ms;
  if (o.max_bandwidth > 0) params["max-bandwidth"] = o.max_bandwidth;
  if (!params.empty()) KVMIG_TRY(src.qmp->migrate_set_parameters(params));
  KVMIG_ASSIGN(json effective, src.qmp->query_migrate_parameters());
  if (!effective.is_object()) return Error{"query-migrate-parameters: reply is not an object"};
  out["downtime_limit_ms"] = effective.contains("downtime-limit") ? effective["downtime-limit"] : json();
  out["max_bandwidth"] = effective.contains("max-bandwidth") ? effective["max-bandwidth"] : json();

  KVMIG_TRY(src.poll());
  uint64_t passes_before = src.min_pass(vcpus);
  const std::optional<uint64_t> lo_before = loopback_tx_bytes();
  auto wire_bytes_of_multifd = [&] {
    if (o.multifd_zstd <= 0) return;
    const std::optional<uint64_t> lo_after = loopback_tx_bytes();
    out["qemu_ram_transferred"] = out["bytes"];
    out["bytes"] = lo_before && lo_after ? json(*lo_after - *lo_before) : json(nullptr);
    out["bytes_from"] = "loopback tx_bytes";
    // QEMU's rate is of the same uncounted-for-compression bytes: give the wire's instead.
    out["qemu_bandwidth_mbps"] = out["bandwidth_mbps"];
    const double ms = out["total_ms"].is_number() ? out["total_ms"].get<double>() : 0;
    out["bandwidth_mbps"] = out["bytes"].is_number() && ms > 0 ? json(out["bytes"].get<double>() / ms / 1000) : json(nullptr);
  };
  KVMIG_TRY(src.qmp->migrate("tcp:127.0.0.1:" + std::to_string(*listening.incoming_port)));
  // QEMU stops reporting dirty-pages-rate once completed: keep the last one seen while active.
  auto deadline = Clock::now() + std::chrono::duration<double>(o.timeout_s);
  uint64_t last_dirty_rate = 0;
  for (;;) {
    KVMIG_ASSIGN(MigrationInfo now, src.qmp->query_migrate());
    if (now.finished()) break;
    if (now.dirty_pages_rate) last_dirty_rate = now.dirty_pages_rate;
    if (Clock::now() >= deadline) {
      // Did not converge: report how far it got, then cancel so the source keeps running.
      put_stats(out, now, false);
      wire_bytes_of_multifd();
      (void)src.qmp->migrate_cancel();
      out["result"] = "timeout";
      return Error{"migration did not complete within " + std::to_string(int(o.timeout_s)) +
                       " s (status " + now.status + "); cancelled",
                   ETIMEDOUT};
    }
    std::this_thread::sleep_for(Ms(100));
  }
  // Settled final numbers (total-time is filled in after "completed").
  KVMIG_ASSIGN(MigrationInfo final_info, src.qmp->wait_migration(Ms(10000)));
  if (!final_info.dirty_pages_rate) final_info.dirty_pages_rate = last_dirty_rate;
  auto finished = &final_info;
  put_stats(out, *finished, finished->status == "completed");
  wire_bytes_of_multifd();
  if (finished->status != "completed")
    return Error{"migration " + finished->status +
                 (finished->error_desc.empty() ? "" : ": " + finished->error_desc)};

  // The destination console holds only what the guest printed after the switch; every
  // vCPU must carry on counting from where the source left it, with no bad page.
  KVMIG_TRY(src.poll());
  uint64_t at_switch = std::max(src.min_pass(vcpus), passes_before);
  KVMIG_TRY(watch(dst, "destination", o.verify_timeout_s, [&] {
    return dst.min_pass(vcpus) >= at_switch + static_cast<uint64_t>(o.verify_passes);
  }));
  out["destination_passes"] = dst.min_pass(vcpus);
  if (src.bad()) return Error{"source guest: " + src.what_went_wrong()};
  (void)dst.qmp->quit();
  (void)src.qmp->quit();
  dst.process.terminate(Ms(3000));
  src.process.terminate(Ms(3000));
  return ok();
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"Live-migrates the test guest between two local QEMUs and prints one JSON line."};
  app.add_option("--qemu", o.qemu, "QEMU binary");
  app.add_option("--accel", o.accel, "kvm or tcg")->check(CLI::IsMember({"kvm", "tcg"}));
  app.add_option("--cpu", o.cpu, "QEMU -cpu (default host,-arch-capabilities with kvm)");
  app.add_option("--memory", o.memory, "guest RAM, QEMU -m syntax");
  app.add_option("--smp", o.smp, "vCPUs (put vcpus=N in --cmdline too)")->check(CLI::Range(1, 32));
  app.add_option("--guest", o.guest, "test guest ELF32")->check(CLI::ExistingFile);
  app.add_option("--cmdline", o.cmdline, "guest command line, e.g. \"ws=1G pattern=random\"");
  app.add_option("--scenario", o.scenario, "name in the JSON line (default: the cmdline)");
  app.add_option("--downtime-ms", o.downtime_ms, "downtime-limit; 0 = QEMU default")
      ->check(CLI::Range(0, 2000000));
  app.add_option("--max-bandwidth", o.max_bandwidth, "bytes/s; 0 = QEMU default");
  app.add_option("--multifd-zstd", o.multifd_zstd, "multifd with N channels compressing with zstd; 0 = off")
      ->check(CLI::Range(0, 255));
  app.add_option("--warm-passes", o.warm_passes, "source passes before migrating")
      ->check(CLI::Range(1, 1000));
  app.add_option("--boot-timeout", o.boot_timeout_s, "seconds")->check(CLI::PositiveNumber);
  app.add_option("--timeout", o.timeout_s, "seconds for the migration")->check(CLI::PositiveNumber);
  app.add_option("--verify-passes", o.verify_passes, "destination passes to see")
      ->check(CLI::Range(1, 1000));
  app.add_option("--verify-timeout", o.verify_timeout_s, "seconds")->check(CLI::PositiveNumber);
  app.add_flag("--keep", o.keep, "keep the work directory (QEMU logs, consoles)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    std::fprintf(stderr, "qemu_migration: %s\n", e.what());
    return 2;
  }
  if (o.cmdline.find('\n') != std::string::npos) {
    std::fprintf(stderr, "qemu_migration: --cmdline must be one line\n");
    return 2;
  }
  if (o.scenario.empty()) o.scenario = o.cmdline;

  char tmpl[] = "/tmp/kvmig-qemu-bench-XXXXXX";
  if (!mkdtemp(tmpl)) {
    std::perror("qemu_migration: mkdtemp");
    return 1;
  }
  std::string dir = tmpl;
  json out = {{"tool", "qemu"}, {"scenario", o.scenario}, {"accel", o.accel},
              {"memory", o.memory}, {"cmdline", o.cmdline}};
  auto r = run(o, dir, out);  // both QEMUs are killed when run() returns
  if (r) {
    out["result"] = "completed";
  } else {
    if (!out.contains("result")) out["result"] = "failed";
    out["error"] = r.error().message;
  }
  std::printf("%s\n", out.dump().c_str());
  std::fflush(stdout);
  if (o.keep) std::fprintf(stderr, "qemu_migration: work directory kept: %s\n", dir.c_str());
  else std::filesystem::remove_all(dir);
  return r ? 0 : 1;
}
