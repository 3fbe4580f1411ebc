#include "helper/compress.h"

#include <time.h>

#include <algorithm>
#include <cstring>
#include <zstd_errors.h>

#include "helper/wire.h"

namespace kvmig::helper {
namespace {

// After this many batches in a row that shrink but were sent raw (the link was measured
// faster than the compressor), the automatic mode compresses one anyway: the compressor's
// speed is only measured on batches it compresses, and the data or the load may have changed.
// There is no such probe the other way (sending a compressible batch raw to time the link):
// measured here, a 16 MiB raw write after a round of small frames took seconds, not
// milliseconds, on loopback TCP (the receive window had not grown), so such a probe costs
// far more than it can tell. The link is timed on batches that do not shrink.
constexpr uint32_t kReprobeBatches = 16;

// CPU time, not wall time: with more streams than CPUs a stream's thread waits for a CPU
// while compressing, which says nothing about the compressor's speed.
double thread_cpu_seconds() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

}  // namespace

Result<CompressMode> parse_compress_mode(std::string_view text) {
  if (text == "off") return CompressMode::off;
  if (text == "on") return CompressMode::on;
  if (text == "auto") return CompressMode::automatic;
  return Error{"compression must be auto, on or off, not '" + std::string(text) + "'"};
}

const char* compress_mode_name(CompressMode mode) {
  switch (mode) {
    case CompressMode::off: return "off";
    case CompressMode::on: return "on";
    case CompressMode::automatic: return "auto";
  }
  return "?";
}

bool compression_pays(CompressMode mode, const CompressSignals& s) {
  if (mode == CompressMode::off || !(s.sample_ratio <= kMaxCompressRatio)) return false;
  if (mode == CompressMode::on) return true;
  if (s.compress_rate <= 0 || s.link_rate <= 0) return true;
  // Seconds per raw byte: compress it, then send what is left of it; or send it all.
  return 1 / s.compress_rate + s.sample_ratio / s.link_rate < 1 / s.link_rate;
}

PageCompressor::PageCompressor(CompressMode mode, double cpu_share, int level)
    : ctx_(ZSTD_createCCtx()),
      sample_ctx_(ZSTD_createCCtx()),
      mode_(mode),
      cpu_share_(cpu_share > 0 && cpu_share <= 1 ? cpu_share : 1),
      level_(level) {
  ZSTD_CCtx_setParameter(ctx_, ZSTD_c_compressionLevel, level);
}

PageCompressor::~PageCompressor() {
  ZSTD_freeCCtx(ctx_);
  ZSTD_freeCCtx(sample_ctx_);
}

Result<bool> PageCompressor::compress(std::span<const iovec> in, std::vector<uint8_t>& out) {
  out.clear();
  if (in.empty() || in[0].iov_len == 0) return false;
  const size_t sample = std::min<size_t>(in[0].iov_len, 2 * 4096);
  sample_.resize(ZSTD_compressBound(sample));
  size_t packed = ZSTD_compressCCtx(sample_ctx_, sample_.data(), sample_.size(), in[0].iov_base,
                                    sample, level_);
  if (ZSTD_isError(packed))
    return wire_error(WireCode::internal, std::string("zstd compress: ") + ZSTD_getErrorName(packed));
  CompressSignals signals;
  signals.sample_ratio = static_cast<double>(packed) / static_cast<double>(sample);
  signals.compress_rate = rate_ * cpu_share_;
  signals.link_rate = link_rate_;
  bool go = compression_pays(mode_, signals);
  if (mode_ == CompressMode::automatic && signals.sample_ratio <= kMaxCompressRatio) {
    declined_ = go ? 0 : declined_ + 1;
    if (declined_ > kReprobeBatches) {
      go = true;
      declined_ = 0;
    }
  }
  if (!go) return false;

  const double cpu_begin = thread_cpu_seconds();
  size_t total = 0;
  for (const iovec& v : in) total += v.iov_len;
  // The guest runs while its pages are compressed, so zstd gets a private copy, taken once.
  // Compressing live memory in place is not safe even for pages nobody writes: zstd may
  // encode an unchanged page as a match against another page it read earlier, and if that
  // page changed between its literal copy and the match check, the unchanged page decodes
  // as the other page's old bytes. Its dirty bit stays clear, so nothing resends it: a lost
  // write at the destination (tests/unit/compress_race_test.cc shows it).
  // With the copy, each page decodes as the copy had it, and a write after the copy is in
  // the next harvest. The copy costs ~1 ms per 16 MiB batch, against ~3 ms to compress it.
  if (staging_size_ < total) {
    staging_ = std::make_unique_for_overwrite<uint8_t[]>(total);
    staging_size_ = total;
  }
  size_t at = 0;
  for (const iovec& v : in) {
    std::memcpy(staging_.get() + at, v.iov_base, v.iov_len);
    at += v.iov_len;
  }
  // Stop as soon as the output passes 7/8 of the input: a frame that does not fit in that
  // is not worth finishing, and zstd gives up at the block that overflows.
  const size_t limit = total - total / 8;
  // Into a buffer kept from batch to batch: resizing `out` to the bound would zero-fill
  // 16 MiB per batch (and fault it in on the first), more work than compressing sparse pages.
  if (work_size_ < limit) {
    work_ = std::make_unique_for_overwrite<uint8_t[]>(limit);
    work_size_ = limit;
  }
  // One call with the size known. The streaming path used before left the size unknown, for
  // fear that zstd would reallocate its workspace as batch sizes vary; measured with
  // ZSTD_compress2 at level 1, a 64 KiB batch after a 16 MiB one took 0.02-0.05 ms, no
  // reallocation seen (its tables only grow with the source up to the 512 KiB window).
  const size_t packed_size = ZSTD_compress2(ctx_, work_.get(), limit, staging_.get(), total);
  const bool pays = !ZSTD_isError(packed_size);
  if (!pays && ZSTD_getErrorCode(packed_size) != ZSTD_error_dstSize_tooSmall)
    return wire_error(WireCode::internal, std::string("zstd compress: ") + ZSTD_getErrorName(packed_size));
  const double cpu = thread_cpu_seconds() - cpu_begin;
  if (cpu > 0) {
    // A frame given up on stopped where its output passed `limit`, having taken in about
    // that much: still a measurement, so automatic mode learns on data that does not pay too.
    // Per batch of megabytes the figure is steady; still smooth it, as the data changes.
    const double rate = static_cast<double>(pays ? total : limit) / cpu;
    rate_ = rate_ > 0 ? 0.5 * rate_ + 0.5 * rate : rate;
  }
  if (!pays) return false;
  out.assign(work_.get(), work_.get() + packed_size);
  return true;
}

void PageCompressor::note_raw_write(uint64_t bytes, double seconds) {
  // Small writes only show how fast the socket buffer takes them, not the link.
  if (seconds <= 0 || bytes < (1u << 20)) return;
  const double rate = static_cast<double>(bytes) / seconds;
  link_rate_ = link_rate_ > 0 ? 0.5 * link_rate_ + 0.5 * rate : rate;
}

PageDecompressor::PageDecompressor() : ctx_(ZSTD_createDCtx()) {}

PageDecompressor::~PageDecompressor() { ZSTD_freeDCtx(ctx_); }

Result<void> PageDecompressor::decompress(std::span<const uint8_t> frame,
                                          std::span<const iovec> out) {
  ZSTD_DCtx_reset(ctx_, ZSTD_reset_session_only);
  ZSTD_inBuffer ib{frame.data(), frame.size(), 0};
  size_t rc = 1;
  for (const iovec& v : out) {
    ZSTD_outBuffer ob{v.iov_base, v.iov_len, 0};
    while (ob.pos < ob.size) {
      size_t before_in = ib.pos, before_out = ob.pos;
      rc = ZSTD_decompressStream(ctx_, &ob, &ib);
      if (ZSTD_isError(rc))
        return wire_error(WireCode::malformed, std::string("zstd: ") + ZSTD_getErrorName(rc));
      if (ib.pos == before_in && ob.pos == before_out)
        return wire_error(WireCode::malformed, "zstd frame ends before the pages it describes");
    }
  }
  // All pages are filled; the frame must end exactly here, with nothing after it.
  uint8_t extra;
  ZSTD_outBuffer ob{&extra, 1, 0};
  if (rc != 0) rc = ZSTD_decompressStream(ctx_, &ob, &ib);
  if (ZSTD_isError(rc) || rc != 0 || ob.pos != 0 || ib.pos != ib.size)
    return wire_error(WireCode::malformed, "zstd frame longer than the pages it describes");
  return ok();
}

}  // namespace kvmig::helper
