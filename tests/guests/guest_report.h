// Parser for the test guest's report lines (port 0xe9), for tests that boot the guest under
// QEMU or kvmig and for migration tests that follow it across hosts. The line formats are the
// contract in docs/guest.md; a line that does not match exactly is kept in Report::other.
#pragma once

#include <charconv>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace kvmig::guest {

struct StartLine {
  uint32_t vcpus = 0;
  uint64_t ws_pages = 0;
  std::string pattern;
  std::optional<uint64_t> rate_mibps;  // nullopt = rate=max
};

struct PassLine {
  uint32_t vcpu = 0;
  uint64_t n = 0;       // passes completed by this vCPU
  uint64_t writes = 0;  // page writes by this vCPU so far
  uint64_t errors = 0;  // errors seen by this vCPU so far
  uint64_t tsc = 0;
};

struct CorruptLine {
  uint32_t vcpu = 0;
  uint64_t page = 0, want = 0, got = 0;
};

// The disk workload (disk=1), docs/guest.md.
struct DiskStartLine {
  uint64_t blocks = 0, block_bytes = 0;
  std::string pattern;
  std::optional<uint64_t> rate_mibps;  // nullopt = drate=max
};

struct DiskPassLine {
  uint64_t n = 0, writes = 0, reads = 0, errors = 0;  // cumulative
};

struct DiskCorruptLine {
  uint64_t block = 0, want = 0, got = 0;
  std::string why;  // version, tag, checksum, status
};

struct DiskBadRequestsLine {
  uint64_t rejected = 0, of = 0;
};

struct DoneLine {
  bool pass = false;
  uint64_t passes = 0, errors = 0;
};

namespace detail {

// Splits "k1=v1 k2=v2" and requires exactly the keys given, in that order.
inline bool fields(std::string_view s, std::initializer_list<std::string_view> keys,
                   std::vector<std::string_view>& out) {
  out.clear();
  for (std::string_view key : keys) {
    if (s.size() < key.size() + 1 || s.substr(0, key.size()) != key || s[key.size()] != '=')
      return false;
    s.remove_prefix(key.size() + 1);
    size_t end = s.find(' ');
    out.push_back(s.substr(0, end));
    s = end == std::string_view::npos ? std::string_view{} : s.substr(end + 1);
  }
  return s.empty();
}

template <class T>
bool number(std::string_view s, T& out) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return !s.empty() && ec == std::errc{} && p == s.data() + s.size();
}

// A whole report line: the prefix, then exactly the keys given.
inline bool line_fields(std::string_view line, std::string_view prefix,
                        std::initializer_list<std::string_view> keys, std::vector<std::string_view>& out) {
  return line.starts_with(prefix) && fields(line.substr(prefix.size()), keys, out);
}

// A rate field: "max" (no limit, nullopt) or MiB/s.
inline bool rate(std::string_view s, std::optional<uint64_t>& out) {
  if (s == "max") {
    out.reset();
    return true;
  }
  uint64_t v = 0;
  if (!number(s, v)) return false;
  out = v;
  return true;
}

}  // namespace detail

inline std::optional<StartLine> parse_start(std::string_view line) {
  std::vector<std::string_view> f;
  StartLine r;
  if (!detail::line_fields(line, "kvmig-guest: start ", {"vcpus", "ws_pages", "pattern", "rate"}, f) ||
      !detail::number(f[0], r.vcpus) || !detail::number(f[1], r.ws_pages) || f[2].empty() ||
      !detail::rate(f[3], r.rate_mibps))
    return std::nullopt;
  r.pattern = std::string(f[2]);
  return r;
}

inline std::optional<PassLine> parse_pass(std::string_view line) {
  std::vector<std::string_view> f;
  PassLine r;
  if (!detail::line_fields(line, "kvmig-guest: pass ", {"vcpu", "n", "writes", "errors", "tsc"}, f) ||
      !detail::number(f[0], r.vcpu) || !detail::number(f[1], r.n) || !detail::number(f[2], r.writes) ||
      !detail::number(f[3], r.errors) || !detail::number(f[4], r.tsc))
    return std::nullopt;
  return r;
}

inline std::optional<CorruptLine> parse_corrupt(std::string_view line) {
  std::vector<std::string_view> f;
  CorruptLine r;
  if (!detail::line_fields(line, "kvmig-guest: corrupt ", {"vcpu", "page", "want", "got"}, f) ||
      !detail::number(f[0], r.vcpu) || !detail::number(f[1], r.page) || !detail::number(f[2], r.want) ||
      !detail::number(f[3], r.got))
    return std::nullopt;
  return r;
}

inline std::optional<DoneLine> parse_done(std::string_view line) {
  std::vector<std::string_view> f;
  DoneLine r;
  if (!detail::line_fields(line, "kvmig-guest: done ", {"result", "passes", "errors"}, f) ||
      (f[0] != "pass" && f[0] != "fail") || !detail::number(f[1], r.passes) ||
      !detail::number(f[2], r.errors))
    return std::nullopt;
  r.pass = f[0] == "pass";
  return r;
}

inline std::optional<DiskStartLine> parse_disk_start(std::string_view line) {
  std::vector<std::string_view> f;
  DiskStartLine r;
  if (!detail::line_fields(line, "kvmig-guest: disk start ", {"blocks", "block", "pattern", "rate"}, f) ||
      !detail::number(f[0], r.blocks) || !detail::number(f[1], r.block_bytes) || f[2].empty() ||
      !detail::rate(f[3], r.rate_mibps))
    return std::nullopt;
  r.pattern = std::string(f[2]);
  return r;
}

inline std::optional<DiskPassLine> parse_disk_pass(std::string_view line) {
  std::vector<std::string_view> f;
  DiskPassLine r;
  if (!detail::line_fields(line, "kvmig-guest: disk pass ", {"n", "writes", "reads", "errors"}, f) ||
      !detail::number(f[0], r.n) || !detail::number(f[1], r.writes) || !detail::number(f[2], r.reads) ||
      !detail::number(f[3], r.errors))
    return std::nullopt;
  return r;
}

inline std::optional<DiskCorruptLine> parse_disk_corrupt(std::string_view line) {
  std::vector<std::string_view> f;
  DiskCorruptLine r;
  if (!detail::line_fields(line, "kvmig-guest: disk corrupt ", {"block", "want", "got", "why"}, f) ||
      !detail::number(f[0], r.block) || !detail::number(f[1], r.want) || !detail::number(f[2], r.got) ||
      f[3].empty())
    return std::nullopt;
  r.why = std::string(f[3]);
  return r;
}

inline std::optional<DiskBadRequestsLine> parse_disk_bad_requests(std::string_view line) {
  std::vector<std::string_view> f;
  DiskBadRequestsLine r;
  if (!detail::line_fields(line, "kvmig-guest: disk bad-requests ", {"rejected", "of"}, f) ||
      !detail::number(f[0], r.rejected) || !detail::number(f[1], r.of))
    return std::nullopt;
  return r;
}

// Everything the guest said so far. feed() takes raw console bytes in any chunking.
struct Report {
  std::optional<StartLine> start;
  std::vector<PassLine> passes;
  std::vector<CorruptLine> corrupt;
  std::optional<DoneLine> done;
  std::optional<DiskStartLine> disk_start;
  std::vector<DiskPassLine> disk_passes;
  std::vector<DiskCorruptLine> disk_corrupt;
  std::optional<DiskBadRequestsLine> disk_bad_requests;
  std::vector<std::string> errors;  // "kvmig-guest: error ..." and "kvmig-guest: fault ..."
  std::vector<std::string> other;   // anything else (firmware output, malformed lines)

  void feed(std::string_view bytes) {
    for (char c : bytes) {
      if (c != '\n') {
        partial_ += c;
        continue;
      }
      if (!partial_.empty() && partial_.back() == '\r') partial_.pop_back();
      add_line(partial_);
      partial_.clear();
    }
  }

  void add_line(std::string_view line) {
    if (auto s = parse_start(line)) start = *s;
    else if (auto p = parse_pass(line)) passes.push_back(*p);
    else if (auto c = parse_corrupt(line)) corrupt.push_back(*c);
    else if (auto d = parse_done(line)) done = *d;
    else if (auto ds = parse_disk_start(line)) disk_start = *ds;
    else if (auto dp = parse_disk_pass(line)) disk_passes.push_back(*dp);
    else if (auto dc = parse_disk_corrupt(line)) disk_corrupt.push_back(*dc);
    else if (auto db = parse_disk_bad_requests(line)) disk_bad_requests = *db;
    else if (line.starts_with("kvmig-guest: error ") || line.starts_with("kvmig-guest: fault "))
      errors.emplace_back(line);
    else if (!line.empty()) other.emplace_back(line);
  }

  // Latest pass line of each vCPU that reported at least once.
  std::map<uint32_t, PassLine> last_pass() const {
    std::map<uint32_t, PassLine> last;
    for (const PassLine& p : passes) last[p.vcpu] = p;
    return last;
  }

 private:
  std::string partial_;
};

}  // namespace kvmig::guest
