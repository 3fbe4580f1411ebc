#include "helper/migration_report.h"

#include <cstdio>

namespace kvmig::helper {
namespace {

std::string human_bytes(double b) {
  char buf[32];
  if (b >= 1e9) snprintf(buf, sizeof buf, "%.2f GB", b / 1e9);
  else if (b >= 1e6) snprintf(buf, sizeof buf, "%.1f MB", b / 1e6);
  else snprintf(buf, sizeof buf, "%.0f kB", b / 1e3);
  return buf;
}

}  // namespace

nlohmann::json MigrationReport::to_json() const {
  nlohmann::json rs = nlohmann::json::array();
  for (const RoundRecord& r : rounds)
    rs.push_back({{"round", r.round}, {"pages", r.pages}, {"zero_pages", r.zero_pages},
                  {"bytes", r.wire_bytes}, {"dirty_pages", r.dirty_pages},
                  {"deferred_pages", r.deferred_pages}, {"ms", r.ms}, {"throttle", r.throttle},
                  {"verdict", r.verdict}});
  nlohmann::json j{{"result", result},         {"total_ms", total_ms},
                   {"downtime_ms", downtime_ms}, {"setup_ms", setup_ms},
                   {"precopy_ms", precopy_ms},   {"switchover_ms", switchover_ms},
                   {"commit_ms", commit_ms},     {"state_ms", state_ms},
                   {"bytes", bytes},             {"pages", pages},
                   {"zero_pages", zero_pages},   {"state_bytes", state_bytes},
                   {"final_pages", final_pages}, {"iterations", iterations},
                   {"dirty_rate", dirty_rate},   {"bandwidth_mbps", bandwidth_mbps},
                   {"max_throttle", max_throttle}, {"dirty_tracking", mode},
                   {"granularity", granularity}, {"streams", streams},
                   {"compress", compress},       {"compressed_batches", compressed_batches},
                   {"verified", verified},
                   {"fixed_ms_estimate", fixed_ms_estimate},
                   {"fixed_ms_measured", fixed_ms_measured},
                   {"latency_ms_estimate", latency_ms_estimate},
                   {"harvest_ms_estimate", harvest_ms_estimate},
                   {"pause_ms_assumed", pause_ms_assumed},
                   {"resume_ms_assumed", resume_ms_assumed},
                   {"state_save_ms_measured", state_save_ms_measured},
                   {"bandwidth_mbps_estimate", bandwidth_mbps_estimate},
                   {"expected_downtime_ms", expected_downtime_ms},
                   {"rounds", rs}};
  if (disks > 0)
    j["disk"] = {{"disks", disks},
                 {"bytes", disk_bytes},
                 {"blocks", disk_blocks},
                 {"rounds", disk_rounds},
                 {"hot_deferred", disk_hot_deferred},
                 {"final_blocks", disk_final_blocks},
                 {"final_hot_blocks", disk_final_hot},
                 {"pause_ms", disk_pause_ms},
                 {"expected_pause_ms", disk_expected_pause_ms},
                 {"layers_held", disk_layers_held},
                 {"layers_copied", disk_layers_copied},
                 {"layer_bytes", disk_layer_bytes}};
  if (!error.empty()) j["error"] = error;
  return j;
}

MigrationReport MigrationReport::from_json(const nlohmann::json& j) {
  MigrationReport r;
  r.result = j.value("result", std::string("failed"));
  r.error = j.value("error", std::string());
  r.mode = j.value("dirty_tracking", std::string());
  r.granularity = j.value("granularity", uint64_t{4096});
  r.streams = j.value("streams", 1);
  r.compress = j.value("compress", false);
  r.compressed_batches = j.value("compressed_batches", uint64_t{0});
  r.verified = j.value("verified", false);
  r.setup_ms = j.value("setup_ms", 0.0);
  r.precopy_ms = j.value("precopy_ms", 0.0);
  r.switchover_ms = j.value("switchover_ms", 0.0);
  r.commit_ms = j.value("commit_ms", 0.0);
  r.total_ms = j.value("total_ms", 0.0);
  r.downtime_ms = j.value("downtime_ms", 0.0);
  r.state_ms = j.value("state_ms", 0.0);
  r.bytes = j.value("bytes", uint64_t{0});
  r.pages = j.value("pages", uint64_t{0});
  r.zero_pages = j.value("zero_pages", uint64_t{0});
  r.state_bytes = j.value("state_bytes", uint64_t{0});
  r.final_pages = j.value("final_pages", uint64_t{0});
  r.iterations = j.value("iterations", 0u);
  r.dirty_rate = j.value("dirty_rate", 0.0);
  r.bandwidth_mbps = j.value("bandwidth_mbps", 0.0);
  r.max_throttle = j.value("max_throttle", 0.0);
  r.fixed_ms_estimate = j.value("fixed_ms_estimate", 0.0);
  r.fixed_ms_measured = j.value("fixed_ms_measured", 0.0);
  r.latency_ms_estimate = j.value("latency_ms_estimate", 0.0);
  r.harvest_ms_estimate = j.value("harvest_ms_estimate", 0.0);
  r.pause_ms_assumed = j.value("pause_ms_assumed", 0.0);
  r.resume_ms_assumed = j.value("resume_ms_assumed", 0.0);
  r.state_save_ms_measured = j.value("state_save_ms_measured", 0.0);
  r.bandwidth_mbps_estimate = j.value("bandwidth_mbps_estimate", 0.0);
  r.expected_downtime_ms = j.value("expected_downtime_ms", 0.0);
  if (j.contains("disk") && j["disk"].is_object()) {
    const auto& d = j["disk"];
    r.disks = d.value("disks", 0u);
    r.disk_bytes = d.value("bytes", uint64_t{0});
    r.disk_blocks = d.value("blocks", uint64_t{0});
    r.disk_rounds = d.value("rounds", 0u);
    r.disk_hot_deferred = d.value("hot_deferred", uint64_t{0});
    r.disk_final_blocks = d.value("final_blocks", uint64_t{0});
    r.disk_final_hot = d.value("final_hot_blocks", uint64_t{0});
    r.disk_pause_ms = d.value("pause_ms", 0.0);
    r.disk_expected_pause_ms = d.value("expected_pause_ms", 0.0);
    r.disk_layers_held = d.value("layers_held", 0u);
    r.disk_layers_copied = d.value("layers_copied", 0u);
    r.disk_layer_bytes = d.value("layer_bytes", uint64_t{0});
  }
  return r;
}

nlohmann::json MigrationProgress::to_json() const {
  int p = phase.load();
  if (p < 0 || p > kFailed) p = kFailed;
  return {{"phase", kPhaseNames[p]},
          {"iteration", iteration.load()},
          {"transferred", transferred.load()},
          {"remaining", remaining.load()},
          {"dirty_rate", dirty_rate.load()},
          {"expected_downtime_ms", expected_downtime_us.load() / 1000.0},
          {"throttle_pct", throttle_pct.load()}};
}

std::string progress_line(const nlohmann::json& p) {
  double transferred = p.value("transferred", 0.0), remaining = p.value("remaining", 0.0);
  double done = transferred + remaining > 0 ? transferred / (transferred + remaining) : 0;
  if (done > 1) done = 1;
  constexpr int kWidth = 20;
  int fill = static_cast<int>(done * kWidth);
  std::string bar = "[" + std::string(fill, '#') + std::string(kWidth - fill, '.') + "]";
  char buf[256];
  snprintf(buf, sizeof buf, "%-10s %s it %u  sent %s  left %s  dirty %s/s  exp. downtime %.1f ms  stun %u%%",
           p.value("phase", std::string("?")).c_str(), bar.c_str(), p.value("iteration", 0u),
           human_bytes(transferred).c_str(), human_bytes(remaining).c_str(),
           human_bytes(p.value("dirty_rate", 0.0)).c_str(), p.value("expected_downtime_ms", 0.0),
           p.value("throttle_pct", 0u));
  return buf;
}

std::string report_summary(const MigrationReport& r) {
  char buf[512];
  snprintf(buf, sizeof buf,
           "%s: total %.1f ms (setup %.1f, pre-copy %.1f, switch-over %.1f, commit %.1f), "
           "downtime %.2f ms, %s on the wire, %llu pages (%llu zero), %u iterations, %.0f MB/s",
           r.result.c_str(), r.total_ms, r.setup_ms, r.precopy_ms, r.switchover_ms, r.commit_ms,
           r.downtime_ms, human_bytes(static_cast<double>(r.bytes)).c_str(),
           static_cast<unsigned long long>(r.pages), static_cast<unsigned long long>(r.zero_pages),
           r.iterations, r.bandwidth_mbps);
  std::string line = buf;
  if (r.disks > 0) {
    snprintf(buf, sizeof buf, "; disks: %s in %u rounds, %llu hot blocks deferred, disk pause %.2f ms",
             human_bytes(static_cast<double>(r.disk_bytes)).c_str(), r.disk_rounds,
             static_cast<unsigned long long>(r.disk_final_hot), r.disk_pause_ms);
    line += buf;
  }
  return line;
}

}  // namespace kvmig::helper
