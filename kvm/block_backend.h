// The host side of a disk: a raw image file or a block device, read and written through
// its own io_uring (kvm/ does not use helper/'s engine: the layering is host → helper → kvm).
//
// O_DIRECT where the file allows it, so guest I/O neither pollutes nor is hidden by the
// host page cache; a second, buffered descriptor serves what O_DIRECT refuses (a file system
// without O_DIRECT such as tmpfs, or a request not 4 KiB-aligned). A completion thread reaps
// the ring, finishes short transfers and EINVAL fall-backs, and hands each request's result
// to the callback given at open.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "base/fd.h"
#include "base/result.h"

struct io_uring;

namespace kvmig::kvm {

class BlockBackend {
 public:
  enum class Op { kRead, kWrite, kFlush };
  // result: bytes transferred (the whole request) or -errno. Runs on the completion thread.
  using Completion = std::function<void(uint64_t tag, int64_t result)>;

  // Opens PATH read-write. Its size must be a non-zero multiple of 512 (errors name the
  // path and the size). `depth`: requests in flight at most.
  static Result<std::unique_ptr<BlockBackend>> open(const std::string& path, unsigned depth, Completion done);
  ~BlockBackend();  // the caller must have let every request complete
  BlockBackend(const BlockBackend&) = delete;
  BlockBackend& operator=(const BlockBackend&) = delete;

  const std::string& path() const { return path_; }
  uint64_t size() const { return size_; }
  int fd() const { return buffered_.get(); }  // the buffered descriptor, valid while open
  bool direct() const { return direct_.valid(); }

  // Queues and submits one request; `buf` must stay valid until its completion. Flush is
  // fdatasync, ordered after every request submitted before it (IOSQE_IO_DRAIN).
  Result<void> submit(Op op, uint64_t offset, uint8_t* buf, uint32_t len, uint64_t tag);

  uint64_t direct_fallbacks() const { return fallbacks_.load(std::memory_order_relaxed); }

 private:
  struct Request;
  BlockBackend() = default;
  Result<void> queue_locked(Request* r);
  void completion_loop();

  std::string path_;
  uint64_t size_ = 0;
  Fd buffered_;
  Fd direct_;
  Completion done_;
  std::unique_ptr<io_uring> ring_;
  std::mutex sq_mu_;  // the submission queue has one producer at a time
  std::thread reaper_;
  std::atomic<uint64_t> fallbacks_{0};
};

// Parses a --disk block size ("64K", "1M", "4096"): a power of two in 4 KiB .. 2 MiB.
Result<uint64_t> parse_block_bytes(const std::string& text);

// A --disk argument: "PATH" or "PATH,block=SIZE" (write-tracking granularity, default 64K).
struct DiskSpec {
  std::string path;
  uint64_t block_bytes = 64 * 1024;
};
Result<DiskSpec> parse_disk_spec(const std::string& text);

}  // namespace kvmig::kvm
