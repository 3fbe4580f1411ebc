#include "helper/disk_chain_sink.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

#include "base/fd.h"
#include "helper/disk_layer_id.h"

namespace kvmig::helper {
namespace {

// One layer's file at the destination, resolved beneath the root.
struct LayerFile {
  Fd dir, file;
  std::string name;
};

// An absent file (or directory) is not an error: the layer is missing and will be copied.
Result<LayerFile> open_layer(int root_fd, const std::string& path) {
  LayerFile f;
  size_t slash = path.rfind('/');
  std::string parent = slash == std::string::npos ? "." : path.substr(0, slash);
  f.name = slash == std::string::npos ? path : path.substr(slash + 1);
  f.dir.reset(open_beneath(root_fd, parent, O_RDONLY | O_DIRECTORY));
  if (!f.dir) {
    if (errno == ENOENT) return f;
    return wire_error(errno == EXDEV ? WireCode::malformed : WireCode::internal,
                      "layer directory '" + parent + "': " +
                          (errno == EXDEV ? std::string("escapes the served root") : std::strerror(errno)));
  }
  f.file.reset(::openat(f.dir.get(), f.name.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!f.file) {
    if (errno == ENOENT) return f;
    return wire_error(WireCode::internal, "layer " + path + ": " + std::strerror(errno));
  }
  struct stat st {};
  if (::fstat(f.file.get(), &st) != 0 || !S_ISREG(st.st_mode))
    return wire_error(WireCode::malformed, "layer " + path + ": not a regular file");
  return f;
}

struct Checked {
  LayerStatus status = LayerStatus::missing;
  LayerId own;  // held / differs: this server's ID of its file
};

Result<Checked> check_layer(int root_fd, const DiskChainLayer& layer) {
  KVMIG_ASSIGN(LayerFile f, open_layer(root_fd, layer.path));
  if (!f.file) return Checked{};
  struct stat st {};
  if (::fstatat(f.dir.get(), (f.name + kPartialSuffix).c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0)
    return Checked{LayerStatus::partial, {}};
  auto info = layer_content_id(f.file.get(), f.dir.get(), f.name, layer.format == LayerFormat::kvmig_delta);
  if (!info.ok()) return wire_error(WireCode::internal, info.error().message);
  LayerId source{layer.id_hi, layer.id_lo};
  // Either the very bytes the source has, or this server's own earlier re-link of them.
  bool held = info->id == source || (info->origin && *info->origin == source);
  return Checked{held ? LayerStatus::held : LayerStatus::differs, info->id};
}

Result<void> link(int root_fd, const DiskChain& chain, const DiskSinkOptions& options) {
  for (const DiskChainLayer& layer : chain.layers) {
    KVMIG_ASSIGN(Checked c, check_layer(root_fd, layer));
    if (c.status != LayerStatus::held)
      return wire_error(WireCode::bad_checksum,
                        "layer " + layer.path + " is " + layer_status_name(c.status) +
                            (c.status == LayerStatus::differs
                                 ? " (content ID " + c.own.hex() + ", the source's " +
                                       LayerId{layer.id_hi, layer.id_lo}.hex() + ")"
                                 : std::string()) +
                            " at the destination: not re-linked");
  }
  if (chain.layers.size() > 1 && !options.relink)
    return wire_error(WireCode::internal, "this server cannot re-link chains");
  for (size_t i = 1; i < chain.layers.size(); ++i) {
    const DiskChainLayer& layer = chain.layers[i];
    KVMIG_TRY(options.relink(layer, chain.layers[i - 1]));
    // A qcow2 header now names the destination's parent, so the file's bytes (and ID) may
    // differ from the source's: record which source layer it stands for.
    KVMIG_ASSIGN(LayerFile f, open_layer(root_fd, layer.path));
    if (!f.file) return wire_error(WireCode::internal, "layer " + layer.path + " vanished while re-linked");
    bool allocation = layer.format == LayerFormat::kvmig_delta;
    auto info = layer_content_id(f.file.get(), f.dir.get(), f.name, allocation);
    if (!info.ok()) return wire_error(WireCode::internal, info.error().message);
    LayerId source{layer.id_hi, layer.id_lo};
    if (!(info->id == source))
      KVMIG_TRY(record_layer_origin(f.file.get(), f.dir.get(), f.name, allocation, info->id, source));
  }
  return ok();
}

}  // namespace

Result<DiskSinkReport> serve_disk_chain(int root_fd, Stream& control, const DiskMessage& first,
                                        const DiskSinkOptions& options) {
  auto start = std::chrono::steady_clock::now();
  DiskSinkReport report;
  report.request = first.type();
  auto fail = [&](Error e) -> Result<DiskSinkReport> {
    (void)send_disk_error(control, e);
    return e;
  };
  auto chain = decode_disk_chain(first.payload, disk_msg_name(first.type()));
  if (!chain.ok()) return fail(chain.error());
  report.path = chain->layers.back().path;
  if (first.type() == DiskMsg::chain) {
    std::vector<LayerStatus> statuses;
    for (const DiskChainLayer& layer : chain->layers) {
      auto c = check_layer(root_fd, layer);
      if (!c.ok()) return fail(c.error());
      statuses.push_back(c->status);
    }
    KVMIG_TRY(send_disk(control, DiskMsg::chain_status, encode(statuses)));
  } else {
    if (auto r = link(root_fd, *chain, options); !r.ok()) return fail(r.error());
    report.verified = true;
    KVMIG_TRY(send_disk(control, DiskMsg::linked, encode_u64(chain->layers.size())));
  }
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace kvmig::helper
