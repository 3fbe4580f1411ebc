#include "helper/disk_copy_source.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>

#include "helper/uring_engine.h"

namespace kvmig::helper {
namespace {

struct Item {
  uint64_t offset = 0;
  uint64_t length = 0;
  bool data = false;
};

// [from, size) as holes and data chunks; chunks end at multiples of `chunk`, so reads stay
// aligned wherever a copy resumes.
std::vector<Item> plan(const std::vector<Extent>& extents, uint64_t from, uint64_t chunk) {
  std::vector<Item> items;
  for (const Extent& e : extents) {
    uint64_t begin = std::max(e.offset, from), end = e.offset + e.length;
    if (end <= begin) continue;
    if (!e.data) {
      items.push_back({begin, end - begin, false});
      continue;
    }
    for (uint64_t pos = begin; pos < end;) {
      uint64_t next = std::min((pos / chunk + 1) * chunk, end);
      items.push_back({pos, next - pos, true});
      pos = next;
    }
  }
  return items;
}

// What the destination says on the control stream while we send on the data stream.
struct Replies {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t acked = 0;
  uint64_t acks = 0;
  std::optional<uint64_t> stopped_at;
  std::optional<uint64_t> verified_hash;
  std::optional<Error> error;
  bool finished = false;
};

void read_replies(Stream& control, Stream& data, Replies& r) {
  for (bool last = false; !last;) {
    auto m = read_disk(control);
    std::lock_guard lock(r.mu);
    last = true;
    if (!m.ok()) {
      r.error = m.error();
    } else if (m->type() == DiskMsg::ack) {
      auto v = decode_disk_u64(m->payload, "ACK");
      if (v.ok()) r.acked = std::max(r.acked, *v), ++r.acks, last = false;
      else r.error = v.error();
    } else if (m->type() == DiskMsg::stopped) {
      auto v = decode_disk_u64(m->payload, "STOPPED");
      if (v.ok()) r.stopped_at = *v, r.acked = std::max(r.acked, *v);
      else r.error = v.error();
    } else if (m->type() == DiskMsg::verified) {
      auto v = decode_disk_u64(m->payload, "VERIFIED");
      if (v.ok()) r.verified_hash = *v;
      else r.error = v.error();
    } else if (m->type() == DiskMsg::error) {
      r.error = disk_peer_error(*m);
    } else {
      r.error = wire_error(WireCode::unexpected,
                           std::string(disk_msg_name(m->type())) + " from the destination");
    }
    r.cv.notify_all();
  }
  std::lock_guard lock(r.mu);
  r.finished = true;
  r.cv.notify_all();
  // A sender blocked on a peer that gave up must return.
  if (r.error) data.shutdown();
}

// Reads what io_uring did not (a short read, or O_DIRECT refused) with plain pread.
Result<void> finish_read(const DiskImage& image, uint8_t* buf, const Item& item, size_t done) {
  while (done < item.length) {
    ssize_t n = ::pread(image.fd.get(), buf + done, item.length - done,
                        static_cast<off_t>(item.offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error::from_errno("read " + image.path + " at " + std::to_string(item.offset + done));
    if (n == 0)
      return Error{image.path + " is shorter than its declared " + std::to_string(image.size) +
                   " bytes: end of file at " + std::to_string(item.offset + done)};
    done += static_cast<size_t>(n);
  }
  return ok();
}

struct Pipeline {
  DiskImage& image;
  Stream& data;
  const DiskSourceOptions& options;
  DiskCopyReport& report;
  XXH3_state_t& hash;
  UringEngine& engine;

  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  std::vector<uint64_t> hashes;  // one EXTENT's block hashes, for the image digest

  // --max-rate: sleep until `sent` bytes are due, so the copy spares the network and disks.
  void pace(uint64_t sent) {
    auto due = started + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                             std::chrono::duration<double>(static_cast<double>(sent) / options.max_rate));
    std::this_thread::sleep_until(due);
  }

  struct Slot {
    size_t item = 0;
    int buf = -1;  // -1: a hole, nothing to read
    bool done = false;
    int result = 0;
  };

  // Sends items in order while up to depth reads run ahead. Returns true when stopped for a
  // hand-off, false when everything was sent.
  Result<bool> run(const std::vector<Item>& items) {
    std::vector<unsigned> free_bufs;
    for (unsigned i = engine.depth(); i-- > 0;) free_bufs.push_back(i);
    std::deque<Slot> window;
    size_t next = 0;
    uint64_t sent = 0;
    int read_fd = image.direct_fd ? image.direct_fd.get() : image.fd.get();
    report.direct = image.direct_fd.valid();
    for (;;) {
      bool queued = false;
      while (next < items.size() && window.size() < 2 * engine.depth()) {
        if (!items[next].data) {
          window.push_back({next, -1, true, 0});
        } else {
          if (free_bufs.empty()) break;
          unsigned buf = free_bufs.back();
          free_bufs.pop_back();
          KVMIG_TRY(engine.read(read_fd, buf, items[next].offset, items[next].length, next));
          window.push_back({next, static_cast<int>(buf), false, 0});
          queued = true;
        }
        ++next;
      }
      if (queued) KVMIG_TRY(engine.submit());
      if (window.empty()) return false;
      if ((options.stop_after && sent >= options.stop_after) ||
          (options.stop_request && options.stop_request->load())) {
        KVMIG_TRY(send_disk(data, DiskMsg::stop));
        return true;
      }
      if (options.fault_drop_after && sent >= options.fault_drop_after) {
        data.shutdown();
        return wire_error(WireCode::io, "fault injection: connection dropped after " +
                                            std::to_string(sent) + " data bytes");
      }
      while (!window.front().done) {
        KVMIG_ASSIGN(auto c, engine.wait());
        Slot& s = window[c.tag - window.front().item];
        s.done = true;
        s.result = c.result;
      }
      Slot slot = window.front();
      window.pop_front();
      const Item& item = items[slot.item];
      if (slot.buf < 0) {
        KVMIG_TRY(send_disk(data, DiskMsg::hole, encode_range({item.offset, item.length})));
        hash_zeros(&hash, item.length);
        report.hole_bytes += item.length;
        continue;
      }
      uint8_t* buf = engine.buffer(static_cast<unsigned>(slot.buf)).data();
      if (slot.result == -EINVAL && read_fd == image.direct_fd.get()) {
        // The file system refused O_DIRECT for this file after all: read buffered from now.
        read_fd = image.fd.get();
        report.direct = false;
        slot.result = 0;
      }
      if (slot.result < 0)
        return Error::from_errno("read " + image.path + " at " + std::to_string(item.offset),
                                 -slot.result);
      KVMIG_TRY(finish_read(image, buf, item, static_cast<size_t>(slot.result)));
      std::span<const uint8_t> bytes(buf, item.length);
      for (const ZeroRun& run : split_zero_blocks(bytes, item.offset, options.block_size)) {
        if (run.zero) {
          KVMIG_TRY(send_disk(data, DiskMsg::zero, encode_range({run.offset, run.length})));
          hash_zeros(&hash, run.length);
          report.zero_bytes += run.length;
        } else {
          hashes.clear();
          KVMIG_TRY(send_extent(data, run.offset, bytes.subspan(run.offset - item.offset, run.length), &hashes));
          digest_blocks(&hash, hashes);
          report.data_bytes += run.length;
          sent += run.length;
        }
      }
      free_bufs.push_back(static_cast<unsigned>(slot.buf));
      if (options.max_rate) pace(sent);
    }
  }
};

uint32_t open_flags(const DiskSourceOptions& o) {
  return (o.overwrite ? kOpenOverwrite : 0u) | (o.keep_allocation ? kOpenKeepAllocation : 0u) |
         (o.any_size ? kOpenAnySize : 0u);
}

}  // namespace

uint64_t disk_content_id(int fd) {
  struct stat st {};
  ::fstat(fd, &st);
  uint64_t fields[] = {st.st_dev, st.st_ino, static_cast<uint64_t>(st.st_size),
                       static_cast<uint64_t>(st.st_mtim.tv_sec), static_cast<uint64_t>(st.st_mtim.tv_nsec),
                       static_cast<uint64_t>(st.st_ctim.tv_sec), static_cast<uint64_t>(st.st_ctim.tv_nsec)};
  return XXH3_64bits(fields, sizeof fields);
}

Result<DiskImage> open_disk_image(const std::string& path, const DiskSourceOptions& options) {
  DiskImage image;
  image.path = path;
  image.fd.reset(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!image.fd) return Error::from_errno("image " + path);
  struct stat st {};
  if (::fstat(image.fd.get(), &st) != 0) return Error::from_errno("fstat " + path);
  if (S_ISREG(st.st_mode)) {
    image.size = static_cast<uint64_t>(st.st_size);
  } else if (S_ISBLK(st.st_mode)) {
    if (::ioctl(image.fd.get(), BLKGETSIZE64, &image.size) != 0)
      return Error::from_errno("BLKGETSIZE64 " + path);
  } else {
    return Error{"image " + path + ": not a regular file or block device"};
  }
  if (options.expect_size && image.size != options.expect_size)
    return Error{"image " + path + " is " + std::to_string(image.size) + " bytes, declared " +
                 std::to_string(options.expect_size) +
                 (image.size < options.expect_size ? " (shorter than declared)" : "")};
  if (image.size == 0 || (image.size % kDiskSectorSize != 0 && !options.any_size))
    return Error{"image " + path + ": size " + std::to_string(image.size) +
                 " is not a non-zero multiple of 512 bytes (not aligned)"};
  image.content_id = disk_content_id(image.fd.get());
  KVMIG_ASSIGN(image.extents, scan_extents(image.fd.get(), image.size));
  // O_DIRECT needs 4 KiB-aligned I/O, which every read is when the size is a multiple of it.
  // tmpfs and some FUSE file systems refuse it at open: then reads are buffered.
  if (options.direct && image.size % 4096 == 0)
    image.direct_fd.reset(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT));
  return image;
}

bool disk_error_retriable(const Error& error) {
  if (error.message.find("peer:") != std::string::npos) return false;
  WireCode code = wire_code_of(error);
  if (code == WireCode::io || code == WireCode::truncated) return true;
  return error.sys_errno == ECONNREFUSED || error.sys_errno == ECONNRESET ||
         error.sys_errno == EPIPE || error.sys_errno == ETIMEDOUT ||
         error.sys_errno == EHOSTUNREACH || error.sys_errno == ENETUNREACH;
}

Result<DiskCopyReport> copy_disk(DiskImage& image, Connection& connection,
                                 const std::string& dest_path, const DiskSourceOptions& options) {
  auto start = std::chrono::steady_clock::now();
  if (!connection.control || connection.data.empty())
    return Error{"disk copy needs a control and a data stream"};
  Stream& control = *connection.control;
  Stream& data = *connection.data[0];
  DiskOpen open{image.size,        options.block_size, options.chunk, data_bytes(image.extents),
                image.content_id,  open_flags(options), dest_path};
  KVMIG_TRY(validate(open));
  // Registering the buffers (pinning them) takes tens of milliseconds: do it while the
  // destination opens its file, not after.
  KVMIG_ASSIGN(auto engine, UringEngine::create(options.queue_depth, options.chunk));
  KVMIG_TRY(send_disk(data, DiskMsg::open, encode(open)));
  KVMIG_ASSIGN(DiskMessage first, read_disk(control));
  if (first.type() == DiskMsg::error) return disk_peer_error(first);
  if (first.type() != DiskMsg::resume_from)
    return wire_error(WireCode::unexpected, std::string(disk_msg_name(first.type())) + " instead of RESUME_FROM");
  KVMIG_ASSIGN(uint64_t from, decode_disk_u64(first.payload, "RESUME_FROM"));
  if (from > image.size || (from % 4096 != 0 && from != image.size))
    return wire_error(WireCode::malformed, "RESUME_FROM " + std::to_string(from) +
                                               " not a 4 KiB boundary inside the image");
  DiskCopyReport report;
  report.resumed_from = from;
  report.acked = from;
  XXH3_state_t hash;
  XXH3_64bits_reset(&hash);
  if (auto r = hash_prefix(image.fd.get(), from, &hash); !r.ok())
    return std::move(r.error().prefix("hashing the resumed prefix of " + image.path));
  report.registered = engine->registered();

  Replies replies;
  std::thread reader(read_replies, std::ref(control), std::ref(data), std::ref(replies));
  Pipeline pipeline{image, data, options, report, hash, *engine};
  Result<bool> sent = pipeline.run(plan(image.extents, from, options.chunk));
  uint64_t digest = XXH3_64bits_digest(&hash);
  if (sent.ok() && !*sent) {
    if (auto r = send_disk(data, DiskMsg::done, encode(DiskDone{digest, image.size})); !r.ok())
      sent = r.error();
  }
  std::unique_lock lock(replies.mu);
  if (sent.ok())
    replies.cv.wait(lock, [&] {
      return replies.finished || replies.stopped_at || replies.verified_hash || replies.error;
    });
  lock.unlock();
  // Both sides are done with this connection, or one failed: either way, end the reader.
  control.shutdown();
  data.shutdown();
  reader.join();
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  report.acked = std::max(report.acked, replies.acked);
  report.acks = replies.acks;
  // The destination's own refusal explains a failure better than the send it broke.
  if (replies.error && (!replies.stopped_at && !replies.verified_hash) &&
      (sent.ok() || replies.error->message.find("peer:") != std::string::npos))
    return *replies.error;
  if (!sent.ok()) return sent.error();
  if (replies.stopped_at) {
    report.outcome = DiskCopyOutcome::stopped;
    report.end_offset = *replies.stopped_at;
    return report;
  }
  if (!replies.verified_hash)
    return wire_error(WireCode::truncated, "destination closed before VERIFIED");
  if (*replies.verified_hash != digest)
    return wire_error(WireCode::bad_checksum, "destination XXH3 differs from the source's");
  report.outcome = DiskCopyOutcome::verified;
  report.end_offset = image.size;
  report.acked = image.size;
  report.xxh3 = digest;
  return report;
}

}  // namespace kvmig::helper
