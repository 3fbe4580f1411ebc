#include "helper/wire_pages.h"

#include <sys/mman.h>

#include <chrono>
#include <cstdint>
#include <cstring>

#include "helper/verify_memory.h"

namespace kvmig::helper {
namespace {

constexpr size_t kBatchHead = 16;
constexpr size_t kRunSize = 16;
constexpr uint32_t kRunData = 0;
constexpr uint32_t kRunZero = 1;

// Word-wise with an early exit: a data page usually differs in its first bytes, so scanning
// costs almost nothing unless the page really is zero.
bool page_is_zero(const uint8_t* p) {
  uint64_t words[kPageSize / 8];
  static_assert(sizeof words == kPageSize);
  for (size_t off = 0; off < kPageSize; off += 64) {
    std::memcpy(words, p + off, 64);
    uint64_t acc = 0;
    for (int i = 0; i < 8; ++i) acc |= words[i];
    if (acc) return false;
  }
  return true;
}

// Makes [p, p+len) read as zeros, writing only where it does not already: reading a page
// that was never written is cheap (the kernel's zero page), writing it allocates it.
void zero_pages(uint8_t* p, uint64_t len, bool anonymous) {
  if (anonymous && reinterpret_cast<uintptr_t>(p) % kPageSize == 0 && len % kPageSize == 0 &&
      ::madvise(p, len, MADV_DONTNEED) == 0)
    return;
  for (uint64_t off = 0; off < len; off += kPageSize)
    if (!page_is_zero(p + off)) std::memset(p + off, 0, kPageSize);
}

void put_run(ByteWriter& w, uint64_t gpa, uint32_t pages, uint32_t kind) {
  w.u64(gpa);
  w.u32(pages);
  w.u32(kind);
}

}  // namespace

std::vector<PageRun> runs_from_bitmap(const kvm::DirtyBitmap& bitmap) {
  std::vector<PageRun> runs;
  uint64_t page = 0;
  while (page < bitmap.pages) {
    uint64_t word = bitmap.bits[page / 64] >> (page % 64);
    if (word == 0) {
      page = (page / 64 + 1) * 64;
      continue;
    }
    page += __builtin_ctzll(word);
    if (page >= bitmap.pages) break;
    uint64_t start = page;
    while (page < bitmap.pages && (bitmap.bits[page / 64] >> (page % 64)) & 1) {
      ++page;
    }
    // Runs are u32 pages on the wire; split the (16 TiB) runs that would not fit.
    for (uint64_t s = start; s < page; s += UINT32_MAX) {
      uint64_t n = std::min<uint64_t>(page - s, UINT32_MAX);
      runs.push_back({bitmap.gpa + s * kPageSize, static_cast<uint32_t>(n)});
    }
  }
  return runs;
}

std::vector<std::vector<PageRun>> split_batches(std::span<const PageRun> runs,
                                                uint64_t max_pages, uint32_t max_runs) {
  std::vector<std::vector<PageRun>> batches;
  std::vector<PageRun> current;
  uint64_t pages = 0;
  for (PageRun run : runs) {
    while (run.pages > 0) {
      if (pages == max_pages || current.size() == max_runs) {
        batches.push_back(std::move(current));
        current.clear();
        pages = 0;
      }
      uint32_t take = static_cast<uint32_t>(std::min<uint64_t>(run.pages, max_pages - pages));
      current.push_back({run.gpa, take});
      pages += take;
      run.gpa += take * kPageSize;
      run.pages -= take;
    }
  }
  if (!current.empty()) batches.push_back(std::move(current));
  return batches;
}

Result<BatchStats> PageBatchSender::send(uint32_t round, std::span<const PageRun> runs) {
  static const WireLimits limits;
  ByteWriter w;
  w.buffer().swap(meta_);
  w.buffer().clear();
  w.u32(round);
  w.u32(0);  // run count, patched below
  w.u64(0);  // data pages, patched below
  iov_.clear();
  BatchStats stats;
  uint64_t data_pages = 0;
  uint32_t nruns = 0;
  for (const PageRun& run : runs) {
    if (run.pages == 0) continue;
    uint8_t* host = source_(run.gpa, run.pages * kPageSize);
    if (!host)
      return wire_error(WireCode::gpa_out_of_range, "MEM_PAGES send: run at gpa " +
                                                        std::to_string(run.gpa) +
                                                        " not in guest memory");
    // Split the run into alternating data / zero sub-runs.
    uint32_t i = 0;
    while (i < run.pages) {
      bool zero = page_is_zero(host + i * kPageSize);
      uint32_t j = i + 1;
      while (j < run.pages && page_is_zero(host + j * kPageSize) == zero) ++j;
      put_run(w, run.gpa + i * kPageSize, j - i, zero ? kRunZero : kRunData);
      ++nruns;
      if (zero) {
        stats.zero_pages += j - i;
      } else {
        data_pages += j - i;
        iov_.push_back({host + i * kPageSize, (j - i) * kPageSize});
      }
      i = j;
    }
    stats.pages += run.pages;
  }
  if (nruns == 0) return wire_error(WireCode::internal, "MEM_PAGES send: empty batch");
  if (stats.pages > limits.max_batch_pages || nruns > limits.max_batch_runs)
    return wire_error(WireCode::oversize, "MEM_PAGES send: batch of " +
                                              std::to_string(stats.pages) +
                                              " pages; split it with split_batches()");
  meta_ = w.take();
  for (int i = 0; i < 4; ++i) meta_[4 + i] = static_cast<uint8_t>(nruns >> (8 * i));
  for (int i = 0; i < 8; ++i) meta_[8 + i] = static_cast<uint8_t>(data_pages >> (8 * i));

  uint32_t flags = 0;
  if (compressor_ && data_pages > 0) {
    KVMIG_ASSIGN(bool pays, compressor_->compress(iov_, frame_));
    if (pays) {
      // The frame is a private copy, so unlike raw pages it is stable and can be checksummed.
      meta_.insert(meta_.end(), frame_.begin(), frame_.end());
      iov_.clear();
      flags |= kFlagCompressed;
      stats.compressed = true;
    }
  }
  uint64_t length = meta_.size() + (flags ? 0 : data_pages * kPageSize);
  WireHeader h = make_header(MsgType::mem_pages, version_, meta_, length, flags);
  uint8_t head[kHeaderSize];
  encode_header(h, head);
  iov_.insert(iov_.begin(), {{head, kHeaderSize}, {meta_.data(), meta_.size()}});
  const auto write_begin = std::chrono::steady_clock::now();
  KVMIG_TRY(stream_.write_all(iov_));
  if (compressor_ && !stats.compressed && data_pages > 0)
    compressor_->note_raw_write(kHeaderSize + length,
                                std::chrono::duration<double>(std::chrono::steady_clock::now() - write_begin).count());
  stats.wire_bytes = kHeaderSize + length;
  stats.raw_bytes = kHeaderSize + meta_.size() - (stats.compressed ? frame_.size() : 0) + data_pages * kPageSize;
  return stats;
}

Result<BatchStats> PageBatchReceiver::receive(const WireHeader& header,
                                              std::optional<uint32_t> expect_round) {
  if (header.type != MsgType::mem_pages)
    return wire_error(WireCode::internal, "PageBatchReceiver given a non-MEM_PAGES header");
  const bool compressed = header.flags & kFlagCompressed;
  if (header.length < kBatchHead + kRunSize)
    return wire_error(WireCode::malformed, "MEM_PAGES: payload of " +
                                               std::to_string(header.length) + " bytes");
  meta_.resize(kBatchHead);
  KVMIG_TRY(stream_.read(meta_.data(), kBatchHead));
  ByteReader head(meta_, "MEM_PAGES");
  KVMIG_ASSIGN(round_, head.u32());
  KVMIG_ASSIGN(uint32_t nruns, head.u32());
  KVMIG_ASSIGN(uint64_t data_pages, head.u64());
  if (expect_round && round_ != *expect_round)
    return wire_error(WireCode::unexpected, "MEM_PAGES of round " + std::to_string(round_) +
                                                " in round " + std::to_string(*expect_round));
  if (nruns == 0 || nruns > limits_.max_batch_runs)
    return wire_error(nruns ? WireCode::oversize : WireCode::malformed,
                      "MEM_PAGES: " + std::to_string(nruns) + " runs, cap " +
                          std::to_string(limits_.max_batch_runs));
  if (data_pages > limits_.max_batch_pages)
    return wire_error(WireCode::oversize, "MEM_PAGES: " + std::to_string(data_pages) +
                                              " data pages, cap " +
                                              std::to_string(limits_.max_batch_pages));
  const uint64_t meta_len = kBatchHead + kRunSize * uint64_t{nruns};
  if (meta_len > header.length || (compressed && meta_len == header.length) ||
      (!compressed && header.length != meta_len + data_pages * kPageSize))
    return wire_error(WireCode::malformed, "MEM_PAGES: length " + std::to_string(header.length) +
                                               " does not match " + std::to_string(nruns) +
                                               " runs and " + std::to_string(data_pages) +
                                               " data pages");
  // Descriptors (and a compressed frame) are small and must be checked before any page moves.
  const uint64_t checked_len = compressed ? header.length : meta_len;
  meta_.resize(checked_len);
  KVMIG_TRY(stream_.read(meta_.data() + kBatchHead, checked_len - kBatchHead));
  if (payload_checksum(meta_) != header.checksum)
    return wire_error(WireCode::bad_checksum, "MEM_PAGES: descriptor checksum mismatch");

  ByteReader r(std::span<const uint8_t>(meta_).subspan(kBatchHead, nruns * kRunSize), "MEM_PAGES");
  std::vector<iovec> data;
  std::vector<iovec> zeros;
  BatchStats stats;
  uint64_t seen_data = 0;
  for (uint32_t i = 0; i < nruns; ++i) {
    KVMIG_ASSIGN(uint64_t gpa, r.u64());
    KVMIG_ASSIGN(uint32_t pages, r.u32());
    KVMIG_ASSIGN(uint32_t kind, r.u32());
    if (kind != kRunData && kind != kRunZero)
      return wire_error(WireCode::malformed, "MEM_PAGES: run " + std::to_string(i) + " kind " +
                                                 std::to_string(kind));
    if (pages == 0 || stats.pages + pages > limits_.max_batch_pages)
      return wire_error(pages ? WireCode::oversize : WireCode::malformed,
                        "MEM_PAGES: run " + std::to_string(i) + " of " + std::to_string(pages) +
                            " pages");
    const uint64_t len = pages * kPageSize;
    if (gpa % kPageSize || !layout_.contains(gpa, len))
      return wire_error(WireCode::gpa_out_of_range,
                        "MEM_PAGES: run " + std::to_string(i) + " gpa " + std::to_string(gpa) +
                            " +" + std::to_string(len) + " outside guest memory");
    uint8_t* host = target_(gpa, len);
    if (!host)
      return wire_error(WireCode::gpa_out_of_range, "MEM_PAGES: run " + std::to_string(i) +
                                                        " gpa " + std::to_string(gpa) +
                                                        " not backed by guest memory here");
    stats.pages += pages;
    if (kind == kRunZero) {
      stats.zero_pages += pages;
      zeros.push_back({host, len});
    } else {
      seen_data += pages;
      data.push_back({host, len});
    }
  }
  if (seen_data != data_pages)
    return wire_error(WireCode::malformed, "MEM_PAGES: runs hold " + std::to_string(seen_data) +
                                               " data pages, head says " +
                                               std::to_string(data_pages));
  if (round_log_) {
    ByteReader runs(std::span<const uint8_t>(meta_).subspan(kBatchHead, nruns * kRunSize), "MEM_PAGES");
    for (uint32_t i = 0; i < nruns; ++i) {  // checked above: cannot fail
      const uint64_t gpa = *runs.u64();
      const uint32_t pages = *runs.u32();
      round_log_->note(gpa, pages, round_, *runs.u32() == kRunZero);
    }
  }
  for (const iovec& z : zeros) zero_pages(static_cast<uint8_t*>(z.iov_base), z.iov_len, anonymous_target_);
  if (compressed) {
    auto rc = decompressor_.decompress(std::span<const uint8_t>(meta_).subspan(meta_len), data);
    if (!rc.ok()) return std::move(rc.error().prefix("MEM_PAGES"));
  } else {
    KVMIG_TRY(stream_.read_all(data));
  }
  stats.compressed = compressed;
  stats.wire_bytes = kHeaderSize + header.length;
  return stats;
}

}  // namespace kvmig::helper
