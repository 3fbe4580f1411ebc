// An io_uring with a pool of registered buffers: the disk-copy data path. The caller queues
// reads and writes of whole buffers at file offsets and collects completions by tag, so disk
// I/O stays in flight (queue depth = buffer count, >= 32 by default) while the caller's thread
// moves the previous buffers over the network.
//
// Buffers are page-aligned (O_DIRECT needs that) and registered with the ring so the kernel
// does not map them per request. Registration counts against RLIMIT_MEMLOCK for users
// without CAP_IPC_LOCK; when it is refused the engine uses plain READ/WRITE on the same
// buffers (registered() says which).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>

#include "base/result.h"

struct io_uring;

namespace kvmig::helper {

inline constexpr unsigned kDefaultQueueDepth = 32;

class UringEngine {
 public:
  static Result<std::unique_ptr<UringEngine>> create(unsigned depth, size_t buffer_size);
  ~UringEngine();
  UringEngine(const UringEngine&) = delete;
  UringEngine& operator=(const UringEngine&) = delete;

  unsigned depth() const { return depth_; }
  size_t buffer_size() const { return buffer_size_; }
  bool registered() const { return registered_; }
  std::span<uint8_t> buffer(unsigned index) const;

  // Queue a read into / a write from the first `length` bytes of buffer `index`. The
  // request goes to the kernel at the next submit() or wait(). `tag` comes back with it.
  Result<void> read(int fd, unsigned index, uint64_t offset, size_t length, uint64_t tag);
  Result<void> write(int fd, unsigned index, uint64_t offset, size_t length, uint64_t tag);
  Result<void> submit();

  struct Completion {
    uint64_t tag = 0;
    int result = 0;  // bytes transferred, or -errno
  };
  // Submits what is queued and waits for one completion.
  Result<Completion> wait();
  // A completion if one is ready, without blocking.
  std::optional<Completion> poll();
  unsigned in_flight() const { return in_flight_; }

 private:
  UringEngine() = default;
  Result<void> queue(bool write, int fd, unsigned index, uint64_t offset, size_t length,
                     uint64_t tag);

  std::unique_ptr<io_uring> ring_;
  uint8_t* memory_ = nullptr;
  size_t memory_size_ = 0;
  unsigned depth_ = 0;
  size_t buffer_size_ = 0;
  bool registered_ = false;
  unsigned in_flight_ = 0;
};

}  // namespace kvmig::helper
