// The sending side of `kvmig disk copy`: reads an image that is not in use with io_uring
// (O_DIRECT where the file allows), skips holes, sends all-zero blocks as markers, and streams
// the rest to a `kvmig disk serve` over one connection. A connection ends verified (the
// destination's XXH3 of the whole image matches ours), stopped (hand-off: the destination
// reports how far it got), or with an error; the caller decides whether to reconnect, to the
// same server (resume) or another one (hand-off). The source image is only ever read.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "base/fd.h"
#include "base/result.h"
#include "helper/disk_extents.h"
#include "helper/disk_messages.h"
#include "helper/transport.h"

namespace kvmig::helper {

struct DiskSourceOptions {
  uint32_t block_size = 64 << 10;  // zero-block detection granularity
  uint32_t chunk = 1 << 20;        // bytes per read and per EXTENT
  unsigned queue_depth = 32;       // reads in flight (= registered buffers)
  bool direct = true;              // try O_DIRECT, fall back to buffered reads
  bool overwrite = false;          // the destination may replace an existing complete file
  uint64_t expect_size = 0;        // declared image size; 0 = take the file's
  bool keep_allocation = false;    // a kvmig delta: zero blocks must stay allocated there
  bool any_size = false;           // a qcow2 layer file: any size, not only multiples of 512
  uint64_t max_rate = 0;           // data bytes sent per second at most; 0 = no limit
  // Test-only: shut the connection down once this many data bytes went out (0 = never), to
  // prove resume. The CLI applies it to the first connection only.
  uint64_t fault_drop_after = 0;
  // Hand-off: send STOP once this many data bytes went out on this connection (0 = never),
  // or as soon as *stop_request turns true.
  uint64_t stop_after = 0;
  const std::atomic<bool>* stop_request = nullptr;
};

// The opened source image; scanned once, reused by every connection of one copy.
struct DiskImage {
  std::string path;
  Fd fd;          // buffered: extent scans, prefix hashing, fallback reads
  Fd direct_fd;   // O_DIRECT when the file allows it, else invalid
  uint64_t size = 0;
  uint64_t content_id = 0;
  std::vector<Extent> extents;
};
// Opens and checks the image: it exists, is a regular file or block device, its size is a
// non-zero multiple of 512 and equals expect_size when one is declared.
Result<DiskImage> open_disk_image(const std::string& path, const DiskSourceOptions& options);

// The identity of one version of an image: XXH3 over device, inode, size, mtime and ctime.
// A write to the image changes it, so a resume never continues a copy of older contents.
uint64_t disk_content_id(int fd);

enum class DiskCopyOutcome { verified, stopped };

struct DiskCopyReport {
  DiskCopyOutcome outcome = DiskCopyOutcome::verified;
  uint64_t resumed_from = 0;  // RESUME_FROM of this connection
  uint64_t end_offset = 0;    // verified: the image size; stopped: STOPPED's offset
  uint64_t acked = 0;         // last ACK (or STOPPED / VERIFIED) offset seen
  uint64_t acks = 0;          // ACKs received (one per --ack-every bytes written there)
  uint64_t data_bytes = 0;    // bytes sent in EXTENTs
  uint64_t zero_bytes = 0;    // bytes sent as ZERO markers
  uint64_t hole_bytes = 0;    // bytes sent as HOLE markers
  uint64_t xxh3 = 0;          // whole image (verified only)
  bool direct = false;        // reads went through O_DIRECT
  bool registered = false;    // io_uring used registered buffers
  double seconds = 0;
};

// One connection's worth of copying: OPEN, RESUME_FROM, stream, then DONE/VERIFIED or
// STOP/STOPPED. `connection` must be fresh (helper::connect with one data stream).
Result<DiskCopyReport> copy_disk(DiskImage& image, Connection& connection,
                                 const std::string& dest_path, const DiskSourceOptions& options);

// Whether a failed connection is worth retrying: socket errors and truncation are; refusals
// the destination sent (disk full, bad path, checksum mismatch) are not.
bool disk_error_retriable(const Error& error);

}  // namespace kvmig::helper
