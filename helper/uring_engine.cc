#include "helper/uring_engine.h"

#include <liburing.h>
#include <sys/mman.h>

#include <cerrno>
#include <vector>

namespace kvmig::helper {

Result<std::unique_ptr<UringEngine>> UringEngine::create(unsigned depth, size_t buffer_size) {
  if (depth == 0 || depth > 4096)
    return Error{"io_uring queue depth " + std::to_string(depth) + ": want 1..4096"};
  if (buffer_size == 0 || buffer_size % 4096 != 0 || buffer_size > (1u << 30))
    return Error{"io_uring buffer size " + std::to_string(buffer_size) +
                 ": want a multiple of 4 KiB up to 1 GiB"};
  std::unique_ptr<UringEngine> e(new UringEngine);
  e->depth_ = depth;
  e->buffer_size_ = buffer_size;
  e->ring_ = std::make_unique<io_uring>();
  // Twice the buffers in ring entries: each buffer has at most one request, and the spare
  // room means queue() never finds the submission ring full.
  if (int rc = io_uring_queue_init(depth * 2, e->ring_.get(), 0); rc < 0) {
    e->ring_.reset();
    return Error::from_errno("io_uring_queue_init(" + std::to_string(depth * 2) + ")", -rc);
  }
  e->memory_size_ = depth * buffer_size;
  void* mem = ::mmap(nullptr, e->memory_size_, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED)
    return Error::from_errno("mmap " + std::to_string(e->memory_size_) + " bytes of I/O buffers");
  e->memory_ = static_cast<uint8_t*>(mem);
  std::vector<iovec> iov(depth);
  for (unsigned i = 0; i < depth; ++i) iov[i] = {e->memory_ + i * buffer_size, buffer_size};
  e->registered_ = io_uring_register_buffers(e->ring_.get(), iov.data(), depth) == 0;
  return e;
}

UringEngine::~UringEngine() {
  if (ring_) {
    if (in_flight_ > 0) io_uring_submit(ring_.get());
    // Requests still in flight write into our buffers: reap them before unmapping.
    while (in_flight_ > 0) {
      io_uring_cqe* cqe = nullptr;
      if (io_uring_wait_cqe(ring_.get(), &cqe) < 0) break;
      io_uring_cqe_seen(ring_.get(), cqe);
      --in_flight_;
    }
    io_uring_queue_exit(ring_.get());
  }
  if (memory_) ::munmap(memory_, memory_size_);
}

std::span<uint8_t> UringEngine::buffer(unsigned index) const {
  return {memory_ + static_cast<size_t>(index) * buffer_size_, buffer_size_};
}

Result<void> UringEngine::queue(bool write, int fd, unsigned index, uint64_t offset,
                                size_t length, uint64_t tag) {
  if (index >= depth_ || length == 0 || length > buffer_size_)
    return Error{"io_uring request: buffer " + std::to_string(index) + ", length " +
                 std::to_string(length) + " out of range"};
  io_uring_sqe* sqe = io_uring_get_sqe(ring_.get());
  if (!sqe) {
    KVMIG_TRY(submit());
    sqe = io_uring_get_sqe(ring_.get());
    if (!sqe) return Error{"io_uring submission ring full"};
  }
  uint8_t* buf = buffer(index).data();
  unsigned len = static_cast<unsigned>(length);
  if (registered_) {
    if (write)
      io_uring_prep_write_fixed(sqe, fd, buf, len, offset, static_cast<int>(index));
    else
      io_uring_prep_read_fixed(sqe, fd, buf, len, offset, static_cast<int>(index));
  } else if (write) {
    io_uring_prep_write(sqe, fd, buf, len, offset);
  } else {
    io_uring_prep_read(sqe, fd, buf, len, offset);
  }
  io_uring_sqe_set_data64(sqe, tag);
  ++in_flight_;
  return ok();
}

Result<void> UringEngine::read(int fd, unsigned index, uint64_t offset, size_t length,
                               uint64_t tag) {
  return queue(false, fd, index, offset, length, tag);
}

Result<void> UringEngine::write(int fd, unsigned index, uint64_t offset, size_t length,
                                uint64_t tag) {
  return queue(true, fd, index, offset, length, tag);
}

Result<void> UringEngine::submit() {
  int rc;
  do rc = io_uring_submit(ring_.get());
  while (rc == -EINTR);
  if (rc < 0) return Error::from_errno("io_uring_submit", -rc);
  return ok();
}

Result<UringEngine::Completion> UringEngine::wait() {
  if (in_flight_ == 0) return Error{"io_uring wait with nothing in flight"};
  io_uring_cqe* cqe = nullptr;
  int rc;
  do rc = io_uring_submit_and_wait(ring_.get(), 1);
  while (rc == -EINTR);
  if (rc < 0) return Error::from_errno("io_uring_submit_and_wait", -rc);
  do rc = io_uring_wait_cqe(ring_.get(), &cqe);
  while (rc == -EINTR);
  if (rc < 0) return Error::from_errno("io_uring_wait_cqe", -rc);
  Completion c{io_uring_cqe_get_data64(cqe), cqe->res};
  io_uring_cqe_seen(ring_.get(), cqe);
  --in_flight_;
  return c;
}

std::optional<UringEngine::Completion> UringEngine::poll() {
  io_uring_cqe* cqe = nullptr;
  if (in_flight_ == 0 || io_uring_peek_cqe(ring_.get(), &cqe) != 0 || !cqe) return std::nullopt;
  Completion c{io_uring_cqe_get_data64(cqe), cqe->res};
  io_uring_cqe_seen(ring_.get(), cqe);
  --in_flight_;
  return c;
}

}  // namespace kvmig::helper
