#include "kvm/block_chain.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "base/fd.h"

namespace kvmig::kvm {
namespace fs = std::filesystem;

namespace {

// The descriptor's parent path, or "" when `layer` has none. The same format as
// host/disk_chain.cc writes (docs/disk-chains.md); kvm/ cannot call host/ (layering), so the
// reading is repeated here, with the same checks.
Result<std::string> descriptor_parent(const std::string& layer, uint64_t layer_size) {
  std::string path = layer + kChainDeltaSuffix;
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT) return std::string();
    return Error::from_errno("disk " + layer + ": descriptor " + path);
  }
  std::string text(64 * 1024, '\0');
  ssize_t n = ::read(fd.get(), text.data(), text.size());
  if (n < 0) return Error::from_errno("disk " + layer + ": descriptor " + path);
  text.resize(static_cast<size_t>(n));
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("kvmig_delta") ||
      !j["kvmig_delta"].is_number_integer() || j["kvmig_delta"].get<int64_t>() != 1 || !j.contains("parent") ||
      !j["parent"].is_string() || j["parent"].get<std::string>().empty() || !j.contains("size") ||
      !j["size"].is_number_unsigned())
    return Error{"disk " + layer + ": descriptor " + path + " is not a kvmig delta descriptor (version 1, parent, size)"};
  uint64_t declared = j["size"].get<uint64_t>();
  if (declared != layer_size)
    return Error{"disk " + layer + ": " + std::to_string(layer_size) + " bytes, its descriptor declares " +
                 std::to_string(declared) + (layer_size < declared ? " (shorter than declared)" : " (longer than declared)")};
  return j["parent"].get<std::string>();
}

}  // namespace

Result<std::vector<std::string>> resolve_block_chain(const std::string& top) {
  std::vector<std::string> top_first;
  std::set<std::pair<dev_t, ino_t>> seen;
  std::string path = top;
  while (true) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
      if (top_first.empty()) return Error::from_errno("disk " + path);
      return Error::from_errno("disk " + top + ": missing parent: " + top_first.back() + " names " + path);
    }
    if (!seen.insert({st.st_dev, st.st_ino}).second)
      return Error{"disk " + top + ": chain loops: " + top_first.back() + " names " + path + ", already in the chain"};
    top_first.push_back(path);
    if (top_first.size() > kMaxChainLayers)
      return Error{"disk " + top + ": more than " + std::to_string(kMaxChainLayers) + " layers"};
    // A block device has no descriptor: it can only be a base.
    if (!S_ISREG(st.st_mode)) break;
    KVMIG_ASSIGN(std::string parent, descriptor_parent(path, static_cast<uint64_t>(st.st_size)));
    if (parent.empty()) break;
    fs::path p(parent);
    path = p.is_absolute() ? parent : (fs::path(path).parent_path() / p).lexically_normal().string();
  }
  std::reverse(top_first.begin(), top_first.end());
  return top_first;
}

void ExtentSet::add(uint64_t offset, uint64_t length) {
  if (length == 0) return;
  uint64_t start = offset, end = offset + length;
  auto it = extents_.upper_bound(start);
  if (it != extents_.begin()) {
    auto prev = std::prev(it);
    if (prev->second >= start) {  // overlaps or touches the one before: merge into it
      start = prev->first;
      end = std::max(end, prev->second);
      it = extents_.erase(prev);
    }
  }
  while (it != extents_.end() && it->first <= end) {
    end = std::max(end, it->second);
    it = extents_.erase(it);
  }
  extents_.emplace(start, end);
}

std::pair<uint64_t, uint64_t> ExtentSet::extent_at(uint64_t at) const {
  auto it = extents_.upper_bound(at);
  if (it == extents_.begin()) return {at, at};
  --it;
  if (it->second > at) return {it->first, it->second};
  return {at, at};
}

bool ExtentSet::covers(uint64_t offset, uint64_t length) const {
  if (length == 0) return true;
  auto [s, e] = extent_at(offset);
  return e > s && e >= offset + length;  // extents are coalesced: one must hold it all
}

uint64_t ExtentSet::next_start(uint64_t at) const {
  auto it = extents_.upper_bound(at);
  return it == extents_.end() ? UINT64_MAX : it->first;
}

uint64_t ExtentSet::bytes() const {
  uint64_t n = 0;
  for (const auto& [s, e] : extents_) n += e - s;
  return n;
}

ChainMap::ChainMap(uint64_t disk_bytes, uint64_t granule, size_t layers)
    : disk_bytes_(disk_bytes), granule_(granule), held_(layers > 0 ? layers - 1 : 0) {}

void ChainMap::add(size_t layer, uint64_t offset, uint64_t length) {
  if (layer == 0 || layer > held_.size() || offset >= disk_bytes_) return;
  held_[layer - 1].add(offset, std::min(length, disk_bytes_ - offset));
}

bool ChainMap::holds(size_t layer, uint64_t offset, uint64_t length) const {
  if (layer == 0) return true;
  return layer <= held_.size() && held_[layer - 1].covers(offset, length);
}

std::vector<ChainMap::Piece> ChainMap::resolve(uint64_t offset, uint64_t length, size_t from) const {
  std::vector<Piece> out;
  from = std::min(from, held_.size());
  uint64_t end = offset + length;
  for (uint64_t p = offset; p < end;) {
    size_t layer = 0;
    uint64_t stop = end;
    for (size_t l = from; l >= 1; --l) {
      auto [s, e] = held_[l - 1].extent_at(p);
      if (e > s) {
        layer = l;
        stop = std::min(stop, e);
        break;
      }
    }
    // A layer above the one found may begin to hold bytes before `stop`: the piece ends there.
    for (size_t l = layer + 1; l <= from; ++l) stop = std::min(stop, held_[l - 1].next_start(p));
    if (!out.empty() && out.back().layer == layer && out.back().offset + out.back().length == p)
      out.back().length += stop - p;
    else
      out.push_back({p, stop - p, layer});
    p = stop;
  }
  return out;
}

std::pair<uint64_t, uint64_t> ChainMap::granules(uint64_t offset, uint64_t length) const {
  uint64_t first = offset / granule_ * granule_;
  uint64_t last = std::min(disk_bytes_, (offset + length + granule_ - 1) / granule_ * granule_);
  return {first, last};
}

std::pair<uint64_t, uint64_t> ChainMap::write_span(uint64_t offset, uint64_t length) const {
  auto [first, last] = granules(offset, length);
  uint64_t begin = offset, end = offset + length;
  if (begin != first && !holds(top(), first, std::min(granule_, disk_bytes_ - first))) begin = first;
  uint64_t tail = (end - 1) / granule_ * granule_;
  if (end != last && !holds(top(), tail, last - tail)) end = last;
  return {begin, end};
}

}  // namespace kvmig::kvm
