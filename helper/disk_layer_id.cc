#include "helper/disk_layer_id.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <ctime>
#include <memory>
#include <nlohmann/json.hpp>

#include "base/fd.h"
#include "helper/disk_extents.h"

namespace kvmig::helper {
namespace {

constexpr size_t kReadChunk = 4 << 20;
constexpr int kSidecarVersion = 1;

struct Key {
  uint64_t dev = 0, ino = 0, size = 0;
  int64_t mtime_ns = 0, ctime_ns = 0;
  bool operator==(const Key&) const = default;
};

int64_t ns(const timespec& t) { return static_cast<int64_t>(t.tv_sec) * 1'000'000'000 + t.tv_nsec; }

Result<Key> key_of(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return Error::from_errno("fstat");
  return Key{st.st_dev, st.st_ino, static_cast<uint64_t>(st.st_size), ns(st.st_mtim), ns(st.st_ctim)};
}

int64_t now_ns() {
  timespec t{};
  ::clock_gettime(CLOCK_REALTIME, &t);
  return ns(t);
}

struct Sidecar {
  Key key;
  int64_t hashed_at_ns = 0;
  bool allocation = false;
  LayerId id;
  std::optional<LayerId> origin;
};

std::optional<Sidecar> read_sidecar(int dir_fd, const std::string& name) {
  Fd fd(::openat(dir_fd, (name + kLayerIdSuffix).c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!fd) return std::nullopt;
  char buf[2048];
  ssize_t n = ::read(fd.get(), buf, sizeof buf);
  if (n <= 0 || n == static_cast<ssize_t>(sizeof buf)) return std::nullopt;
  auto j = nlohmann::json::parse(std::string(buf, static_cast<size_t>(n)), nullptr, false);
  if (j.is_discarded() || !j.is_object() || j.value("version", 0) != kSidecarVersion) return std::nullopt;
  try {
    Sidecar s;
    s.key = {j.at("dev").get<uint64_t>(), j.at("ino").get<uint64_t>(), j.at("size").get<uint64_t>(),
             j.at("mtime_ns").get<int64_t>(), j.at("ctime_ns").get<int64_t>()};
    s.hashed_at_ns = j.at("hashed_at_ns").get<int64_t>();
    s.allocation = j.at("allocation").get<bool>();
    auto id = LayerId::parse(j.at("id").get<std::string>());
    if (!id) return std::nullopt;
    s.id = *id;
    if (j.contains("origin")) s.origin = LayerId::parse(j["origin"].get<std::string>());
    return s;
  } catch (const nlohmann::json::exception&) {
    return std::nullopt;  // damaged: as if absent, the layer is hashed again
  }
}

// Written to a temporary name and renamed, so a reader sees the old sidecar or the new one.
// Not fsync'd: a sidecar lost in a crash only costs a re-hash.
void write_sidecar(int dir_fd, const std::string& name, const Sidecar& s) {
  nlohmann::json j{{"version", kSidecarVersion}, {"dev", s.key.dev}, {"ino", s.key.ino},
                   {"size", s.key.size}, {"mtime_ns", s.key.mtime_ns}, {"ctime_ns", s.key.ctime_ns},
                   {"hashed_at_ns", s.hashed_at_ns}, {"allocation", s.allocation}, {"id", s.id.hex()}};
  if (s.origin) j["origin"] = s.origin->hex();
  std::string text = j.dump() + "\n";
  std::string final_name = name + kLayerIdSuffix, tmp = final_name + ".tmp";
  Fd fd(::openat(dir_fd, tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644));
  if (!fd) return;
  bool written = ::write(fd.get(), text.data(), text.size()) == static_cast<ssize_t>(text.size());
  fd.reset();
  if (!written || ::renameat(dir_fd, tmp.c_str(), dir_fd, final_name.c_str()) != 0)
    ::unlinkat(dir_fd, tmp.c_str(), 0);
}

bool trusted(const Sidecar& s, const Key& key, bool allocation) {
  return s.key == key && s.allocation == allocation &&
         std::max(key.mtime_ns, key.ctime_ns) + kRacyMarginNs <= s.hashed_at_ns;
}

void hash_zeros128(XXH3_state_t* state, uint64_t length) {
  static const std::vector<uint8_t> zeros(1 << 20);
  for (; length > 0;) {
    size_t n = std::min<uint64_t>(length, zeros.size());
    XXH3_128bits_update(state, zeros.data(), n);
    length -= n;
  }
}

// The bytes of [0, size) as they read, then (for a delta) the data extents as (offset,
// length) pairs, so allocation is part of the identity.
Result<LayerId> hash_layer(int fd, uint64_t size, bool allocation, const std::atomic<bool>* cancel) {
  auto cancelled = [cancel] { return cancel && cancel->load(std::memory_order_relaxed); };
  KVMIG_ASSIGN(auto extents, scan_extents(fd, size, 1));
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  std::unique_ptr<uint8_t[]> buf(new uint8_t[kReadChunk]);
  XXH3_state_t state;
  XXH3_128bits_reset(&state);
  for (const Extent& e : extents) {
    if (cancelled()) return Error{"cancelled"};
    if (!e.data) {
      hash_zeros128(&state, e.length);
      continue;
    }
    for (uint64_t pos = e.offset; pos < e.offset + e.length;) {
      if (cancelled()) return Error{"cancelled"};
      size_t want = std::min<uint64_t>(kReadChunk, e.offset + e.length - pos);
      ssize_t n = ::pread(fd, buf.get(), want, static_cast<off_t>(pos));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Error::from_errno("read at " + std::to_string(pos));
      if (n == 0) return Error{"ends at " + std::to_string(pos) + " while being hashed"};
      XXH3_128bits_update(&state, buf.get(), static_cast<size_t>(n));
      pos += static_cast<uint64_t>(n);
    }
  }
  if (allocation) {
    const char tag[] = "kvmig-allocation";
    XXH3_128bits_update(&state, tag, sizeof tag);
    for (const Extent& e : extents) {
      if (!e.data) continue;
      uint64_t pair[2] = {e.offset, e.length};
      XXH3_128bits_update(&state, pair, sizeof pair);
    }
  }
  XXH128_hash_t h = XXH3_128bits_digest(&state);
  return LayerId{h.high64, h.low64};
}

}  // namespace

std::string LayerId::hex() const {
  char buf[33];
  std::snprintf(buf, sizeof buf, "%016" PRIx64 "%016" PRIx64, hi, lo);
  return buf;
}

std::optional<LayerId> LayerId::parse(const std::string& hex) {
  if (hex.size() != 32 || hex.find_first_not_of("0123456789abcdef") != std::string::npos)
    return std::nullopt;
  return LayerId{std::stoull(hex.substr(0, 16), nullptr, 16), std::stoull(hex.substr(16), nullptr, 16)};
}

Result<LayerIdInfo> layer_content_id(int fd, int dir_fd, const std::string& name, bool allocation,
                                     const std::atomic<bool>* cancel) {
  KVMIG_ASSIGN(Key before, key_of(fd));
  std::optional<Sidecar> cached = read_sidecar(dir_fd, name);
  if (cached && trusted(*cached, before, allocation)) return LayerIdInfo{cached->id, true, cached->origin};
  int64_t started = now_ns();
  auto id = hash_layer(fd, before.size, allocation, cancel);
  if (!id.ok()) return std::move(id.error().prefix("content ID of " + name));
  KVMIG_ASSIGN(Key after, key_of(fd));
  if (!(after == before)) return Error{"content ID of " + name + ": the layer changed while it was hashed"};
  Sidecar fresh{before, started, allocation, *id, std::nullopt};
  // A re-link record stays valid while the file keeps the content it was made for.
  if (cached && cached->id == *id && cached->allocation == allocation) fresh.origin = cached->origin;
  write_sidecar(dir_fd, name, fresh);
  return LayerIdInfo{*id, false, fresh.origin};
}

Result<LayerIdInfo> layer_content_id(const std::string& path, bool allocation, const std::atomic<bool>* cancel) {
  size_t slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  Fd dir_fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir_fd) return Error::from_errno("layer directory " + dir);
  Fd fd(::openat(dir_fd.get(), name.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return Error::from_errno("layer " + path);
  return layer_content_id(fd.get(), dir_fd.get(), name, allocation, cancel);
}

Result<void> record_layer_origin(int fd, int dir_fd, const std::string& name, bool allocation,
                                 const LayerId& own, const LayerId& origin) {
  KVMIG_ASSIGN(Key key, key_of(fd));
  std::optional<Sidecar> s = read_sidecar(dir_fd, name);
  // Only on top of a sidecar that describes this very file version with the ID just verified.
  if (!s || !(s->key == key) || s->allocation != allocation || !(s->id == own))
    return Error{name + ": changed before its re-link could be recorded"};
  s->origin = origin;
  write_sidecar(dir_fd, name, *s);
  return ok();
}

}  // namespace kvmig::helper
