#include "helper/compress.h"

#include <time.h>

#include <algorithm>

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
  // Stop as soon as the output passes 7/8 of the input: no need to finish a losing frame.
  size_t limit = total - total / 8;
  // Into a buffer kept from batch to batch: resizing `out` to the bound would zero-fill
  // 16 MiB per batch (and fault it in on the first), more work than compressing sparse pages.
  const size_t bound = ZSTD_compressBound(total);
  if (work_size_ < bound) {
    work_ = std::make_unique_for_overwrite<uint8_t[]>(bound);
    work_size_ = bound;
  }
  // No pledged size: zstd sizes its tables for the source size, so batches of varying size
  // made it reallocate (and, on a fresh heap, fault in) its workspace; tens of ms each time
  // on the test host, which in the paused round is downtime. Unsized, it is set up once.
  ZSTD_CCtx_reset(ctx_, ZSTD_reset_session_only);
  ZSTD_outBuffer ob{work_.get(), bound, 0};
  bool pays = true;
  size_t consumed = 0;  // input taken in before the frame finished or lost
  for (size_t i = 0; i < in.size() && pays; ++i) {
    ZSTD_inBuffer ib{in[i].iov_base, in[i].iov_len, 0};
    bool last = i + 1 == in.size();
    for (;;) {
      size_t rc = ZSTD_compressStream2(ctx_, &ob, &ib, last ? ZSTD_e_end : ZSTD_e_continue);
      if (ZSTD_isError(rc))
        return wire_error(WireCode::internal, std::string("zstd compress: ") + ZSTD_getErrorName(rc));
      if (ob.pos > limit) {
        pays = false;
        break;
      }
      if (last ? rc == 0 : ib.pos == ib.size) break;
    }
    consumed += ib.pos;
  }
  const double cpu = thread_cpu_seconds() - cpu_begin;
  if (cpu > 0) {
    // Per batch of megabytes the figure is steady; still smooth it, as the data changes.
    const double rate = static_cast<double>(consumed) / cpu;
    rate_ = rate_ > 0 ? 0.5 * rate_ + 0.5 * rate : rate;
  }
  if (!pays) return false;
  out.assign(work_.get(), work_.get() + ob.pos);
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
