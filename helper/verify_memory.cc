#include "helper/verify_memory.h"

#include <xxhash.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace kvmig::helper {
namespace {

constexpr uint64_t kPage = 4096;

uint64_t hash_list(std::span<const uint64_t> hashes) {
  // Little-endian bytes, so both sides agree whatever the host's byte order.
  std::vector<uint8_t> bytes(hashes.size() * 8);
  for (size_t i = 0; i < hashes.size(); ++i)
    for (int b = 0; b < 8; ++b) bytes[i * 8 + b] = static_cast<uint8_t>(hashes[i] >> (8 * b));
  return XXH3_64bits(bytes.data(), bytes.size());
}

uint64_t piece_count(RamRegions regions, uint64_t piece) {
  uint64_t n = 0;
  for (const auto& r : regions) n += (r.size + piece - 1) / piece;
  return n;
}

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string size_text(uint64_t bytes) {
  if (bytes % (1ull << 20) == 0) return std::to_string(bytes >> 20) + " MiB";
  return std::to_string(bytes >> 10) + " KiB";
}

// What this side knows of the piece at [gpa, gpa + len): the rounds that last wrote its
// pages here (and as what), whether it is all zero now, and its first 32 and last 16 bytes
// (the test guest keeps a page's tag and version in both).
std::string describe(uint64_t gpa, uint64_t len, const uint8_t* host, const PageRoundLog* log) {
  std::string s = "[" + hex(gpa) + ", +" + size_text(len) + ")";
  if (log) {
    uint32_t seen[256] = {};
    for (uint64_t off = 0; off < len; off += kPage) ++seen[log->at(gpa + off)];
    std::string rounds;
    for (int v = 0; v < 256; ++v) {
      if (!seen[v]) continue;
      if (!rounds.empty()) rounds += ",";
      rounds += (v & 0x7f) == 0 ? std::string("never") : "r" + std::to_string(v & 0x7f);
      if (v & 0x80) rounds += "(zero)";
      if (len > kPage) rounds += "x" + std::to_string(seen[v]);
    }
    s += " last written here: " + rounds;
  }
  bool zero = true;
  for (uint64_t i = 0; i < len && zero; ++i) zero = host[i] == 0;
  if (zero) {
    s += "; all zero here";
  } else {
    s += "; here starts";
    for (uint64_t i = 0; i < std::min<uint64_t>(32, len); i += 8) {
      uint64_t w;
      std::memcpy(&w, host + i, 8);
      s += " " + hex(w);
    }
    // And its last 16 bytes: the test guest repeats tag and version there, so a page torn
    // between two copies shows as a head and a tail that disagree.
    if (len >= 64) {
      s += ", ends";
      for (uint64_t i = len - 16; i < len; i += 8) {
        uint64_t w;
        std::memcpy(&w, host + i, 8);
        s += " " + hex(w);
      }
    }
  }
  return s;
}

}  // namespace

uint64_t verify_piece_bytes(uint64_t ram_bytes) {
  uint64_t piece = kPage;
  while (piece < (1ull << 30) && (ram_bytes + piece - 1) / piece > kVerifyMaxPieces) piece *= 2;
  return piece;
}

Verify verify_whole(RamRegions regions) {
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  Verify v;
  for (const auto& r : regions) {
    XXH3_64bits_update(st, r.host, r.size);
    v.bytes += r.size;
  }
  v.hash = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  return v;
}

Verify verify_pieces(RamRegions regions, uint64_t piece_bytes) {
  Verify v;
  v.range_bytes = piece_bytes;
  v.ranges.reserve(piece_count(regions, piece_bytes));
  for (const auto& r : regions) {
    for (uint64_t off = 0; off < r.size; off += piece_bytes)
      v.ranges.push_back(XXH3_64bits(r.host + off, std::min(piece_bytes, r.size - off)));
    v.bytes += r.size;
  }
  v.hash = hash_list(v.ranges);
  return v;
}

PageRoundLog::PageRoundLog(const MemoryLayout& layout) : ranges_(layout.ranges) {
  uint64_t pages = 0;
  for (const MemRange& r : ranges_) {
    first_page_.push_back(pages);
    pages += r.size / kPage;
  }
  pages_.assign(pages, 0);
}

int PageRoundLog::range_of(uint64_t gpa) const {
  for (size_t i = 0; i < ranges_.size(); ++i)
    if (gpa >= ranges_[i].gpa && gpa - ranges_[i].gpa < ranges_[i].size) return static_cast<int>(i);
  return -1;
}

void PageRoundLog::note(uint64_t gpa, uint64_t pages, uint32_t round, bool zero) {
  const uint8_t v = static_cast<uint8_t>(std::min<uint32_t>(round, 127) | (zero ? 0x80 : 0));
  // A run the receiver accepted lies inside one range: look it up once, not per page.
  for (uint64_t p = 0; p < pages;) {
    const uint64_t at = gpa + p * kPage;
    const int r = range_of(at);
    if (r < 0) {
      ++p;
      continue;
    }
    const uint64_t off = (at - ranges_[r].gpa) / kPage;
    const uint64_t n = std::min(pages - p, ranges_[r].size / kPage - off);
    std::fill_n(pages_.begin() + static_cast<int64_t>(first_page_[r] + off), n, v);
    p += n;
  }
}

uint8_t PageRoundLog::at(uint64_t gpa) const {
  const int r = range_of(gpa);
  return r >= 0 ? pages_[first_page_[r] + (gpa - ranges_[r].gpa) / kPage] : 0;
}

Result<void> check_verify(const Verify& source, RamRegions regions, const PageRoundLog* log,
                          std::string* detail, size_t max_lines) {
  uint64_t bytes = 0;
  for (const auto& r : regions) bytes += r.size;
  if (source.bytes != bytes)
    return wire_error(WireCode::malformed, "VERIFY covers " + std::to_string(source.bytes) + " bytes of " +
                                               std::to_string(bytes));
  if (source.range_bytes == 0) {
    if (verify_whole(regions).hash == source.hash) return ok();
    return wire_error(WireCode::internal, "VERIFY: guest memory hash differs from the source's");
  }
  const uint64_t want = piece_count(regions, source.range_bytes);
  if (source.ranges.size() != want)
    return wire_error(WireCode::malformed, "VERIFY: " + std::to_string(source.ranges.size()) +
                                               " range hashes, the layout has " + std::to_string(want) +
                                               " pieces of " + size_text(source.range_bytes));
  if (hash_list(source.ranges) != source.hash)
    return wire_error(WireCode::malformed, "VERIFY: the hash is not that of its range hashes");
  const Verify here = verify_pieces(regions, source.range_bytes);
  if (here.hash == source.hash) return ok();
  size_t differ = 0, i = 0;
  std::string first;
  for (const auto& r : regions) {
    for (uint64_t off = 0; off < r.size; off += source.range_bytes, ++i) {
      if (here.ranges[i] == source.ranges[i]) continue;
      const uint64_t len = std::min(source.range_bytes, r.size - off);
      if (differ < 3 || (detail && differ < max_lines)) {
        std::string d = describe(r.gpa + off, len, r.host + off, log);
        if (differ < 3) first += (differ ? "; " : "") + d;
        if (detail && differ < max_lines) *detail += "verify: differs " + d + "\n";
      }
      ++differ;
    }
  }
  return wire_error(WireCode::internal, "VERIFY: guest memory differs from the source's in " +
                                            std::to_string(differ) + " of " + std::to_string(want) +
                                            " pieces of " + size_text(source.range_bytes) + ": " + first +
                                            (differ > 3 ? "; ..." : ""));
}

}  // namespace kvmig::helper
