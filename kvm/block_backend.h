// The host side of a disk: a raw image file or a block device, read and written through
// its own io_uring (kvm/ does not use helper/'s engine: the layering is host → helper → kvm).
// A raw file with a kvmig delta descriptor is served as its whole base + delta chain
// (kvm/block_chain.h): reads cut into pieces, one per layer that holds them, writes to the
// top only, lower layers opened read-only.
//
// O_DIRECT where the file allows it, so guest I/O neither pollutes nor is hidden by the
// host page cache; a second, buffered descriptor serves what O_DIRECT refuses (a file system
// without O_DIRECT such as tmpfs, or a request not 4 KiB-aligned). A completion thread reaps
// the ring, finishes short transfers and EINVAL fall-backs, and hands each request's result
// to the callback given at open.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/fd.h"
#include "base/result.h"
#include "kvm/block_chain.h"

struct io_uring;

namespace kvmig::kvm {

class BlockBackend {
 public:
  enum class Op { kRead, kWrite, kFlush };
  // result: bytes transferred (the whole request) or -errno. Runs on the completion thread.
  using Completion = std::function<void(uint64_t tag, int64_t result)>;

  // Opens PATH read-write. Its size must be a non-zero multiple of 512 (errors name the
  // path and the size). When PATH has a descriptor (PATH.kvmig-delta) it is the top of a
  // chain: every layer below is opened read-only and must have PATH's size. `depth`:
  // requests in flight at most.
  static Result<std::unique_ptr<BlockBackend>> open(const std::string& path, unsigned depth, Completion done);
  ~BlockBackend();  // the caller must have let every request complete
  BlockBackend(const BlockBackend&) = delete;
  BlockBackend& operator=(const BlockBackend&) = delete;

  const std::string& path() const { return path_; }
  uint64_t size() const { return size_; }
  int fd() const { return layers_.back().buffered.get(); }  // the top's buffered descriptor
  bool direct() const { return layers_.back().direct.valid(); }
  // Base first, PATH last; just {PATH} for a raw image.
  std::vector<std::string> layer_paths() const;
  uint64_t granule() const { return granule_; }

  // Queues and submits one request; `buf` must stay valid until its completion. Flush is
  // fdatasync, ordered after every request submitted before it (IOSQE_IO_DRAIN).
  // On a chain, a read is cut into one host read per layer piece, and a write that would
  // leave part of a granule the top does not hold first copies that part up (a short
  // synchronous read of the lower layers); a write touching a granule another write is
  // filling waits in the backend for it (never blocking the caller).
  Result<void> submit(Op op, uint64_t offset, uint8_t* buf, uint32_t len, uint64_t tag);

  uint64_t direct_fallbacks() const { return fallbacks_.load(std::memory_order_relaxed); }
  uint64_t copy_ups() const { return copy_ups_.load(std::memory_order_relaxed); }

 private:
  struct Request;
  struct Parent;
  struct Layer {
    std::string path;
    Fd buffered, direct;
  };
  BlockBackend() = default;
  Result<void> queue_locked(Request* r);
  void completion_loop();
  void finish_piece(Request* r, int64_t result);
  Result<void> ensure_map_locked();
  bool filling_locked(uint64_t offset, uint32_t len) const;
  // Starts a chain write (map_mu_ held): copy-up, filling marks, queue.
  Result<void> start_write_locked(Parent* p);

  std::string path_;
  uint64_t size_ = 0;
  std::vector<Layer> layers_;  // base first, the writable top last
  uint64_t granule_ = 4096;
  Completion done_;
  // Chains only. The map is built at the first request, not at open: a migration
  // destination attaches its copy before the copy is filled.
  std::mutex map_mu_;  // before sq_mu_ when both are taken
  std::optional<ChainMap> map_;
  std::map<uint64_t, int> filling_;  // granule offset -> writes in flight that fill it
  std::deque<Parent*> waiting_;      // writes that touch a filling granule
  std::atomic<uint64_t> copy_ups_{0};
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
