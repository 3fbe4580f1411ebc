#include "kvm/block_backend.h"

#include <fcntl.h>
#include <liburing.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cstdlib>
#include <cstring>

#include "kvm/guest_memory.h"

namespace kvmig::kvm {

namespace {
// Conservative O_DIRECT alignment: 4 KiB covers 512e and 4Kn devices alike.
constexpr uint64_t kDirectAlign = 4096;
constexpr uint64_t kStopTag = 0;  // user_data of the NOP that ends the completion thread
constexpr uint64_t kVoidTag = 1;  // user_data of an SQE whose request was withdrawn (see queue_locked)
}  // namespace

// One host I/O: the whole guest request on a raw image, one piece of it on a chain.
struct BlockBackend::Request {
  Op op;
  uint64_t offset;
  uint8_t* buf;
  uint32_t len;
  uint32_t done = 0;  // bytes already transferred (short reads/writes are continued)
  size_t layer;
  bool use_direct;
  Parent* parent;
};

// One guest request: completes when its last piece does, with the first error seen.
struct BlockBackend::Parent {
  Op op;
  uint64_t offset;
  uint8_t* buf;
  uint32_t len;
  uint64_t tag;
  std::atomic<int> remaining{0};
  std::atomic<int64_t> error{0};
  // Chain writes: the span written to the top, the granules it fills, the copy-up buffer.
  uint64_t span_begin = 0, span_end = 0;
  std::vector<uint64_t> fills;
  uint8_t* bounce = nullptr;
  ~Parent() { std::free(bounce); }
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
  KVMIG_ASSIGN(std::vector<std::string> paths, resolve_block_chain(path));
  for (size_t i = 0; i < paths.size(); ++i) {
    bool top = i + 1 == paths.size();
    const std::string& lp = paths[i];
    std::string what = top ? "disk " + lp : "disk " + path + ": layer " + lp;
    int mode = top ? O_RDWR : O_RDONLY;  // lower layers are never written
    Layer layer{lp, Fd(::open(lp.c_str(), mode | O_CLOEXEC)), Fd()};
    if (!layer.buffered) return Error::from_errno(what);
    struct stat st {};
    if (::fstat(layer.buffered.get(), &st) != 0) return Error::from_errno(what + ": fstat");
    uint64_t size = 0;
    if (S_ISBLK(st.st_mode)) {
      if (::ioctl(layer.buffered.get(), BLKGETSIZE64, &size) != 0) return Error::from_errno(what + ": BLKGETSIZE64");
    } else if (S_ISREG(st.st_mode)) {
      size = static_cast<uint64_t>(st.st_size);
    } else {
      return Error{what + ": not a regular file or block device"};
    }
    if (top) {
      b->size_ = size;
      if (b->size_ == 0 || b->size_ % 512 != 0)
        return Error{"disk " + path + ": size " + std::to_string(b->size_) + " is not a non-zero multiple of 512 bytes"};
      // The top of a chain holds whole granules: at least the file system's block, which is
      // what a write allocates.
      if (st.st_blksize > 4096) b->granule_ = std::min<uint64_t>(std::bit_floor(uint64_t(st.st_blksize)), 64 * 1024);
    }
    // tmpfs and some FUSE file systems refuse O_DIRECT at open: then everything is buffered.
    layer.direct.reset(::open(lp.c_str(), mode | O_CLOEXEC | O_DIRECT));
    b->layers_.push_back(std::move(layer));
  }
  for (const Layer& l : b->layers_) {
    struct stat st {};
    uint64_t size = 0;
    if (::fstat(l.buffered.get(), &st) == 0 && S_ISREG(st.st_mode)) size = static_cast<uint64_t>(st.st_size);
    else if (::ioctl(l.buffered.get(), BLKGETSIZE64, &size) != 0) size = 0;
    if (size != b->size_)
      return Error{"disk " + path + ": layer " + l.path + " is " + std::to_string(size) + " bytes, the top " +
                   std::to_string(b->size_) + " (a chain's layers all have the disk's size)"};
  }

  b->ring_ = std::make_unique<io_uring>();
  // Twice the depth: room for continuations and fall-backs queued from the completion
  // thread; a chain read may take a piece per layer.
  unsigned entries = depth * 2 + 2;
  if (b->layers_.size() > 1) entries = depth * 4 + 2;
  if (int rc = io_uring_queue_init(std::bit_ceil(entries), b->ring_.get(), 0); rc < 0) {
    b->ring_.reset();
    return Error::from_errno("disk " + path + ": io_uring_queue_init", -rc);
  }
  b->reaper_ = std::thread([raw = b.get()] { raw->completion_loop(); });
  return b;
}

std::vector<std::string> BlockBackend::layer_paths() const {
  std::vector<std::string> out;
  for (const Layer& l : layers_) out.push_back(l.path);
  return out;
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

namespace {
bool direct_ok(uint64_t offset, uint64_t len, const uint8_t* buf) {
  return offset % kDirectAlign == 0 && len % kDirectAlign == 0 && reinterpret_cast<uintptr_t>(buf) % kDirectAlign == 0;
}
}  // namespace

Result<void> BlockBackend::submit(Op op, uint64_t offset, uint8_t* buf, uint32_t len, uint64_t tag) {
  auto* p = new Parent{op, offset, buf, len, tag};
  size_t top = layers_.size() - 1;
  if (top == 0 || op == Op::kFlush) {  // a raw image, or a flush (only the top is ever written)
    p->remaining = 1;
    auto* r = new Request{op, offset, buf, len, 0, top, false, p};
    r->use_direct = layers_[top].direct.valid() && op != Op::kFlush && direct_ok(offset, len, buf);
    std::lock_guard lock(sq_mu_);
    auto res = queue_locked(r);
    if (!res.ok()) delete r, delete p;
    return res;
  }
  std::unique_lock map_lock(map_mu_);
  if (auto built = ensure_map_locked(); !built.ok()) {
    delete p;
    return built;
  }
  if (op == Op::kWrite) {
    if (filling_locked(offset, len)) {
      waiting_.push_back(p);  // started by the completion of the write filling its granule
      return ok();
    }
    auto res = start_write_locked(p);
    if (!res.ok()) delete p;
    return res;
  }
  std::vector<ChainMap::Piece> pieces = map_->resolve(offset, len);
  map_lock.unlock();
  p->remaining = static_cast<int>(pieces.size());
  std::lock_guard lock(sq_mu_);
  for (size_t i = 0; i < pieces.size(); ++i) {
    const ChainMap::Piece& piece = pieces[i];
    uint8_t* at = buf + (piece.offset - offset);
    auto* r = new Request{op, piece.offset, at, static_cast<uint32_t>(piece.length), 0, piece.layer, false, p};
    r->use_direct = layers_[piece.layer].direct.valid() && direct_ok(piece.offset, piece.length, at);
    if (auto res = queue_locked(r); !res.ok()) {
      delete r;
      if (i == 0) {
        delete p;
        return res;
      }
      // Pieces already queued complete the request, with the error.
      p->error = -EIO;
      if (p->remaining.fetch_sub(static_cast<int>(pieces.size() - i)) == static_cast<int>(pieces.size() - i)) {
        delete p;
        return res;
      }
      return ok();
    }
  }
  return ok();
}

Result<void> BlockBackend::ensure_map_locked() {
  if (map_) return ok();
  ChainMap map(size_, granule_, layers_.size());
  for (size_t l = 1; l < layers_.size(); ++l) {
    int fd = layers_[l].buffered.get();
    for (off_t at = 0; static_cast<uint64_t>(at) < size_;) {
      off_t data = ::lseek(fd, at, SEEK_DATA);
      if (data < 0) {
        if (errno == ENXIO) break;  // no data after `at`
        return Error::from_errno("disk " + path_ + ": layer " + layers_[l].path + ": SEEK_DATA");
      }
      off_t hole = ::lseek(fd, data, SEEK_HOLE);
      if (hole < 0) return Error::from_errno("disk " + path_ + ": layer " + layers_[l].path + ": SEEK_HOLE");
      map.add(l, static_cast<uint64_t>(data), static_cast<uint64_t>(hole - data));
      at = hole;
    }
  }
  map_.emplace(std::move(map));
  return ok();
}

bool BlockBackend::filling_locked(uint64_t offset, uint32_t len) const {
  auto [first, last] = map_->granules(offset, len);
  auto it = filling_.lower_bound(first);
  return it != filling_.end() && it->first < last;
}

Result<void> BlockBackend::start_write_locked(Parent* p) {
  size_t top = layers_.size() - 1;
  auto [begin, end] = map_->write_span(p->offset, p->len);
  p->span_begin = begin, p->span_end = end;
  auto [first, last] = map_->granules(p->offset, p->len);
  for (uint64_t g = first; g < last; g += granule_)
    if (!map_->holds(top, g, std::min(granule_, size_ - g))) p->fills.push_back(g);
  uint8_t* src = p->buf;
  if (begin != p->offset || end != p->offset + p->len) {
    // Copy-up: the parts of the edge granules the guest does not write come from the chain as
    // it reads now, the top included: a granule larger than the top's own blocks (st_blksize
    // over 4 KiB) may be partly held by the top already, and those bytes are newer than the
    // parent's. No other write can touch these granules meanwhile (they are filling, below), and
    // the lower layers never change.
    copy_ups_.fetch_add(1, std::memory_order_relaxed);
    size_t bytes = (end - begin + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
    p->bounce = static_cast<uint8_t*>(std::aligned_alloc(kDirectAlign, bytes));
    if (!p->bounce) return Error{"disk " + path_ + ": no memory for a copy-up"};
    for (auto [from, to] : {std::pair{begin, p->offset}, std::pair{p->offset + p->len, end}}) {
      if (from >= to) continue;
      for (const ChainMap::Piece& piece : map_->resolve(from, to - from, top)) {
        uint8_t* dst = p->bounce + (piece.offset - begin);
        for (uint64_t got = 0; got < piece.length;) {
          ssize_t n = ::pread(layers_[piece.layer].buffered.get(), dst + got, piece.length - got,
                              static_cast<off_t>(piece.offset + got));
          if (n < 0 && errno == EINTR) continue;
          if (n <= 0) return Error::from_errno("disk " + path_ + ": copy-up from " + layers_[piece.layer].path, n < 0 ? errno : EIO);
          got += static_cast<uint64_t>(n);
        }
      }
    }
    std::memcpy(p->bounce + (p->offset - begin), p->buf, p->len);
    src = p->bounce;
  }
  for (uint64_t g : p->fills) ++filling_[g];
  p->remaining = 1;
  auto* r = new Request{Op::kWrite, begin, src, static_cast<uint32_t>(end - begin), 0, top, false, p};
  r->use_direct = layers_[top].direct.valid() && direct_ok(begin, end - begin, src);
  std::lock_guard lock(sq_mu_);
  auto res = queue_locked(r);
  if (!res.ok()) {
    delete r;
    for (uint64_t g : p->fills)
      if (--filling_[g] == 0) filling_.erase(g);
    p->fills.clear();
  }
  return res;
}

Result<void> BlockBackend::queue_locked(Request* r) {
  io_uring_sqe* sqe = io_uring_get_sqe(ring_.get());
  if (!sqe) {
    io_uring_submit(ring_.get());
    sqe = io_uring_get_sqe(ring_.get());
    if (!sqe) return Error{"disk " + path_ + ": io_uring submission queue full"};
  }
  const Layer& layer = layers_[r->layer];
  int fd = r->use_direct ? layer.direct.get() : layer.buffered.get();
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
  if (rc < 0) {
    // The SQE stays in the ring, and the next submit would start it on a request the caller
    // frees on this error: withdraw it, as a no-op the completion loop ignores.
    io_uring_prep_nop(sqe);
    io_uring_sqe_set_data64(sqe, kVoidTag);
    return Error::from_errno("disk " + path_ + ": io_uring_submit", -rc);
  }
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
    if (data == kVoidTag) continue;
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
    finish_piece(r, res < 0 ? res : static_cast<int64_t>(r->len));
  }
}

void BlockBackend::finish_piece(Request* r, int64_t result) {
  Parent* p = r->parent;
  delete r;
  if (result < 0) {
    int64_t none = 0;
    p->error.compare_exchange_strong(none, result);
  }
  if (p->remaining.fetch_sub(1) != 1) return;
  std::vector<Parent*> failed;
  if (!p->fills.empty() || p->span_end != 0) {
    // A chain write: the top now holds what it wrote; writes that waited for its granules
    // may start (in order, each behind any granule still filling).
    std::lock_guard map_lock(map_mu_);
    if (p->error == 0) map_->add(layers_.size() - 1, p->span_begin, p->span_end - p->span_begin);
    for (uint64_t g : p->fills)
      if (--filling_[g] == 0) filling_.erase(g);
    for (auto it = waiting_.begin(); it != waiting_.end();) {
      Parent* w = *it;
      if (filling_locked(w->offset, w->len)) {
        ++it;
        continue;
      }
      it = waiting_.erase(it);
      if (!start_write_locked(w).ok()) failed.push_back(w);
    }
  }
  int64_t error = p->error;
  int64_t out = error < 0 ? error : static_cast<int64_t>(p->len);
  uint64_t tag = p->tag;
  delete p;
  done_(tag, out);
  for (Parent* w : failed) {
    uint64_t t = w->tag;
    delete w;
    done_(t, -EIO);
  }
}

}  // namespace kvmig::kvm
