#include "helper/disk_precopy_receiver.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>

#include "helper/messages.h"
#include "helper/uring_engine.h"

namespace kvmig::helper {
namespace {

Error copy_error(const std::string& path, const std::string& what, int err = errno) {
  return wire_error(WireCode::internal, "disk copy " + path + ": " + what + ": " + std::strerror(err) +
                                            (err == ENOSPC || err == EFBIG ? " (destination disk full)" : ""));
}

}  // namespace

Result<std::unique_ptr<DiskPrecopyReceiver>> DiskPrecopyReceiver::open(const DisksMsg& declared,
                                                                       std::span<const std::string> paths,
                                                                       const DiskReceiverOptions& options) {
  if (paths.size() != declared.disks.size())
    return wire_error(WireCode::config_mismatch,
                      "the source migrates " + std::to_string(declared.disks.size()) + " disk(s), this destination has " +
                          std::to_string(paths.size()) + " --disk path(s)");
  std::unique_ptr<DiskPrecopyReceiver> r(new DiskPrecopyReceiver);
  r->declared_ = declared;
  r->options_ = options;
  for (size_t i = 0; i < paths.size(); ++i) {
    const MigrationDisk& d = declared.disks[i];
    Copy c;
    c.path = paths[i];
    c.fd.reset(::open(c.path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW));
    if (!c.fd) {
      if (errno != ENOENT) {
        r->discard();
        return copy_error(c.path, "open");
      }
      c.fd.reset(::open(c.path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644));
      if (!c.fd) {
        r->discard();
        return copy_error(c.path, "create");
      }
      c.created = true;
    }
    // Pushed first so discard() removes a file this receiver created, whatever fails next.
    r->copies_.push_back(std::move(c));
    Copy& copy = r->copies_.back();
    auto fail = [&](Error e) {
      r->discard();
      return e;
    };
    struct stat st {};
    if (::fstat(copy.fd.get(), &st) != 0) return fail(copy_error(copy.path, "fstat"));
    if (!S_ISREG(st.st_mode))
      return fail(wire_error(WireCode::config_mismatch, "disk copy " + copy.path + ": not a regular file"));
    if (st.st_size != 0 && !copy.created)
      return fail(wire_error(WireCode::config_mismatch,
                             "disk copy " + copy.path + " exists and is not empty: a migrated disk is written "
                                                        "to a new or empty file"));
    if (::flock(copy.fd.get(), LOCK_EX | LOCK_NB) != 0)
      return fail(wire_error(WireCode::config_mismatch, "disk copy " + copy.path + ": busy (locked by another kvmig)"));
    if (::ftruncate(copy.fd.get(), static_cast<off_t>(d.size)) != 0) return fail(copy_error(copy.path, "set size"));
    if (options.direct && d.size % 4096 == 0)
      copy.direct.reset(::open(copy.path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW | O_DIRECT));
  }
  if (auto c = r->open_chains(); !c.ok()) {
    r->discard();
    return std::move(c.error());
  }
  auto engine = UringEngine::create(options.queue_depth, options.buffer_bytes);
  if (!engine.ok()) {
    r->discard();
    return std::move(engine.error());
  }
  r->engine_ = std::move(*engine);
  r->pending_.assign(r->engine_->depth(), {});
  for (unsigned b = r->engine_->depth(); b-- > 0;) r->free_.push_back(b);
  DiskPrecopyReceiver* self = r.get();
  r->syncer_ = std::thread([self] { self->sync_loop(); });
  return r;
}

DiskPrecopyReceiver::~DiskPrecopyReceiver() {
  stop_verifier();
  stop_syncer();
  // The engine reaps what is still in flight before its buffers go.
  engine_.reset();
}

void DiskPrecopyReceiver::sync_loop() {
  uint64_t synced = 0;
  std::unique_lock lock(sync_mu_);
  while (!sync_stop_) {
    sync_cv_.wait_for(lock, std::chrono::milliseconds(10));
    uint64_t done = completed_.load();
    if (sync_stop_ || done == synced) continue;
    lock.unlock();
    // Errors here are not lost: finish() syncs again and reports them.
    for (Copy& c : copies_) (void)::fdatasync(c.fd.get());
    synced = done;
    lock.lock();
  }
}

void DiskPrecopyReceiver::stop_syncer() {
  {
    std::lock_guard lock(sync_mu_);
    sync_stop_ = true;
  }
  sync_cv_.notify_all();
  if (syncer_.joinable()) syncer_.join();
}

void DiskPrecopyReceiver::discard() {
  stop_verifier();  // before the files go: it must not write a sidecar next to a removed copy
  stop_syncer();
  engine_.reset();
  for (Copy& c : copies_) {
    c.direct.reset();
    c.fd.reset();
    if (c.created) {
      ::unlink(c.path.c_str());
      ::unlink((c.path + kvm::kChainDeltaSuffix).c_str());
      ::unlink((c.path + kLayerIdSuffix).c_str());
    }
    c.created = false;
  }
  for (const std::string& sidecar : sidecars_) ::unlink(sidecar.c_str());
  sidecars_.clear();
}

Result<void> DiskPrecopyReceiver::reap_one() {
  KVMIG_ASSIGN(auto c, engine_->wait());
  unsigned buf = static_cast<unsigned>(c.tag);
  Pending p = pending_[buf];
  Copy& copy = copies_[p.disk];
  size_t done = c.result > 0 ? static_cast<size_t>(c.result) : 0;
  if (c.result == -EINVAL && p.direct) {
    copy.direct.reset();  // O_DIRECT refused after all: buffered from now on
  } else if (c.result < 0) {
    return copy_error(copy.path, "write at " + std::to_string(p.offset), -c.result);
  }
  const uint8_t* data = engine_->buffer(buf).data();
  while (done < p.length) {
    ssize_t n = ::pwrite(copy.fd.get(), data + done, p.length - done, static_cast<off_t>(p.offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return copy_error(copy.path, "write at " + std::to_string(p.offset + done), n == 0 ? ENOSPC : errno);
    done += static_cast<size_t>(n);
  }
  free_.push_back(buf);
  completed_.fetch_add(1);
  return ok();
}

Result<void> DiskPrecopyReceiver::drain() {
  while (engine_ && engine_->in_flight() > 0) KVMIG_TRY(reap_one());
  return ok();
}

Result<void> DiskPrecopyReceiver::write_zeros(size_t disk, uint64_t offset, uint64_t length) {
  Copy& copy = copies_[disk];
  // A zero block reads as zeros once punched, and takes no space; where punching is not
  // supported, write the zeros.
  if (!copy.keep_allocation &&
      ::fallocate(copy.fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                  static_cast<off_t>(length)) == 0)
    return ok();
  static const std::vector<uint8_t> zeros(1 << 20);
  for (uint64_t done = 0; done < length;) {
    size_t n = std::min<uint64_t>(zeros.size(), length - done);
    if (::pwrite(copy.fd.get(), zeros.data(), n, static_cast<off_t>(offset + done)) != static_cast<ssize_t>(n))
      return copy_error(copy.path, "zeroing at " + std::to_string(offset + done));
    done += n;
  }
  return ok();
}

Result<void> DiskPrecopyReceiver::on_blocks(std::span<const uint8_t> payload) {
  if (!engine_) return wire_error(WireCode::unexpected, "DISK_BLOCKS after the disks were closed");
  KVMIG_ASSIGN(DiskBlocks m, decode_disk_blocks(payload, targets_));
  // The source sends every copied layer whole before the first block of a disk (a held layer
  // has no index at all). After that, a layer's copy is complete and being verified: a block
  // for it now would change it after (or while) it is checked.
  bool layer = m.disk >= declared_.disks.size();
  if (layer && layers_closed_)
    return wire_error(WireCode::unexpected, "DISK_BLOCKS for copied layer " + copies_[m.disk].path +
                                                " after the disks' own blocks began (its copy was complete)");
  // A copy found wrong ends the migration as soon as it is known.
  if (verify_done_.load(std::memory_order_acquire) && verify_error_) return *verify_error_;
  if (!layer && !layers_closed_) KVMIG_TRY(close_layers());
  if (any_ && m.round < round_)
    return wire_error(WireCode::unexpected, "DISK_BLOCKS of round " + std::to_string(m.round) + " after round " +
                                                std::to_string(round_));
  if (!any_ || m.round != round_) {
    // A block resent in this round must not be overtaken by its older write still in flight.
    KVMIG_TRY(drain());
    round_ = m.round;
    any_ = true;
    ++stats_.rounds;
  }
  ++stats_.messages;
  size_t pos = 0;
  for (const DiskRun& run : m.runs) {
    if (run.kind == DiskRunKind::zero) {
      KVMIG_TRY(write_zeros(m.disk, run.offset, run.length));
      stats_.zero_bytes += run.length;
      continue;
    }
    for (uint64_t done = 0; done < run.length;) {
      while (free_.empty()) KVMIG_TRY(reap_one());
      unsigned buf = free_.back();
      free_.pop_back();
      uint64_t n = std::min<uint64_t>(engine_->buffer_size(), run.length - done);
      std::memcpy(engine_->buffer(buf).data(), m.data.data() + pos, n);
      uint64_t offset = run.offset + done;
      Copy& copy = copies_[m.disk];
      bool direct = copy.direct && (offset | n) % 4096 == 0;
      pending_[buf] = {m.disk, offset, n, direct};
      KVMIG_TRY(engine_->write(direct ? copy.direct.get() : copy.fd.get(), buf, offset, n, buf));
      pos += n;
      done += n;
      stats_.data_bytes += n;
    }
  }
  KVMIG_TRY(engine_->submit());
  return ok();
}

Result<void> DiskPrecopyReceiver::finish() {
  KVMIG_TRY(drain());
  if (!layers_closed_) KVMIG_TRY(close_layers());  // no top block at all: checked now, in the pause
  KVMIG_TRY(verify_result());
  stop_syncer();
  for (Copy& c : copies_)
    if (::fdatasync(c.fd.get()) != 0) return copy_error(c.path, "fdatasync");
  return ok();
}

Result<std::unique_ptr<DiskPrecopyReceiver>> accept_disks(Stream& control, uint16_t version,
                                                          std::span<const uint8_t> disks_payload,
                                                          std::span<const std::string> paths,
                                                          const DiskReceiverOptions& options) {
  KVMIG_ASSIGN(DisksMsg declared, decode_disks(disks_payload));
  KVMIG_ASSIGN(std::unique_ptr<DiskPrecopyReceiver> receiver, DiskPrecopyReceiver::open(declared, paths, options));
  if (auto r = send_message(control, version, MsgType::disks_ready, encode(receiver->ready())); !r.ok()) {
    receiver->discard();
    return std::move(r.error());
  }
  return receiver;
}

}  // namespace kvmig::helper

namespace kvmig::helper {

Result<void> DiskPrecopyReceiver::open_chains() {
  targets_ = declared_.disks;
  ChainPlacements placed_so_far;
  // A disk's copy is never another disk's layer (a zero ID matches no declared layer).
  for (const Copy& c : copies_) placed_so_far.by_path.emplace(c.path, ChainPlacements::Entry{});
  std::vector<std::vector<PlacedLayer>> plans(declared_.disks.size());
  for (size_t i = 0; i < declared_.disks.size(); ++i) {
    if (!declared_.disks[i].lower.empty()) {
      KVMIG_ASSIGN(plans[i], plan_chain(copies_[i].path, declared_.disks[i], placed_so_far));
    }
  }
  KVMIG_TRY(check_room(plans));
  for (size_t i = 0; i < declared_.disks.size(); ++i) {
    const MigrationDisk& d = declared_.disks[i];
    if (d.lower.empty()) continue;
    copies_[i].keep_allocation = true;
    for (size_t j = 0; j < plans[i].size(); ++j) {
      const PlacedLayer& p = plans[i][j];
      ready_.layers.push_back(p.answer);
      if (p.answer == LayerAnswer::held) continue;  // held here, or copied once for an earlier disk
      // Created and opened in one step and recorded at once: discard() then removes exactly
      // the files this receiver created, wherever a later step fails.
      auto fd = create_layer_file(p.path, d.size);
      if (!fd.ok()) return wire_error(WireCode::internal, "disk copy " + copies_[i].path + ": " + fd.error().message);
      Copy c;
      c.path = p.path;
      c.fd = std::move(*fd);
      c.created = true;
      c.keep_allocation = j > 0;
      copies_.push_back(std::move(c));
      if (options_.direct && d.size % 4096 == 0)
        copies_.back().direct.reset(::open(p.path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW | O_DIRECT));
      targets_.push_back({d.lower[j].size, d.lower[j].data_bytes, kLayerCopyBlock, {}});
      to_verify_.push_back({p.path, j > 0, d.lower[j].id});
    }
  }
  for (size_t i = 0; i < declared_.disks.size(); ++i) {
    if (declared_.disks[i].lower.empty()) continue;
    // Only a descriptor this receiver writes is removed on discard.
    std::string descriptor = copies_[i].path + kvm::kChainDeltaSuffix;
    if (::access(descriptor.c_str(), F_OK) != 0) sidecars_.push_back(descriptor);
    if (auto r = link_chain(copies_[i].path, plans[i], declared_.disks[i].size); !r.ok())
      return wire_error(WireCode::internal, "disk copy " + copies_[i].path + ": re-linking: " + r.error().message);
  }
  return ok();
}

Result<void> DiskPrecopyReceiver::check_room(const std::vector<std::vector<PlacedLayer>>& plans) const {
  // Per file system: what this migration writes there, before a single layer file exists.
  struct Need {
    std::string where;  // a copy on it, for the message
    uint64_t free = 0, bytes = 0;
    uint32_t layers = 0;
  };
  std::map<dev_t, Need> by_fs;
  auto add = [&](const std::string& where, const std::string& probe, uint64_t bytes, bool layer) {
    struct stat st {};
    struct statvfs vfs {};
    if (::stat(probe.c_str(), &st) != 0 || ::statvfs(probe.c_str(), &vfs) != 0) return;  // checked on write
    Need& n = by_fs[st.st_dev];
    if (n.where.empty()) n.where = where;
    n.free = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
    n.bytes += bytes;
    n.layers += layer ? 1 : 0;
  };
  for (size_t i = 0; i < declared_.disks.size(); ++i) {
    add(copies_[i].path, copies_[i].path, declared_.disks[i].data_bytes, false);
    for (size_t j = 0; j < plans[i].size(); ++j)
      if (plans[i][j].created) {
        std::string dir = std::filesystem::path(plans[i][j].path).parent_path().string();
        add(copies_[i].path, dir.empty() ? "." : dir, declared_.disks[i].lower[j].data_bytes, true);
      }
  }
  for (const auto& [dev, n] : by_fs)
    if (n.bytes > n.free)
      return wire_error(WireCode::config_mismatch,
                        "disk copy " + n.where + ": destination disk full: " + std::to_string(n.free) +
                            " bytes free, the copies there need " + std::to_string(n.bytes) + " bytes (disk data and " +
                            std::to_string(n.layers) + " lower layer(s) to copy)");
  return ok();
}

Result<void> DiskPrecopyReceiver::close_layers() {
  layers_closed_ = true;
  if (to_verify_.empty()) {
    verify_done_.store(true, std::memory_order_release);
    return ok();
  }
  // Every write of the layers has completed before they are read back. If that fails there is
  // no verdict to wait for: the failure is the verdict, so finish() can never pass unchecked.
  if (auto drained = drain(); !drained.ok()) {
    verify_error_ = drained.error();
    verify_done_.store(true, std::memory_order_release);
    return drained;
  }
  // Hashing a layer reads it whole: on the control thread it would hold up this round's
  // acknowledgement and so lower the source's measured bandwidth. The layers are not used
  // before finish(), which waits for this verdict.
  verifier_ = std::thread([this, checks = to_verify_] {
    for (const LayerCheck& c : checks)
      if (auto r = verify_layer(c.path, c.delta, c.id, &verify_cancel_); !r.ok()) {
        verify_error_ = std::move(r.error());
        break;
      }
    verify_done_.store(true, std::memory_order_release);
  });
  return ok();
}

Result<void> DiskPrecopyReceiver::verify_result() {
  if (verifier_.joinable()) verifier_.join();
  if (verify_error_) return *verify_error_;
  return ok();
}

void DiskPrecopyReceiver::stop_verifier() {
  verify_cancel_.store(true);
  if (verifier_.joinable()) verifier_.join();
}

}  // namespace kvmig::helper
