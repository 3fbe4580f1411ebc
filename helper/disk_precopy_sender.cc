#include "helper/disk_precopy_sender.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <deque>

#include "helper/disk_extents.h"
#include "helper/messages.h"
#include "helper/uring_engine.h"

namespace kvmig::helper {
namespace {

using Clock = std::chrono::steady_clock;

struct Item {
  uint64_t offset = 0;
  uint64_t length = 0;
};

// Contiguous blocks coalesced into reads of at most `chunk` bytes (a multiple of the block).
std::vector<Item> coalesce(const DiskPrecopyPlan& plan, std::span<const uint64_t> blocks, uint64_t chunk) {
  std::vector<Item> items;
  const uint64_t bs = plan.config().block_bytes;
  for (uint64_t b : blocks) {
    uint64_t off = b * bs, len = plan.block_length(b);
    if (!items.empty() && items.back().offset + items.back().length == off &&
        items.back().length + len <= chunk) {
      items.back().length += len;
    } else {
      items.push_back({off, len});
    }
  }
  return items;
}

// Finishes a read io_uring left short (or that O_DIRECT refused) with plain pread.
Result<void> finish_read(int fd, uint8_t* buf, const Item& item, size_t done) {
  while (done < item.length) {
    ssize_t n = ::pread(fd, buf + done, item.length - done, static_cast<off_t>(item.offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error::from_errno("disk read at " + std::to_string(item.offset + done));
    // The image shrank under the VM: the pre-copy cannot be right any more.
    if (n == 0) return Error{"disk image ends at " + std::to_string(item.offset + done) + ", before its declared size"};
    done += static_cast<size_t>(n);
  }
  return ok();
}

}  // namespace

Result<std::unique_ptr<DiskPrecopySender>> DiskPrecopySender::create(std::vector<DiskSource> disks,
                                                                     const DiskSenderOptions& options) {
  if (disks.empty() || disks.size() > kMaxMigrationDisks)
    return Error{"disk pre-copy: " + std::to_string(disks.size()) + " disks, want 1.." +
                 std::to_string(kMaxMigrationDisks)};
  std::unique_ptr<DiskPrecopySender> s(new DiskPrecopySender);
  s->options_ = options;
  uint64_t buffer = std::max<uint64_t>(options.chunk, 4096);
  for (size_t i = 0; i < disks.size(); ++i) {
    const DiskSource& d = disks[i];
    std::string which = "disk " + std::to_string(i);
    if (d.fd < 0 || !d.log) return Error{which + ": no image or no write log"};
    struct stat st {};
    if (::fstat(d.fd, &st) != 0) return Error::from_errno(which + ": fstat");
    uint64_t size = d.log->disk_bytes();
    if (S_ISREG(st.st_mode) && static_cast<uint64_t>(st.st_size) < size)
      return Error{which + ": image is " + std::to_string(st.st_size) + " bytes, shorter than its device's " +
                   std::to_string(size)};
    if (size == 0 || size % 512 != 0)
      return Error{which + ": size " + std::to_string(size) + " is not a non-zero multiple of 512"};
    buffer = std::max<uint64_t>(buffer, d.log->block_bytes());
  }
  buffer = (buffer + 4095) / 4096 * 4096;
  KVMIG_ASSIGN(s->engine_, UringEngine::create(options.queue_depth, buffer));
  for (DiskSource& d : disks) {
    d.log->start();
    KVMIG_ASSIGN(std::vector<Extent> extents, scan_extents(d.fd, d.log->disk_bytes(), d.log->block_bytes()));
    DiskPlanConfig pc = options.plan;
    pc.disk_bytes = d.log->disk_bytes();
    pc.block_bytes = d.log->block_bytes();
    std::vector<uint64_t> data_blocks;
    for (const Extent& e : extents) {
      if (!e.data) continue;
      for (uint64_t b = e.offset / pc.block_bytes; b * pc.block_bytes < e.offset + e.length; ++b)
        data_blocks.push_back(b);
    }
    s->declared_.disks.push_back({pc.disk_bytes, data_bytes(extents), static_cast<uint32_t>(pc.block_bytes)});
    s->plans_.emplace_back(pc, data_blocks);
    s->direct_ok_.push_back(d.direct_fd >= 0);
  }
  s->disks_ = std::move(disks);
  return s;
}

DiskPrecopySender::~DiskPrecopySender() = default;

void DiskPrecopySender::stop_tracking() {
  for (DiskSource& d : disks_) d.log->stop();
}

Result<void> DiskPrecopySender::declare(Stream& control, uint16_t version) {
  KVMIG_TRY(send_message(control, version, MsgType::disks, encode(declared_)));
  KVMIG_ASSIGN(Message reply, read_message(control, version, WireLimits{}));
  if (reply.type() == MsgType::error || reply.type() == MsgType::abort) return peer_error(reply);
  if (reply.type() != MsgType::disks_ready)
    return wire_error(WireCode::unexpected, std::string("expected DISKS_READY, got ") + msg_type_name(reply.type()));
  KVMIG_ASSIGN(ready_, decode_disks_ready(reply.payload, declared_));
  return ok();
}

uint64_t DiskPrecopySender::observe() {
  uint64_t bytes = 0;
  for (size_t i = 0; i < disks_.size(); ++i) {
    std::vector<kvm::BlockWriteLog::DirtyBlock> dirty = disks_[i].log->harvest();
    std::vector<BlockWrites> writes;
    writes.reserve(dirty.size());
    for (const auto& d : dirty) writes.push_back({d.index, d.writes});
    bytes += plans_[i].observe(writes);
  }
  last_dirty_bytes_ = bytes;
  return bytes;
}

uint64_t DiskPrecopySender::pending_bytes() const {
  uint64_t n = 0;
  for (const auto& p : plans_) n += p.pending_bytes();
  return n;
}

bool DiskPrecopySender::bulk_done() const {
  return std::all_of(plans_.begin(), plans_.end(), [](const auto& p) { return p.bulk_done(); });
}

DiskConvergence DiskPrecopySender::convergence(double dirty_rate, double bandwidth) const {
  return disk_converged(pending_bytes(), bandwidth > 0 ? bandwidth : bandwidth_, dirty_rate,
                        options_.plan);
}

Result<DiskRoundStats> DiskPrecopySender::send_round(Stream& control, uint16_t version, uint64_t max_bytes) {
  DiskRoundStats stats;
  stats.round = ++round_;
  stats.dirty_bytes = last_dirty_bytes_;
  auto begin = Clock::now();
  uint64_t left = max_bytes;
  for (size_t i = 0; i < disks_.size(); ++i) {
    if (max_bytes && left == 0) break;
    DiskRoundPlan plan = plans_[i].plan_round(bandwidth_, max_bytes ? left : 0);
    stats.deferred_blocks += plan.deferred_blocks;
    stats.newly_deferred += plan.newly_deferred;
    stats.cooled += plan.cooled;
    KVMIG_TRY(send_blocks(control, version, i, plan.send, stats));
    if (max_bytes) left -= std::min(left, plan.send_bytes);
  }
  stats.seconds = std::chrono::duration<double>(Clock::now() - begin).count();
  // Rounds under 1 MiB measure latency more than bandwidth.
  if (stats.seconds > 0 && (stats.wire_bytes >= (1u << 20) || bandwidth_ == 0) && stats.wire_bytes > 0)
    bandwidth_ = stats.wire_bytes / stats.seconds;
  return stats;
}

Result<DiskRoundStats> DiskPrecopySender::send_final(Stream& control, uint16_t version) {
  DiskRoundStats stats;
  stats.dirty_bytes = observe();
  stats.round = ++round_;
  auto begin = Clock::now();
  for (size_t i = 0; i < disks_.size(); ++i) {
    DiskRoundPlan plan = plans_[i].plan_final();
    stats.deferred_blocks += plan.deferred_blocks;
    KVMIG_TRY(send_blocks(control, version, i, plan.send, stats));
  }
  stats.seconds = std::chrono::duration<double>(Clock::now() - begin).count();
  return stats;
}

Result<void> DiskPrecopySender::send_blocks(Stream& control, uint16_t version, size_t disk,
                                            std::span<const uint64_t> blocks, DiskRoundStats& stats) {
  if (blocks.empty()) return ok();
  const DiskPrecopyPlan& plan = plans_[disk];
  const uint64_t bs = plan.config().block_bytes;
  const uint64_t chunk = std::max(bs, std::min<uint64_t>(engine_->buffer_size(), options_.chunk) / bs * bs);
  std::vector<Item> items = coalesce(plan, blocks, chunk);
  const DiskSource& src = disks_[disk];
  std::vector<unsigned> free_bufs;
  for (unsigned b = engine_->depth(); b-- > 0;) free_bufs.push_back(b);
  struct Slot {
    unsigned buf = 0;
    bool done = false;
    bool direct = false;
    int result = 0;
  };
  std::deque<Slot> window;  // reads in flight, in item order
  size_t next = 0, first = 0;
  // On any error, reap what is in flight before the buffers are reused.
  auto drain = [&] {
    while (engine_->in_flight() > 0)
      if (!engine_->wait().ok()) break;
  };
  while (first < items.size()) {
    bool queued = false;
    while (next < items.size() && !free_bufs.empty()) {
      const Item& it = items[next];
      unsigned buf = free_bufs.back();
      free_bufs.pop_back();
      bool direct = direct_ok_[disk] && (it.offset | it.length) % 4096 == 0;
      if (auto r = engine_->read(direct ? src.direct_fd : src.fd, buf, it.offset, it.length, next); !r.ok()) {
        drain();
        return r.error();
      }
      window.push_back({buf, false, direct, 0});
      ++next;
      queued = true;
    }
    if (queued) {
      if (auto r = engine_->submit(); !r.ok()) {
        drain();
        return r.error();
      }
    }
    while (!window.front().done) {
      auto c = engine_->wait();
      if (!c.ok()) {
        drain();
        return c.error();
      }
      Slot& s = window[c->tag - first];
      s.done = true;
      s.result = c->result;
    }
    Slot slot = window.front();
    window.pop_front();
    const Item& it = items[first];
    uint8_t* data = engine_->buffer(slot.buf).data();
    if (slot.result == -EINVAL && slot.direct) {
      direct_ok_[disk] = false;  // the file system refused O_DIRECT after all: buffered from now
      slot.result = 0;
    }
    Result<void> r = slot.result < 0
                         ? Result<void>(Error::from_errno("disk " + std::to_string(disk) + " read at " +
                                                              std::to_string(it.offset),
                                                          -slot.result))
                         : finish_read(src.fd, data, it, static_cast<size_t>(slot.result));
    if (r.ok() && src.fill_holes) r = src.fill_holes(it.offset, data, it.length);
    if (r.ok()) {
      std::span<const uint8_t> bytes(data, it.length);
      std::vector<DiskRun> runs;
      std::vector<iovec> iov;
      for (const ZeroRun& z : split_zero_blocks(bytes, it.offset, static_cast<uint32_t>(bs))) {
        runs.push_back({z.offset, static_cast<uint32_t>(z.length), z.zero ? DiskRunKind::zero : DiskRunKind::data});
        if (z.zero) stats.zero_bytes += z.length;
        else iov.push_back({data + (z.offset - it.offset), z.length});
      }
      std::vector<uint8_t> head =
          encode_disk_blocks_head(options_.index_base + static_cast<uint32_t>(disk), round_, runs);
      r = send_disk_blocks(control, version, head, iov);
      stats.wire_bytes += kHeaderSize + head.size();
      for (const iovec& v : iov) stats.wire_bytes += v.iov_len;
    }
    if (!r.ok()) {
      drain();
      return r.error();
    }
    stats.bytes += it.length;
    stats.blocks += (it.length + bs - 1) / bs;
    free_bufs.push_back(slot.buf);
    ++first;
  }
  return ok();
}

}  // namespace kvmig::helper
