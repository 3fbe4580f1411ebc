// QmpClient: a QEMU Machine Protocol client over a unix socket, used to drive QEMU for
// migrations (the QEMU adapter of the control plane, and the QEMU side of the benchmarks).
//
// QMP is one JSON object per line each way. After connect() QEMU sends a greeting, the
// client answers with qmp_capabilities, then each command {"execute","arguments","id"} gets
// exactly one {"return"} or {"error":{"class","desc"}} with the same id. Events
// ({"event","data","timestamp"}) may arrive at any time, also between a command and its
// reply: they are queued here and handed out by wait_event()/take_events().
//
// Every reply is checked: malformed JSON, a reply of the wrong shape or id, a closed socket
// or a timeout become a one-line Error; nothing here throws or aborts.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "base/fd.h"
#include "base/result.h"

namespace kvmig::host {

struct QmpEvent {
  std::string name;     // "MIGRATION", "STOP", "RESUME", ...
  nlohmann::json data;  // {} when the event has none
  int64_t seconds = 0, microseconds = 0;  // QEMU's timestamp
};

// query-migrate, the fields a benchmark or an operator reads. Absent fields stay 0.
struct MigrationInfo {
  std::string status;           // "none" when nothing ran; setup/active/device/completed/failed/...
  uint64_t total_time_ms = 0;   // "total-time" (so far, while active)
  uint64_t downtime_ms = 0;     // "downtime" once completed, else "expected-downtime"
  uint64_t setup_time_ms = 0;   // "setup-time"
  uint64_t ram_transferred = 0; // bytes on the wire for RAM
  uint64_t ram_total = 0;       // guest RAM size in bytes
  uint64_t ram_remaining = 0;
  uint64_t dirty_sync_count = 0;  // memory iterations (bitmap syncs)
  uint64_t normal_pages = 0;      // pages sent in full
  uint64_t duplicate_pages = 0;   // zero pages (sent as a flag only)
  double mbps = 0;                // throughput, Mbit/s
  uint64_t dirty_pages_rate = 0;  // pages/s dirtied, measured by QEMU
  uint64_t page_size = 4096;      // "ram.page-size", the unit of the page counts
  std::string error_desc;         // "error-desc" when failed
  std::optional<uint16_t> incoming_port;  // destination: first listening "socket-address" port

  bool finished() const {
    return status == "completed" || status == "failed" || status == "cancelled";
  }
};

// Parses a query-migrate "return" object; a field of the wrong type is an error.
Result<MigrationInfo> parse_migration_info(const nlohmann::json& ret);

struct VmStatus {
  std::string status;  // "running", "paused", "inmigrate", "postmigrate", "shutdown", ...
  bool running = false;
};

class QmpClient {
 public:
  using Ms = std::chrono::milliseconds;

  // Connects to QEMU's QMP socket, retrying while the socket does not exist yet or refuses
  // (QEMU creates it a moment after it starts), reads the greeting and negotiates.
  static Result<QmpClient> connect(const std::string& socket_path, Ms timeout = Ms(10000));
  // Takes an already connected stream (a socketpair in tests) and does the handshake.
  static Result<QmpClient> from_fd(Fd fd, Ms timeout = Ms(10000));

  QmpClient(QmpClient&&) = default;
  QmpClient& operator=(QmpClient&&) = default;

  // Runs one command; returns its "return" value. A QMP error becomes
  // "QMP <cmd>: <class>: <desc>", and error_class() tells the class alone.
  Result<nlohmann::json> execute(const std::string& command,
                                 const nlohmann::json& arguments = nlohmann::json::object());
  const std::string& error_class() const { return error_class_; }
  // How long execute() waits for a reply (default 30 s). A reply that comes after its
  // command timed out is skipped by the next command.
  void set_command_timeout(Ms timeout) { command_timeout_ = timeout; }

  // Returns (and removes from the queue) the first event named `name` that satisfies
  // `match`, reading from the socket until `timeout`. Earlier non-matching events stay queued.
  Result<QmpEvent> wait_event(const std::string& name,
                              const std::function<bool(const QmpEvent&)>& match, Ms timeout);
  // Everything queued so far, oldest first; the queue is left empty.
  std::vector<QmpEvent> take_events();

  // Typed commands.
  Result<void> migrate_set_capabilities(const std::map<std::string, bool>& caps);
  // e.g. {{"downtime-limit", 10}, {"max-bandwidth", 1 << 30}}.
  Result<void> migrate_set_parameters(const nlohmann::json& params);
  Result<nlohmann::json> query_migrate_parameters();
  Result<void> migrate(const std::string& uri);
  Result<void> migrate_incoming(const std::string& uri);  // for QEMU started with -incoming defer
  Result<MigrationInfo> query_migrate();
  Result<void> migrate_cancel();
  Result<void> stop();
  Result<void> cont();
  Result<VmStatus> query_status();
  Result<void> quit();  // QEMU exits; the socket closes after the reply

  // Polls query-migrate every `poll` until the migration finished (completed, failed or
  // cancelled) or `timeout`; returns the last info. On timeout the error says the status.
  // After "completed" it also waits for the source to leave run state finish-migrate: only
  // then are total-time and the counters final.
  Result<MigrationInfo> wait_migration(Ms timeout, Ms poll = Ms(50));

 private:
  explicit QmpClient(Fd fd) : fd_(std::move(fd)) {}
  Result<void> handshake(Ms timeout);
  // Reads one message (a JSON object) within the deadline.
  Result<nlohmann::json> read_message(std::chrono::steady_clock::time_point deadline);
  Result<void> send_line(const std::string& line);
  Result<void> queue_event(const nlohmann::json& msg);

  Fd fd_;
  std::string buffer_;  // bytes read past the last complete line
  std::deque<QmpEvent> events_;
  uint64_t next_id_ = 1;
  std::string error_class_;
  Ms command_timeout_{30000};
};

}  // namespace kvmig::host
