// Content IDs of disk layers (issue 4 item 4, after US10802862): the XXH3-128 of a layer's
// bytes as they read (holes as zeros), so two files hold the same layer exactly when their IDs
// match, wherever and whenever they were written. A layer whose holes mean "read the parent"
// (a kvmig delta, docs/disk-chains.md) also hashes its allocation map: a zero block it holds
// and a hole it does not are different contents.
//
// Hashing a big base costs a full read, so the ID is cached in a sidecar "<layer>.kvmig-id",
// keyed by (device, inode, size, mtime ns, ctime ns). Any write changes mtime and ctime, and
// nothing can set ctime back, so a cache whose key does not match is never used. A write in
// the same timestamp tick as the hashing would leave the key unchanged ("racily clean", as git
// calls it): a cache entry is therefore trusted only when the file's times lie well before the
// moment its hashing began; otherwise the layer is hashed again.
#pragma once

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>

#include "base/result.h"

namespace kvmig::helper {

inline constexpr const char* kLayerIdSuffix = ".kvmig-id";
// How long before the hashing the file's last change must lie for the cache to count
// (> the coarsest timestamp granularity of common file systems plus a clock tick).
inline constexpr int64_t kRacyMarginNs = 3'000'000'000;

struct LayerId {
  uint64_t hi = 0, lo = 0;
  bool operator==(const LayerId&) const = default;
  bool zero() const { return hi == 0 && lo == 0; }
  std::string hex() const;  // 32 lower-case hex digits
  static std::optional<LayerId> parse(const std::string& hex);
};

struct LayerIdInfo {
  LayerId id;
  bool from_cache = false;        // the sidecar was trusted, the layer not read
  std::optional<LayerId> origin;  // the source layer this copy was re-linked from (see below)
};

// The content ID of the open layer `fd`, whose sidecar is `name` + kLayerIdSuffix in `dir_fd`.
// `allocation` adds the allocation map (kvmig deltas). Reads the layer unless the sidecar is
// trusted; writes a fresh sidecar after hashing (best effort: a read-only directory only
// costs the next caller a re-hash). Fails if the layer changes while it is hashed. `cancel`
// (optional) set by another thread ends a hashing in progress with an error ("cancelled"),
// without a sidecar: a destination discarding a migration must not wait for a full read.
Result<LayerIdInfo> layer_content_id(int fd, int dir_fd, const std::string& name, bool allocation,
                                     const std::atomic<bool>* cancel = nullptr);

// The same for a path (the source side): opens the file and its directory.
Result<LayerIdInfo> layer_content_id(const std::string& path, bool allocation,
                                     const std::atomic<bool>* cancel = nullptr);

// Records, after a destination re-linked a copied layer (which rewrites a qcow2 header and so
// changes its bytes), that this file with its own verified ID `own` stands for the source
// layer `origin`. layer_content_id reports it while the file keeps that ID.
Result<void> record_layer_origin(int fd, int dir_fd, const std::string& name, bool allocation,
                                 const LayerId& own, const LayerId& origin);

}  // namespace kvmig::helper
