#include "kvm/block_backend.h"

#include <fcntl.h>
#include <liburing.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

#include <bit>

#include "kvm/guest_memory.h"

namespace kvmig::kvm {

namespace {
// Conservative O_DIRECT alignment: 4 KiB covers 512e and 4Kn devices alike.
constexpr uint64_t kDirectAlign = 4096;
constexpr uint64_t kStopTag = 0;  // user_data of the NOP that ends the completion thread
}  // namespace

struct BlockBackend::Request {
  Op op;
  uint64_t offset;
  uint8_t* buf;
  uint32_t len;
  uint32_t done = 0;  // bytes already transferred (short reads/writes are continued)
  uint64_t tag;
  bool use_direct;
};

Result<uint64_t> parse_block_bytes(const std::string& text) {
  KVMIG_ASSIGN(uint64_t v, parse_size(text));
  if (v < 4096 || v > 2 * kMiB || !std::has_single_bit(v))
    return Error{"block size '" + text + "' must be a power of two from 4K to 2M"};
  return v;
}

Result<DiskSpec> parse_disk_spec(const std::string& text) {
  DiskSpec spec;
  size_t comma = text.find(',');
  spec.path = text.substr(0, comma);
  if (spec.path.empty()) return Error{"disk '" + text + "': no path"};
  while (comma != std::string::npos) {
    size_t next = text.find(',', comma + 1);
    std::string opt = text.substr(comma + 1, next == std::string::npos ? std::string::npos : next - comma - 1);
    if (opt.rfind("block=", 0) != 0) return Error{"disk '" + text + "': unknown option '" + opt + "' (block=SIZE)"};
    auto b = parse_block_bytes(opt.substr(6));
    if (!b.ok()) return std::move(b.error().prefix("disk '" + text + "'"));
    spec.block_bytes = *b;
    comma = next;
  }
  return spec;
}

Result<std::unique_ptr<BlockBackend>> BlockBackend::open(const std::string& path, unsigned depth, Completion done) {
  std::unique_ptr<BlockBackend> b(new BlockBackend());
  b->path_ = path;
  b->done_ = std::move(done);
  b->buffered_.reset(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!b->buffered_) return Error::from_errno("disk " + path);
  struct stat st {};
  if (::fstat(b->buffered_.get(), &st) != 0) return Error::from_errno("disk " + path + ": fstat");
  if (S_ISBLK(st.st_mode)) {
    if (::ioctl(b->buffered_.get(), BLKGETSIZE64, &b->size_) != 0)
      return Error::from_errno("disk " + path + ": BLKGETSIZE64");
  } else if (S_ISREG(st.st_mode)) {
    b->size_ = static_cast<uint64_t>(st.st_size);
  } else {
    return Error{"disk " + path + ": not a regular file or block device"};
  }
  if (b->size_ == 0 || b->size_ % 512 != 0)
    return Error{"disk " + path + ": size " + std::to_string(b->size_) + " is not a non-zero multiple of 512 bytes"};
  // tmpfs and some FUSE file systems refuse O_DIRECT at open: then everything is buffered.
  b->direct_.reset(::open(path.c_str(), O_RDWR | O_CLOEXEC | O_DIRECT));

  b->ring_ = std::make_unique<io_uring>();
  // Twice the depth: room for continuations and fall-backs queued from the completion thread.
  if (int rc = io_uring_queue_init(std::bit_ceil(depth * 2 + 2), b->ring_.get(), 0); rc < 0) {
    b->ring_.reset();
    return Error::from_errno("disk " + path + ": io_uring_queue_init", -rc);
  }
  b->reaper_ = std::thread([raw = b.get()] { raw->completion_loop(); });
  return b;
}

BlockBackend::~BlockBackend() {
  if (!ring_) return;
  if (reaper_.joinable()) {
    {
      std::lock_guard lock(sq_mu_);
      io_uring_sqe* sqe = io_uring_get_sqe(ring_.get());
      while (!sqe) {
        io_uring_submit(ring_.get());
        sqe = io_uring_get_sqe(ring_.get());
      }
      io_uring_prep_nop(sqe);
      io_uring_sqe_set_data64(sqe, kStopTag);
      io_uring_submit(ring_.get());
    }
    reaper_.join();
  }
  io_uring_queue_exit(ring_.get());
}

Result<void> BlockBackend::submit(Op op, uint64_t offset, uint8_t* buf, uint32_t len, uint64_t tag) {
  auto* r = new Request{op, offset, buf, len, 0, tag, false};
  r->use_direct = direct_.valid() && op != Op::kFlush && offset % kDirectAlign == 0 && len % kDirectAlign == 0 &&
                  reinterpret_cast<uintptr_t>(buf) % kDirectAlign == 0;
  std::lock_guard lock(sq_mu_);
  auto res = queue_locked(r);
  if (!res.ok()) delete r;
  return res;
}

Result<void> BlockBackend::queue_locked(Request* r) {
  io_uring_sqe* sqe = io_uring_get_sqe(ring_.get());
  if (!sqe) {
    io_uring_submit(ring_.get());
    sqe = io_uring_get_sqe(ring_.get());
    if (!sqe) return Error{"disk " + path_ + ": io_uring submission queue full"};
  }
  int fd = r->use_direct ? direct_.get() : buffered_.get();
  uint8_t* p = r->buf + r->done;
  uint32_t n = r->len - r->done;
  switch (r->op) {
    case Op::kRead: io_uring_prep_read(sqe, fd, p, n, r->offset + r->done); break;
    case Op::kWrite: io_uring_prep_write(sqe, fd, p, n, r->offset + r->done); break;
    case Op::kFlush:
      io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
      sqe->flags |= IOSQE_IO_DRAIN;  // covers every write submitted before it
      break;
  }
  io_uring_sqe_set_data(sqe, r);
  int rc;
  do rc = io_uring_submit(ring_.get());
  while (rc == -EINTR);
  if (rc < 0) return Error::from_errno("disk " + path_ + ": io_uring_submit", -rc);
  return ok();
}

void BlockBackend::completion_loop() {
  pthread_setname_np(pthread_self(), "kvmig-blk");
  while (true) {
    io_uring_cqe* cqe = nullptr;
    int rc = io_uring_wait_cqe(ring_.get(), &cqe);
    if (rc == -EINTR) continue;
    if (rc < 0) return;  // the ring is broken; the device's drain reports the stuck requests
    uint64_t data = io_uring_cqe_get_data64(cqe);
    int res = cqe->res;
    io_uring_cqe_seen(ring_.get(), cqe);
    if (data == kStopTag) return;
    auto* r = reinterpret_cast<Request*>(data);
    bool again = false;
    if (res == -EINVAL && r->use_direct) {
      // This file system's O_DIRECT alignment is stricter than ours: go through the cache.
      r->use_direct = false;
      fallbacks_.fetch_add(1, std::memory_order_relaxed);
      again = true;
    } else if (res == -EAGAIN || res == -EINTR) {
      again = true;
    } else if (res > 0 && r->op != Op::kFlush) {
      r->done += static_cast<uint32_t>(res);
      again = r->done < r->len;
    } else if (res == 0 && r->op != Op::kFlush) {
      res = -EIO;  // end of file inside a range the device checked: the image shrank
    }
    if (again) {
      std::lock_guard lock(sq_mu_);
      if (queue_locked(r).ok()) continue;
      res = -EIO;
    }
    int64_t result = res < 0 ? res : static_cast<int64_t>(r->len);
    uint64_t tag = r->tag;
    delete r;
    done_(tag, result);
  }
}

}  // namespace kvmig::kvm
