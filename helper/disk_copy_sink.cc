#include "helper/disk_copy_sink.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/openat2.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <future>
#include <nlohmann/json.hpp>
#include <vector>

#include "helper/disk_chain_sink.h"
#include "helper/disk_extents.h"
#include "helper/disk_messages.h"
#include "helper/uring_engine.h"

namespace kvmig::helper {
namespace {

Error sink_error(WireCode code, const std::string& text) { return wire_error(code, text); }

class Sink {
 public:
  Sink(int root, Connection& c, const DiskSinkOptions& o)
      : root_(root), control_(*c.control), data_(*c.data[0]), options_(o) {}

  Result<DiskSinkReport> run(const DiskMessage& first) {
    auto start = std::chrono::steady_clock::now();
    auto result = serve(first);
    // The background fdatasync + marker + ACK must be over before anything else touches the
    // file, the marker or the control stream.
    if (auto synced = finish_durability(); result.ok() && !synced.ok()) result = synced.error();
    report_.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (!result.ok()) {
      // Keep what is durable: drain, sync and record how far we got (unless a write failed,
      // in which case the marker keeps its last good offset), then tell the source why.
      if (engine_ && file_ && drain().ok() && !write_failed_ && ::fdatasync(file_.get()) == 0)
        (void)save_marker(pos_);
      if (!engine_ && created_) {
        // Refused before a byte was copied: leave no trace of the file we created.
        ::unlinkat(dir_.get(), name_.c_str(), 0);
        ::unlinkat(dir_.get(), marker_name().c_str(), 0);
      }
      report_.end_offset = durable_;
      (void)send_disk_error(control_, result.error());
      return result.error();
    }
    report_.end_offset = report_.verified ? open_.image_size : durable_;
    return report_;
  }

 private:
  Result<void> serve(const DiskMessage& m) {
    KVMIG_ASSIGN(open_, decode_disk_open(m.payload));
    report_.path = open_.path;
    report_.image_size = open_.image_size;
    KVMIG_TRY(open_destination());
    // The source starts reading as soon as it knows where from; the marker's fsyncs, the
    // truncate and the buffer registration below overlap with that (no byte is written
    // before they are done).
    KVMIG_TRY(send_disk(control_, DiskMsg::resume_from, encode_u64(pos_)));
    KVMIG_TRY(prepare_file());
    XXH3_64bits_reset(&hash_);
    if (auto r = hash_prefix(file_.get(), pos_, &hash_); !r.ok())
      return sink_error(WireCode::internal, open_.path + ": hashing the resumed prefix: " + r.error().message);
    KVMIG_ASSIGN(engine_, UringEngine::create(options_.queue_depth, open_.max_extent));
    offsets_.assign(engine_->depth(), {0, 0});
    for (unsigned i = engine_->depth(); i-- > 0;) free_.push_back(i);
    for (;;) {
      KVMIG_ASSIGN(DiskMessage msg, read_disk(data_));
      switch (msg.type()) {
        case DiskMsg::extent: KVMIG_TRY(on_extent(msg.header)); break;
        case DiskMsg::zero:
        case DiskMsg::hole: KVMIG_TRY(on_zero(msg)); break;
        case DiskMsg::stop: return on_stop();
        case DiskMsg::done: return on_done(msg);
        case DiskMsg::error: return disk_peer_error(msg);
        default:
          return sink_error(WireCode::unexpected, std::string(disk_msg_name(msg.type())) + " from the source");
      }
      // Progress is made durable in the background (durable_in_background): the writes and
      // the socket keep going meanwhile. Only written bytes count: a hole costs no sync.
      if (unsynced_ >= options_.ack_every) {
        sync_target_ = pos_;
        unsynced_ = 0;
      }
      KVMIG_TRY(advance_durability());
    }
  }

  // All writes below this offset have completed (the lowest write still in flight, or pos_).
  uint64_t completed_prefix() const {
    uint64_t low = pos_;
    for (const auto& [offset, length] : offsets_)
      if (length) low = std::min(low, offset);
    return low;
  }

  // Starts the background sync of sync_target_ once the writes below it are done and the
  // previous sync is over; reports a failed background sync.
  Result<void> advance_durability() {
    if (syncing_.valid()) {
      if (syncing_.wait_for(std::chrono::seconds(0)) != std::future_status::ready) return ok();
      KVMIG_TRY(syncing_.get());
    }
    if (!sync_target_ || completed_prefix() < sync_target_) return ok();
    uint64_t target = std::exchange(sync_target_, 0);
    try {
      syncing_ = std::async(std::launch::async, [this, target] { return durable_in_background(target); });
    } catch (const std::system_error&) {
      return durable_in_background(target);  // no thread to be had: in line, as it used to be
    }
    return ok();
  }

  Result<void> finish_durability() {
    sync_target_ = 0;
    return syncing_.valid() ? syncing_.get() : ok();
  }

  // On the background thread: every write below `offset` has completed. Until this returns
  // the main thread touches neither the marker nor the control stream nor durable_. Drained
  // and in-line, as before, this stalled the copy once per ACK for the writes in flight, an
  // fdatasync and the marker's two fsyncs (about a quarter of the destination's time).
  Result<void> durable_in_background(uint64_t offset) {
    if (::fdatasync(file_.get()) != 0) return io_error("fdatasync");
    KVMIG_TRY(save_marker(offset));
    return send_disk(control_, DiskMsg::ack, encode_u64(offset));
  }

  // Resolves the destination beneath the root, decides where the copy starts and makes the
  // file the image's size (sparse).
  Result<void> open_destination() {
    size_t slash = open_.path.rfind('/');
    std::string parent = slash == std::string::npos ? "." : open_.path.substr(0, slash);
    name_ = slash == std::string::npos ? open_.path : open_.path.substr(slash + 1);
    dir_.reset(open_beneath(root_, parent, O_RDONLY | O_DIRECTORY));
    if (!dir_)
      return sink_error(errno == EXDEV ? WireCode::malformed : WireCode::internal,
                        "destination directory '" + parent + "': " +
                            (errno == EXDEV ? std::string("escapes the served root") : std::strerror(errno)));
    file_.reset(::openat(dir_.get(), name_.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW));
    bool existed = file_.valid();
    if (!existed) {
      if (errno != ENOENT) return io_error("open");
      file_.reset(::openat(dir_.get(), name_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644));
      if (!file_) return io_error("create");
      created_ = true;
    }
    struct stat st {};
    ::fstat(file_.get(), &st);
    if (!S_ISREG(st.st_mode)) return sink_error(WireCode::malformed, open_.path + ": not a regular file");
    // Two servers sharing storage (a hand-off) must never write one image at once.
    if (::flock(file_.get(), LOCK_EX | LOCK_NB) != 0)
      return sink_error(WireCode::unexpected, open_.path + ": busy, another kvmig disk serve is writing it");
    uint64_t resume = 0;
    bool marker = read_marker(&resume);
    if (existed && !marker && !(open_.flags & kOpenOverwrite))
      return sink_error(WireCode::config_mismatch,
                        open_.path + " exists and is not a partial kvmig copy (use --overwrite to replace it)");
    uint64_t allocated = existed ? static_cast<uint64_t>(st.st_blocks) * 512 : 0;
    struct statvfs vfs {};
    if (::fstatvfs(file_.get(), &vfs) == 0) {
      uint64_t free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
      uint64_t need = open_.data_bytes > allocated ? open_.data_bytes - allocated : 0;
      if (need > free_bytes)
        return sink_error(WireCode::internal, open_.path + ": destination disk full: " +
                                                  std::to_string(free_bytes) + " bytes free, the image needs up to " +
                                                  std::to_string(need));
    }
    pos_ = durable_ = resume;
    fresh_ = resume == 0;
    report_.resumed_from = resume;
    return ok();
  }

  Result<void> prepare_file() {
    if (fresh_) {
      // A new copy starts from a sparse file: old contents (an --overwrite, or a partial
      // copy of another image version) must not survive in what will be holes.
      KVMIG_TRY(save_marker(0));
      if (::ftruncate(file_.get(), 0) != 0) return io_error("truncate");
    }
    if (::ftruncate(file_.get(), static_cast<off_t>(open_.image_size)) != 0) return io_error("size");
    if (options_.direct && open_.image_size % 4096 == 0)
      direct_.reset(::openat(dir_.get(), name_.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW | O_DIRECT));
    report_.direct = direct_.valid();
    return ok();
  }

  Error io_error(const std::string& what) {
    int err = errno;
    return sink_error(WireCode::internal, what + " " + open_.path + ": " + std::strerror(err) +
                                              (err == ENOSPC || err == EFBIG ? " (destination disk full)" : ""));
  }

  std::string marker_name() const { return name_ + kPartialSuffix; }

  // The marker says: this file is a partial copy of image `content_id` of `size` bytes, and
  // every byte below `acked` is durable.
  bool read_marker(uint64_t* acked) {
    Fd fd(::openat(dir_.get(), marker_name().c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
    if (!fd) return false;
    char buf[1024];
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n <= 0) return true;  // ours, but unreadable: start over
    auto j = nlohmann::json::parse(std::string(buf, static_cast<size_t>(n)), nullptr, false);
    if (j.is_discarded() || !j.is_object()) return true;
    uint64_t id = j.value("content_id", uint64_t{0}), size = j.value("size", uint64_t{0});
    uint64_t off = j.value("acked", uint64_t{0});
    if (id == open_.content_id && size == open_.image_size && off <= size && off % 4096 == 0)
      *acked = off;
    return true;
  }

  Result<void> save_marker(uint64_t acked) {
    nlohmann::json j{{"content_id", open_.content_id}, {"size", open_.image_size}, {"acked", acked}};
    std::string text = j.dump() + "\n", tmp = marker_name() + ".tmp";
    Fd fd(::openat(dir_.get(), tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644));
    if (!fd) return io_error("marker for");
    if (::write(fd.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size()) ||
        ::fsync(fd.get()) != 0)
      return io_error("marker for");
    if (::renameat(dir_.get(), tmp.c_str(), dir_.get(), marker_name().c_str()) != 0)
      return io_error("marker for");
    ::fsync(dir_.get());
    durable_ = acked;
    return ok();
  }

  Result<void> finish_write(unsigned buf, int result) {
    auto [offset, length] = offsets_[buf];
    uint8_t* data = engine_->buffer(buf).data();
    size_t done = result > 0 ? static_cast<size_t>(result) : 0;
    if (result == -EINVAL && direct_) {
      direct_.reset();  // O_DIRECT refused after all: buffered from now on
      report_.direct = false;
    } else if (result < 0) {
      errno = -result;
      write_failed_ = true;
      return io_error("write at " + std::to_string(offset) + " of");
    }
    while (done < length) {
      ssize_t n = ::pwrite(file_.get(), data + done, length - done, static_cast<off_t>(offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        if (n == 0) errno = ENOSPC;
        write_failed_ = true;
        return io_error("write at " + std::to_string(offset + done) + " of");
      }
      done += static_cast<size_t>(n);
    }
    offsets_[buf] = {0, 0};
    free_.push_back(buf);
    return ok();
  }

  Result<void> reap_one() {
    KVMIG_ASSIGN(auto c, engine_->wait());
    return finish_write(static_cast<unsigned>(c.tag), c.result);
  }

  Result<void> drain() {
    while (engine_ && engine_->in_flight() > 0) KVMIG_TRY(reap_one());
    return ok();
  }

  Result<void> sync() {
    KVMIG_TRY(drain());
    if (::fdatasync(file_.get()) != 0) return io_error("fdatasync");
    return save_marker(pos_);
  }

  Result<void> check_range(const DiskRange& r, const char* what) {
    if (r.offset != pos_ || r.length > open_.image_size - pos_)
      return sink_error(WireCode::malformed, std::string(what) + " [" + std::to_string(r.offset) + ", +" +
                                                 std::to_string(r.length) + ") is not the next range after " +
                                                 std::to_string(pos_) + " inside the image");
    return ok();
  }

  Result<void> on_extent(const DiskHeader& header) {
    while (free_.empty()) KVMIG_TRY(reap_one());
    while (auto c = engine_->poll()) KVMIG_TRY(finish_write(static_cast<unsigned>(c->tag), c->result));
    unsigned buf = free_.back();
    KVMIG_ASSIGN(DiskRange r, read_extent_into(data_, header, engine_->buffer(buf), &hashes_));
    KVMIG_TRY(check_range(r, "EXTENT"));
    free_.pop_back();
    digest_blocks(&hash_, hashes_);
    offsets_[buf] = {r.offset, r.length};
    bool aligned = (r.offset | r.length) % 4096 == 0;
    int fd = direct_ && aligned ? direct_.get() : file_.get();
    KVMIG_TRY(engine_->write(fd, buf, r.offset, r.length, buf));
    KVMIG_TRY(engine_->submit());
    pos_ += r.length;
    unsynced_ += r.length;
    report_.written += r.length;
    return ok();
  }

  Result<void> on_zero(const DiskMessage& msg) {
    KVMIG_ASSIGN(DiskRange r, decode_disk_range(msg.payload, disk_msg_name(msg.type())));
    KVMIG_TRY(check_range(r, disk_msg_name(msg.type())));
    // A kvmig delta's zeros are its own (its holes would show the parent): write them.
    // Otherwise a fresh file is a hole past pos_ already, and a resumed one may hold
    // unacknowledged bytes of the earlier connection there: punch them out (or write zeros
    // where punching is not supported).
    bool keep = msg.type() == DiskMsg::zero && (open_.flags & kOpenKeepAllocation);
    if (keep || (!fresh_ &&
        ::fallocate(file_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(r.offset), static_cast<off_t>(r.length)) != 0)) {
      static const std::vector<uint8_t> zeros(1 << 20);
      for (uint64_t done = 0; done < r.length;) {
        size_t n = std::min<uint64_t>(zeros.size(), r.length - done);
        if (::pwrite(file_.get(), zeros.data(), n, static_cast<off_t>(r.offset + done)) != static_cast<ssize_t>(n))
          return io_error("zeroing");
        done += n;
      }
      unsynced_ += r.length;
    }
    hash_zeros(&hash_, r.length);
    pos_ += r.length;
    report_.zero_bytes += r.length;
    return ok();
  }

  Result<void> on_stop() {
    KVMIG_TRY(finish_durability());
    KVMIG_TRY(sync());
    // Release the file (and its lock) before saying STOPPED: the next server may open it
    // the moment the source hears it.
    direct_.reset();
    file_.reset();
    report_.stopped = true;
    return send_disk(control_, DiskMsg::stopped, encode_u64(durable_));
  }

  Result<void> on_done(const DiskMessage& msg) {
    KVMIG_ASSIGN(DiskDone done, decode_disk_done(msg.payload));
    if (pos_ != open_.image_size || done.image_size != open_.image_size)
      return sink_error(WireCode::malformed, "DONE at " + std::to_string(pos_) + " of " +
                                                 std::to_string(open_.image_size) + " bytes");
    KVMIG_TRY(finish_durability());
    KVMIG_TRY(drain());
    if (::fdatasync(file_.get()) != 0) return io_error("fdatasync");
    report_.xxh3 = XXH3_64bits_digest(&hash_);
    if (report_.xxh3 != done.xxh3) {
      (void)save_marker(0);  // nothing here can be trusted: a retry copies it all again
      return sink_error(WireCode::bad_checksum, open_.path + ": XXH3 of the written image differs from the source's");
    }
    if (::unlinkat(dir_.get(), marker_name().c_str(), 0) != 0 && errno != ENOENT) return io_error("remove marker of");
    ::fsync(dir_.get());
    file_.reset();
    report_.verified = true;
    return send_disk(control_, DiskMsg::verified, encode_u64(report_.xxh3));
  }

  int root_;
  Stream& control_;
  Stream& data_;
  const DiskSinkOptions& options_;
  DiskOpen open_;
  DiskSinkReport report_;
  std::string name_;
  Fd dir_, file_, direct_;
  uint64_t pos_ = 0, durable_ = 0;
  uint64_t unsynced_ = 0;     // bytes written since the last sync point
  uint64_t sync_target_ = 0;  // an offset to make durable once the writes below it are done
  std::future<Result<void>> syncing_;  // the background fdatasync + marker + ACK
  bool fresh_ = false, write_failed_ = false, created_ = false;
  XXH3_state_t hash_;
  std::unique_ptr<UringEngine> engine_;
  std::vector<std::pair<uint64_t, uint64_t>> offsets_;  // per buffer: the write it carries
  std::vector<unsigned> free_;
  std::vector<uint64_t> hashes_;  // the current EXTENT's block hashes
};

}  // namespace

int open_beneath(int dir, const std::string& path, uint64_t flags, mode_t mode) {
  open_how how{};
  how.flags = flags | O_CLOEXEC;
  how.mode = (flags & O_CREAT) ? mode : 0;
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
  return static_cast<int>(::syscall(SYS_openat2, dir, path.c_str(), &how, sizeof how));
}

Result<Fd> open_disk_root(const std::string& root) {
  Fd fd(::open(root.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd) return Error::from_errno("--root " + root);
  return fd;
}

Result<DiskSinkReport> receive_disk(int root_fd, Connection& connection,
                                    const DiskSinkOptions& options) {
  if (!connection.control || connection.data.empty())
    return Error{"disk serve needs a control and a data stream"};
  if (auto* s = dynamic_cast<FdStream*>(connection.data[0].get())) {
    timeval tv{options.idle_timeout_s, 0};
    ::setsockopt(s->fd(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  }
  Stream& control = *connection.control;
  auto first = read_disk(*connection.data[0]);
  if (!first.ok()) {
    (void)send_disk_error(control, first.error());
    return first.error();
  }
  switch (first->type()) {
    case DiskMsg::open: {
      Sink sink(root_fd, connection, options);
      return sink.run(*first);
    }
    case DiskMsg::chain:
    case DiskMsg::link: return serve_disk_chain(root_fd, control, *first, options);
    default: {
      Error e = sink_error(WireCode::unexpected, std::string(disk_msg_name(first->type())) + " before OPEN");
      (void)send_disk_error(control, e);
      return e;
    }
  }
}

}  // namespace kvmig::helper
