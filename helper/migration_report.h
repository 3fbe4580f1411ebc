// What a migration measured, in one place: every phase's time, the bytes and pages moved,
// and the outcome. The JSON field names are a contract with bench/migrate_vs_qemu.sh
// (total_ms, downtime_ms, setup_ms, bytes, iterations, zero_pages, pages, dirty_rate,
// bandwidth_mbps, result), whose QEMU half reports the same fields.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace kvmig::helper {

using Clock = std::chrono::steady_clock;

inline double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

struct RoundRecord {
  uint32_t round = 0;
  uint64_t pages = 0;
  uint64_t zero_pages = 0;
  uint64_t wire_bytes = 0;
  uint64_t dirty_pages = 0;     // harvested this round
  uint64_t deferred_pages = 0;  // hot pages held back for the switch-over
  double ms = 0;
  double throttle = 0;
  std::string verdict;
};

// The final report. "result" is "completed", "failed" (source still running), or
// "in-doubt" (COMMIT sent, no DONE: the VM stays paused on the source).
struct MigrationReport {
  std::string result = "failed";
  std::string error;
  std::string mode;  // dirty tracking mode
  uint64_t granularity = 4096;
  int streams = 1;
  bool compress = false;
  bool verified = false;
  double setup_ms = 0;        // connect + HELLO + tracker start
  double precopy_ms = 0;      // live rounds
  double switchover_ms = 0;   // pause -> READY (last pages, state, verify)
  double commit_ms = 0;       // COMMIT -> DONE
  double total_ms = 0;        // migrate call -> DONE (or failure)
  double downtime_ms = 0;     // source pause -> destination resumed (DONE seen: upper bound)
  double state_ms = 0;        // saving + sending vCPU/device state
  uint64_t bytes = 0;         // on the wire, all streams, headers included
  uint64_t pages = 0;         // sent, zero pages included
  uint64_t zero_pages = 0;
  uint64_t state_bytes = 0;
  uint64_t final_pages = 0;   // sent while paused
  uint64_t compressed_batches = 0;  // MEM_PAGES batches sent as zstd frames
  uint32_t iterations = 0;    // rounds, the final (paused) one included
  double dirty_rate = 0;      // bytes/s the guest dirtied, last live round
  double bandwidth_mbps = 0;  // MB/s (10^6) over all rounds
  double max_throttle = 0;
  // Convergence's estimate at the switch-over decision (helper/round_timing.h), next to the
  // measured downtime_ms: the fixed part it planned with (capped at 60 % of the budget) and
  // uncapped, the per-round latency and bandwidth it was made of, and the downtime expected.
  double fixed_ms_estimate = 0;
  double fixed_ms_measured = 0;
  double latency_ms_estimate = 0;
  double harvest_ms_estimate = 0;      // slowest recent pre-copy harvest
  double pause_ms_assumed = 0;         // vCPU pause
  double resume_ms_assumed = 0;        // the destination's COMMIT -> DONE beyond the round trip
  double state_save_ms_measured = 0;   // state save, timed in setup
  double bandwidth_mbps_estimate = 0;  // uncompressed MB/s (10^6)
  double expected_downtime_ms = 0;
  // Disks (docs/disk-migration.md); all 0 for a VM without disks.
  uint32_t disks = 0;
  uint64_t disk_bytes = 0;          // DISK_BLOCKS on the wire, headers included (also in bytes)
  uint64_t disk_blocks = 0;         // blocks sent, all rounds, bulk copy included
  uint32_t disk_rounds = 0;         // disk rounds, the final one included
  uint64_t disk_hot_deferred = 0;   // most hot blocks held back at once during pre-copy
  uint64_t disk_final_blocks = 0;   // sent while paused
  uint64_t disk_final_hot = 0;      // of those, deferred hot blocks
  double disk_pause_ms = 0;         // the disk part of the pause: drain, harvest, read, send
  double disk_expected_pause_ms = 0;  // the rule's estimate at the switch-over decision
  // Chained disks: lower layers the destination held (nothing sent) or had copied whole, and
  // the copied layers' DISK_BLOCKS bytes (included in disk_bytes).
  uint32_t disk_layers_held = 0, disk_layers_copied = 0;
  uint64_t disk_layer_bytes = 0;
  std::vector<RoundRecord> rounds;

  nlohmann::json to_json() const;
  static MigrationReport from_json(const nlohmann::json& j);
};

// Live progress, written by the session thread and read by whoever reports it (the control
// socket's "migrate-progress" command). Plain atomics: a reader may see a mix of two
// updates, which a progress bar can live with.
struct MigrationProgress {
  std::atomic<int> phase{0};  // index into kPhaseNames
  std::atomic<uint32_t> iteration{0};
  std::atomic<uint64_t> transferred{0};     // bytes on the wire so far
  std::atomic<uint64_t> remaining{0};       // dirty bytes left at the last harvest
  std::atomic<uint64_t> dirty_rate{0};      // bytes/s
  std::atomic<uint64_t> expected_downtime_us{0};
  std::atomic<uint64_t> throttle_pct{0};
  nlohmann::json to_json() const;
};

inline constexpr const char* kPhaseNames[] = {"setup", "precopy", "switchover", "commit",
                                              "done", "failed"};
enum Phase : int { kSetup = 0, kPrecopy, kSwitchover, kCommit, kDone, kFailed };

// One line for a terminal (rewritten in place with \r): phase, iteration, transferred,
// remaining, dirty rate, expected downtime.
std::string progress_line(const nlohmann::json& progress);
// A short human summary of a finished report, for stderr when --json is not given.
std::string report_summary(const MigrationReport& report);

}  // namespace kvmig::helper
