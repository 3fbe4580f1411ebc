// The destination side of live disk migration (docs/disk-migration.md): the copies of the
// source's disks, opened when DISKS arrives (so they are open, at their sizes, long before
// the source pauses), written from DISK_BLOCKS with io_uring (registered buffers, 32 writes
// in flight, O_DIRECT where the file allows), and made durable (fdatasync) by finish()
// before the session answers READY.
//
// Every DISK_BLOCKS is checked whole against the declared disks before a byte is written.
// A block may come again in a later round; io_uring does not order writes, so the writes of
// a round are drained before the first write of the next round is queued.
//
// Chained disks: the lower layers to copy are created next to the tops (a layer two disks share
// once), counted in the room check, and filled first; the first block of a top closes them
// (later blocks for them are refused) and starts their re-hashing on a thread of its own, so
// the control thread keeps reading the rounds; finish() waits for it, and a mismatch fails the
// migration (at the next DISK_BLOCKS already, if it is known by then).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <span>
#include <string>
#include <vector>

#include "base/fd.h"
#include "base/result.h"
#include "helper/disk_chain_migration.h"
#include "helper/disk_precopy_messages.h"
#include "helper/transport.h"

namespace kvmig::helper {

class UringEngine;

struct DiskReceiverOptions {
  unsigned queue_depth = 32;
  size_t buffer_bytes = 1 << 20;  // per write buffer; bigger runs are split
  bool direct = true;             // O_DIRECT where the file system accepts it
};

struct DiskReceiverStats {
  uint64_t messages = 0;
  uint64_t data_bytes = 0;  // written
  uint64_t zero_bytes = 0;  // punched (zero markers)
  uint32_t rounds = 0;      // distinct rounds seen
};

class DiskPrecopyReceiver {
 public:
  // Opens one copy per declared disk at `paths` (same order): created when missing; an
  // existing file must be a regular, empty file (a copy is written fresh: stale bytes must not
  // survive where the source has holes). Each is locked (flock), set to its declared size
  // (sparse), and checked for room for the source's data bytes.
  static Result<std::unique_ptr<DiskPrecopyReceiver>> open(const DisksMsg& declared,
                                                           std::span<const std::string> paths,
                                                           const DiskReceiverOptions& options);
  ~DiskPrecopyReceiver();

  const DisksMsg& declared() const { return declared_; }
  // For a disk with a chain: which lower layers this host holds (DISKS_READY's payload).
  const DisksReady& ready() const { return ready_; }
  // One DISK_BLOCKS payload (already checksummed by read_message).
  Result<void> on_blocks(std::span<const uint8_t> payload);
  // Drains every write and fdatasyncs every copy: after this the disks are durable.
  Result<void> finish();
  // The migration failed: close the copies and remove the files this receiver created.
  void discard();
  const DiskReceiverStats& stats() const { return stats_; }

 private:
  DiskPrecopyReceiver() = default;
  Result<void> drain();
  Result<void> reap_one();
  Result<void> write_zeros(size_t disk, uint64_t offset, uint64_t length);
  // Chains (helper/disk_chain_migration.h): place the lower layers, check the room for
  // everything this migration writes, create the ones to copy as extra targets, re-link.
  Result<void> open_chains();
  Result<void> check_room(const std::vector<std::vector<PlacedLayer>>& plans) const;
  // The copied layers are complete: refuse more blocks for them, re-hash them off this thread.
  Result<void> close_layers();
  // Waits for that re-hashing: its verdict.
  Result<void> verify_result();
  void stop_verifier();
  void sync_loop();
  void stop_syncer();

  struct Copy {
    std::string path;
    Fd fd, direct;
    bool created = false;
    // A chain's top or a delta: a zero block is written, not punched (a hole would read
    // the parent's bytes instead of zeros).
    bool keep_allocation = false;
  };
  struct LayerCheck {
    std::string path;
    bool delta = false;
    LayerId id;
  };
  struct Pending {
    size_t disk = 0;
    uint64_t offset = 0;
    uint64_t length = 0;
    bool direct = false;
  };
  DisksMsg declared_;
  std::vector<MigrationDisk> targets_;  // the declared disks, then the layers being copied
  DisksReady ready_;
  std::vector<LayerCheck> to_verify_;   // copied layers, re-hashed once complete
  bool layers_closed_ = false;          // a top's first block came: the copied layers are complete
  std::thread verifier_;
  std::atomic<bool> verify_cancel_{false};
  std::atomic<bool> verify_done_{false};
  std::optional<Error> verify_error_;   // written by the verifier before verify_done_
  std::vector<std::string> sidecars_;   // descriptors this receiver wrote (removed on discard)
  DiskReceiverOptions options_;
  std::vector<Copy> copies_;
  std::unique_ptr<UringEngine> engine_;
  std::vector<Pending> pending_;  // per buffer: the write it carries
  std::vector<unsigned> free_;
  uint32_t round_ = 0;
  bool any_ = false;
  // Written data is made durable in the background as it completes (every 10 ms), so the
  // fdatasync in finish(), while the source is paused, has little left to do.
  std::atomic<uint64_t> completed_{0};
  std::thread syncer_;
  std::mutex sync_mu_;
  std::condition_variable sync_cv_;
  bool sync_stop_ = false;
  DiskReceiverStats stats_;
};

// The destination's half of the DISKS handshake: decode DISKS, open the copies, answer
// DISKS_READY. The caller sends ERROR on failure, as for any other message.
Result<std::unique_ptr<DiskPrecopyReceiver>> accept_disks(Stream& control, uint16_t version,
                                                          std::span<const uint8_t> disks_payload,
                                                          std::span<const std::string> paths,
                                                          const DiskReceiverOptions& options);

}  // namespace kvmig::helper
