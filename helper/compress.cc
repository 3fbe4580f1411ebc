#include "helper/compress.h"

#include <algorithm>

#include "helper/wire.h"

namespace kvmig::helper {

PageCompressor::PageCompressor(int level)
    : ctx_(ZSTD_createCCtx()), sample_ctx_(ZSTD_createCCtx()), level_(level) {
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
  if (packed > sample - sample / 8) return false;

  size_t total = 0;
  for (const iovec& v : in) total += v.iov_len;
  // Stop as soon as the output passes 7/8 of the input: no need to finish a losing frame.
  size_t limit = total - total / 8;
  out.resize(ZSTD_compressBound(total));
  ZSTD_CCtx_reset(ctx_, ZSTD_reset_session_only);
  ZSTD_CCtx_setPledgedSrcSize(ctx_, total);
  ZSTD_outBuffer ob{out.data(), out.size(), 0};
  bool pays = true;
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
  }
  if (!pays) {
    out.clear();
    return false;
  }
  out.resize(ob.pos);
  return true;
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
