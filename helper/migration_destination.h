// The destination side of a live migration (docs/protocol.md): take HELLO, build an empty
// machine of that shape, fill its memory from the data streams, load the vCPU and device
// state, answer READY, and on COMMIT start the VM and answer DONE.
//
// The page stream and the control stream are read at once: a thread per connection reads
// the pre-copy rounds from the data streams into guest memory while this thread follows the
// control stream. A control ROUND_END{r} is accepted only once every data stream delivered
// its ROUND_END{r}, and READY goes out only after the final round is in, the state loaded
// and (with VERIFY) the memory hash matched. Any failure before COMMIT ends with ERROR to
// the source and the machine discarded: nothing of it ever ran.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/result.h"
#include "helper/session_events.h"
#include "helper/transport.h"
#include "helper/wire.h"
#include "kvm/machine.h"

namespace kvmig::helper {

struct DestinationOptions {
  std::string console_path;  // the VM's console (empty: stdout)
  WireLimits limits;
  std::chrono::steady_clock::time_point start_time = std::chrono::steady_clock::now();
  // The control plane's records (helper/session_events.h); nullptr: none kept.
  SessionEvents* events = nullptr;
  // Where the copies of the source VM's disks go, in its disk order (docs/disk-migration.md);
  // empty: the destination takes no disks (HELLO's disk feature is declined).
  std::vector<std::string> disk_paths;
};

struct ReceivedMachine {
  std::unique_ptr<kvm::Machine> machine;  // started: its vCPUs run
  std::string migration_id;
  uint32_t rounds = 0;
  uint64_t pages = 0;
  uint64_t zero_pages = 0;
  uint64_t bytes = 0;
  bool verified = false;
  uint64_t disk_bytes = 0;    // disk data written here (zero runs excluded)
  double disk_sync_ms = 0;    // the disks' last drain + fdatasync, while the source was paused
  // When start() returned after COMMIT, and how long COMMIT -> DONE sent took here.
  std::chrono::steady_clock::time_point resumed_at;
  double commit_to_resume_ms = 0;
};

// Runs the destination half of one migration on an accepted connection. On success the
// machine runs; on failure the error says what failed (the peer's reason when it sent one).
Result<ReceivedMachine> receive_machine(Connection& connection, const DestinationOptions& options);

}  // namespace kvmig::helper
