// The receiving side of a disk copy (`kvmig disk serve`): writes one image per connection,
// only beneath its root directory, through io_uring (O_DIRECT where the file system allows),
// keeping holes and zero blocks sparse. Progress is durable: every `ack_every` bytes written,
// once the writes below that offset have completed, a background thread fdatasyncs, records
// the offset next to the image in "<image>.kvmig-partial" and acknowledges it, while the
// copy goes on. A later connection for the same image version
// (same content id and size) resumes from the recorded offset, whichever server wrote it,
// which is what makes both resume and hand-off work. The marker goes away once the whole
// image's XXH3 matches the source's.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "base/fd.h"
#include "base/result.h"
#include "helper/disk_messages.h"
#include "helper/transport.h"

namespace kvmig::helper {

inline constexpr const char* kPartialSuffix = ".kvmig-partial";

struct DiskSinkOptions {
  unsigned queue_depth = 32;       // writes in flight (= registered buffers)
  bool direct = true;              // try O_DIRECT, fall back to buffered writes
  uint64_t ack_every = 64 << 20;   // bytes written between fdatasync + ACK (in the background)
  int idle_timeout_s = 120;        // a silent source for this long ends the connection
  // Points `child` at `parent` (paths relative to the root, both checked to lie beneath it):
  // a qcow2 header or a kvmig delta descriptor. Supplied by the server command, because
  // qcow2 needs qemu-img (host knowledge); without it a LINK is refused.
  std::function<Result<void>(const DiskChainLayer& child, const DiskChainLayer& parent)> relink;
};

struct DiskSinkReport {
  DiskMsg request = DiskMsg::open;  // OPEN (a copy), CHAIN (a query) or LINK
  std::string path;            // relative to the root (CHAIN / LINK: the top layer)
  uint64_t image_size = 0;
  uint64_t resumed_from = 0;
  uint64_t end_offset = 0;     // verified: the size; stopped / failed: the durable offset
  bool verified = false;
  bool stopped = false;
  uint64_t written = 0;        // bytes written from EXTENTs
  uint64_t zero_bytes = 0;     // ZERO and HOLE bytes (left sparse)
  uint64_t xxh3 = 0;
  bool direct = false;
  double seconds = 0;
};

// openat2 with RESOLVE_BENEATH: no "..", absolute path or symlink leads outside `dir`.
int open_beneath(int dir, const std::string& path, uint64_t flags, mode_t mode = 0);

// The root as a directory fd every destination is resolved beneath.
Result<Fd> open_disk_root(const std::string& root);

// Serves one connection to its end: a copy (OPEN), or a chain query or link
// (helper/disk_chain_sink.h). On failure the error has been sent to the source when
// the connection still allowed it, and the marker holds the last durable offset.
Result<DiskSinkReport> receive_disk(int root_fd, Connection& connection,
                                    const DiskSinkOptions& options);

}  // namespace kvmig::helper
