#include "helper/disk_chain_migration.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "helper/disk_extents.h"
#include "helper/disk_precopy_sender.h"
#include "helper/disk_layer_id.h"
#include "helper/wire.h"
#include "kvm/block_chain.h"

namespace kvmig::helper {
namespace fs = std::filesystem;

Result<SourceChain> source_chain(const std::string& top) {
  SourceChain c;
  KVMIG_ASSIGN(std::vector<std::string> paths, kvm::resolve_block_chain(top));
  paths.pop_back();  // the top itself moves live
  for (size_t i = 0; i < paths.size(); ++i) {
    const std::string& p = paths[i];
    Fd fd(::open(p.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) return Error::from_errno("disk " + top + ": layer " + p);
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode))
      return Error{"disk " + top + ": layer " + p + " is not a regular file (a migrated chain's layers are files)"};
    MigrationLayer l;
    l.size = static_cast<uint64_t>(st.st_size);
    KVMIG_ASSIGN(std::vector<Extent> extents, scan_extents(fd.get(), l.size));
    l.data_bytes = data_bytes(extents);
    KVMIG_ASSIGN(LayerIdInfo id, layer_content_id(p, /*allocation=*/i > 0));
    l.id = id.id;
    l.name = fs::path(p).filename().string();
    c.lower_paths.push_back(p);
    c.lower.push_back(std::move(l));
  }
  return c;
}

Result<LayerCopyStats> send_missing_layers(Stream& control, uint16_t version, const std::vector<SourceChain>& chains,
                                           const DisksReady& ready) {
  LayerCopyStats st;
  size_t answer = 0;
  uint32_t k = 0;
  for (const SourceChain& c : chains) {
    for (size_t j = 0; j < c.lower.size(); ++j) {
      if (answer >= ready.layers.size()) return Error{"DISKS_READY answered fewer layers than declared"};
      if (ready.layers[answer++] == LayerAnswer::held) {
        ++st.held;
        continue;
      }
      const std::string& path = c.lower_paths[j];
      Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
      if (!fd) return Error::from_errno("layer " + path);
      Fd direct(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT));
      // A lower layer is never written: its log only gives the plan its geometry, and the
      // plan's bulk copy (every block of its data extents) is the whole transfer.
      kvm::BlockWriteLog log(c.lower[j].size, kLayerCopyBlock);
      DiskSenderOptions opt;
      opt.index_base = static_cast<uint32_t>(chains.size()) + k++;
      std::vector<DiskSource> one;
      one.push_back({fd.get(), direct.get(), &log, {}});
      KVMIG_ASSIGN(std::unique_ptr<DiskPrecopySender> sender, DiskPrecopySender::create(std::move(one), opt));
      sender->observe();
      while (sender->pending_bytes() > 0) {
        KVMIG_ASSIGN(DiskRoundStats rs, sender->send_round(control, version, 0));
        st.wire_bytes += rs.wire_bytes;
        st.blocks += rs.blocks;
        if (rs.blocks == 0) break;
      }
      sender->stop_tracking();
      ++st.copied;
    }
  }
  return st;
}

Result<std::unique_ptr<ChainHoleFiller>> ChainHoleFiller::open(int top_fd, const std::vector<std::string>& lower_paths,
                                                               uint64_t size) {
  std::unique_ptr<ChainHoleFiller> f(new ChainHoleFiller(top_fd, size, lower_paths.size()));
  for (size_t i = 0; i < lower_paths.size(); ++i) {
    Fd fd(::open(lower_paths[i].c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) return Error::from_errno("layer " + lower_paths[i]);
    if (i > 0) {  // a delta holds its data extents; the base holds everything
      KVMIG_ASSIGN(std::vector<Extent> extents, scan_extents(fd.get(), size, 512));
      for (const Extent& e : extents)
        if (e.data) f->map_.add(i, e.offset, e.length);
    }
    f->lower_.push_back(std::move(fd));
  }
  return f;
}

Result<void> ChainHoleFiller::fill(uint64_t offset, uint8_t* buf, uint64_t length) const {
  uint64_t end = offset + length;
  for (uint64_t at = offset; at < end;) {
    off_t hole = ::lseek(top_fd_, static_cast<off_t>(at), SEEK_HOLE);
    if (hole < 0) return Error::from_errno("disk top: SEEK_HOLE");
    if (static_cast<uint64_t>(hole) >= end) break;
    off_t data = ::lseek(top_fd_, hole, SEEK_DATA);
    uint64_t hole_end = data < 0 ? end : std::min<uint64_t>(end, static_cast<uint64_t>(data));
    if (data < 0 && errno != ENXIO) return Error::from_errno("disk top: SEEK_DATA");
    for (const kvm::ChainMap::Piece& p : map_.resolve(hole, hole_end - hole)) {
      uint8_t* dst = buf + (p.offset - offset);
      for (uint64_t got = 0; got < p.length;) {
        ssize_t n = ::pread(lower_[p.layer].get(), dst + got, p.length - got, static_cast<off_t>(p.offset + got));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return Error::from_errno("disk layer read at " + std::to_string(p.offset + got), n < 0 ? errno : EIO);
        got += static_cast<uint64_t>(n);
      }
    }
    at = hole_end;
  }
  return ok();
}

namespace {

Error config(const std::string& text) { return wire_error(WireCode::config_mismatch, text); }

// Whether the regular file at `path` has content ID `want` by this host's reading; nullopt
// when there is no such file.
Result<std::optional<bool>> holds(const std::string& path, bool delta, const LayerId& want, uint64_t size) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return std::optional<bool>();
    return Error::from_errno("layer " + path);
  }
  if (!S_ISREG(st.st_mode) || static_cast<uint64_t>(st.st_size) != size) return std::optional<bool>(false);
  KVMIG_ASSIGN(LayerIdInfo id, layer_content_id(path, delta));
  return std::optional<bool>(id.id == want || (id.origin && *id.origin == want));
}

Result<void> write_descriptor(const std::string& delta, const std::string& parent, uint64_t size) {
  std::string path = delta + kvm::kChainDeltaSuffix;
  nlohmann::json j{{"kvmig_delta", 1}, {"parent", parent}, {"size", size}};
  std::string text = j.dump() + "\n";
  {
    Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd) {
      std::string old(text.size() + 1, '\0');
      ssize_t n = ::read(fd.get(), old.data(), old.size());
      auto o = nlohmann::json::parse(old.substr(0, n > 0 ? static_cast<size_t>(n) : 0), nullptr, false);
      if (!o.is_discarded() && o == j) return ok();  // already linked so
    }
  }
  std::string tmp = path + ".tmp";
  Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd) return Error::from_errno("descriptor " + tmp);
  if (::write(fd.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size()) || ::fsync(fd.get()) != 0)
    return Error::from_errno("descriptor " + tmp);
  if (::rename(tmp.c_str(), path.c_str()) != 0) return Error::from_errno("descriptor " + path);
  return ok();
}

// Whether the existing delta at `path` already sits on exactly `below` (base first), by its own
// descriptors: same files (device and inode), same order, nothing more.
bool already_linked(const std::string& path, const std::vector<PlacedLayer>& below) {
  auto chain = kvm::resolve_block_chain(path);  // base first, `path` last
  if (!chain.ok() || chain->size() != below.size() + 1) return false;
  for (size_t k = 0; k < below.size(); ++k) {
    if (below[k].answer != LayerAnswer::held || below[k].fresh) return false;  // a fresh copy: not what it was made on
    std::error_code ec;
    if (!fs::equivalent((*chain)[k], below[k].path, ec) || ec) return false;
  }
  return true;
}

}  // namespace

Result<Fd> create_layer_file(const std::string& path, uint64_t size) {
  Fd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644));
  if (!fd) return Error::from_errno("layer " + path + ": create");
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) {
    int err = errno;
    ::unlink(path.c_str());
    return Error::from_errno("layer " + path + ": set size", err);
  }
  return fd;
}

Result<std::vector<PlacedLayer>> plan_chain(const std::string& top_path, const MigrationDisk& disk,
                                            ChainPlacements& earlier) {
  std::vector<PlacedLayer> out;
  std::vector<std::string> below;  // the paths placed so far, base first
  fs::path dir = fs::path(top_path).parent_path();
  std::string top_name = fs::path(top_path).filename().string();
  for (size_t i = 0; i < disk.lower.size(); ++i) {
    const MigrationLayer& l = disk.lower[i];
    bool delta = i > 0;
    if (l.name == top_name)
      return config("disk copy " + top_path + ": the source's layer " + l.name + " has the copy's own name");
    PlacedLayer placed;
    std::string candidates[2] = {(dir / l.name).string(), (dir / (l.name + "." + l.id.hex().substr(0, 16))).string()};
    bool found = false;
    for (const std::string& c : candidates) {
      if (auto e = earlier.by_path.find(c); e != earlier.by_path.end()) {
        // This migration already placed a layer at `c` for an earlier disk: the same layer on
        // the same layers below is shared (one file, one copy); anything else keeps its path.
        if (e->second.id == l.id && e->second.below == below) {
          placed = {c, LayerAnswer::held, false, true, e->second.fresh};
          found = true;
          break;
        }
        continue;
      }
      auto h = holds(c, delta, l.id, l.size);
      if (!h.ok()) return config("disk copy " + top_path + ": " + h.error().message);
      if (!*h) {  // no file by that name: the copy goes there
        placed = {c, LayerAnswer::copy, true, false, true};
        found = true;
        break;
      }
      // A delta's content ID says nothing of its parent: a file of the same name and ID (an
      // empty delta, say) may belong to another chain here. Held only when its own chain is
      // exactly the layers placed below it, so its descriptor is never rewritten.
      if (**h && (!delta || already_linked(c, out))) {  // this host's own reading matches: held
        placed = {c, LayerAnswer::held, false, false, false};
        found = true;
        break;
      }
    }
    if (!found)
      return config("disk copy " + top_path + ": layer " + l.name + ": " + candidates[0] + " and " + candidates[1] +
                    " are both taken (files here with another content ID, or other layers of this migration)");
    earlier.by_path.emplace(placed.path, ChainPlacements::Entry{l.id, below, placed.fresh});
    below.push_back(placed.path);
    out.push_back(std::move(placed));
  }
  return out;
}

Result<std::vector<PlacedLayer>> place_chain(const std::string& top_path, const MigrationDisk& disk) {
  ChainPlacements earlier;
  KVMIG_ASSIGN(std::vector<PlacedLayer> placed, plan_chain(top_path, disk, earlier));
  for (size_t i = 0; i < placed.size(); ++i) {
    if (!placed[i].created) continue;
    if (auto fd = create_layer_file(placed[i].path, disk.size); !fd.ok()) {
      for (size_t k = 0; k < i; ++k)
        if (placed[k].created) ::unlink(placed[k].path.c_str());
      return config("disk copy " + top_path + ": " + fd.error().message);
    }
  }
  return placed;
}

Result<void> link_chain(const std::string& top_path, const std::vector<PlacedLayer>& layers, uint64_t size) {
  auto rel = [](const std::string& parent, const std::string& child) {
    return fs::path(parent).lexically_relative(fs::path(child).parent_path()).string();
  };
  // Held layers already sit on the right parents (place_chain checked): only fresh copies and
  // the top get descriptors, so no file another chain may share is touched.
  for (size_t i = 1; i < layers.size(); ++i)
    if (layers[i].created)
      KVMIG_TRY(write_descriptor(layers[i].path, rel(layers[i - 1].path, layers[i].path), size));
  if (!layers.empty()) KVMIG_TRY(write_descriptor(top_path, rel(layers.back().path, top_path), size));
  return ok();
}

Result<void> verify_layer(const std::string& path, bool delta, const LayerId& want, const std::atomic<bool>* cancel) {
  KVMIG_ASSIGN(LayerIdInfo id, layer_content_id(path, delta, cancel));
  if (!(id.id == want))
    return wire_error(WireCode::internal, "layer " + path + ": copied, but its content ID is " + id.id.hex() +
                                              ", the source declared " + want.hex() + " (not used)");
  return ok();
}

}  // namespace kvmig::helper
