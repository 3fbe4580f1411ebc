// Optional zstd compression of MEM_PAGES data. Page data is often incompressible (random or
// encrypted guest memory), and a batch's kind is best told by its first pages: each batch is
// decided by compressing a two-page sample first, so a batch that would not pay costs only
// that sample, and a guest whose memory turns compressible is compressed from the next batch.
#pragma once

#include <sys/uio.h>
#include <zstd.h>

#include <cstdint>
#include <span>
#include <vector>

#include "base/result.h"

namespace kvmig::helper {

class PageCompressor {
 public:
  explicit PageCompressor(int level = 1);
  ~PageCompressor();
  PageCompressor(const PageCompressor&) = delete;
  PageCompressor& operator=(const PageCompressor&) = delete;

  // Compresses the concatenation of `in` into `out` as one zstd frame. Returns false (send
  // the batch raw) when the sample or the frame is not at least 1/8 smaller than its input.
  Result<bool> compress(std::span<const iovec> in, std::vector<uint8_t>& out);

 private:
  ZSTD_CCtx* ctx_;
  ZSTD_CCtx* sample_ctx_;
  int level_;
  std::vector<uint8_t> sample_;
};

class PageDecompressor {
 public:
  PageDecompressor();
  ~PageDecompressor();
  PageDecompressor(const PageDecompressor&) = delete;
  PageDecompressor& operator=(const PageDecompressor&) = delete;

  // Decompresses one frame into exactly the bytes of `out`, in order: a frame that ends short,
  // runs long or has bytes after it is an error, and nothing is written past `out`.
  Result<void> decompress(std::span<const uint8_t> frame, std::span<const iovec> out);

 private:
  ZSTD_DCtx* ctx_;
};

}  // namespace kvmig::helper
