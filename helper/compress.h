// zstd compression of MEM_PAGES data, decided batch by batch. Page data is often
// incompressible (random or encrypted guest memory), and a batch's kind is best told by its
// first pages: each batch is decided by compressing a two-page sample first, so a batch that
// would not pay costs only that sample, and a guest whose memory turns compressible is
// compressed from the next batch. In the automatic mode (the default) a batch that shrinks is
// compressed only if compressing it and sending the frame is expected to take less time than
// sending it raw, from the compressor's measured speed and the link's (compression_pays).
#pragma once

#include <sys/uio.h>
#include <zstd.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace kvmig::helper {

// off: never (the feature is not even offered); on: every batch whose sample shrinks;
// automatic: only where it also saves time (the CLI's --compress auto, the default).
enum class CompressMode : uint8_t { off, on, automatic };
Result<CompressMode> parse_compress_mode(std::string_view text);  // "off" | "on" | "auto"
const char* compress_mode_name(CompressMode mode);

// A batch must shrink to this share of its size (sample and frame) to go compressed.
inline constexpr double kMaxCompressRatio = 7.0 / 8;

// What the automatic mode decides on, per batch, all for one stream.
struct CompressSignals {
  double sample_ratio = 1;   // compressed / raw size of the batch's sample
  double compress_rate = 0;  // raw bytes/s this stream's compressor takes in (0: unknown)
  double link_rate = 0;      // bytes/s this stream's raw batches went out at (0: unknown)
};

// Whether a batch goes compressed. Never when the sample does not shrink to
// kMaxCompressRatio; `on` then always; `automatic` when, per raw byte, compressing and sending
// the frame beats sending raw: 1/compress_rate + ratio/link_rate < 1/link_rate. An unknown
// rate counts as "compress": shrinking is the point, and the try measures the compressor.
bool compression_pays(CompressMode mode, const CompressSignals& signals);

// One per data stream (not thread-safe); keeps what it measured from batch to batch.
class PageCompressor {
 public:
  // `cpu_share`: the share of one CPU this stream's compressor can count on (streams beyond
  // the CPUs share them).
  explicit PageCompressor(CompressMode mode = CompressMode::on, double cpu_share = 1, int level = 1);
  ~PageCompressor();
  PageCompressor(const PageCompressor&) = delete;
  PageCompressor& operator=(const PageCompressor&) = delete;

  // Compresses the concatenation of `in` into `out` as one zstd frame. Returns false (send
  // the batch raw) when compression_pays() says no, or the frame is not at least 1/8 smaller.
  // `in` may be live guest memory: the frame is of one private copy of it, taken first.
  Result<bool> compress(std::span<const iovec> in, std::vector<uint8_t>& out);

  // A batch went out raw: `bytes` in `seconds` of writing. This is how the link's rate is
  // learnt (a write blocks while the link is the bottleneck); writes under 1 MiB are ignored,
  // as they only show how fast the socket buffer takes them.
  void note_raw_write(uint64_t bytes, double seconds);
  // Raw bytes per CPU-second this compressor achieved lately (0: not measured yet).
  double compress_rate() const { return rate_; }
  double link_rate() const { return link_rate_; }

 private:
  ZSTD_CCtx* ctx_;
  ZSTD_CCtx* sample_ctx_;
  CompressMode mode_;
  double cpu_share_;
  int level_;
  std::vector<uint8_t> sample_;
  // The batch's pages, copied once, then compressed: up to one batch (16 MiB) per stream for
  // the migration's length, with work_ about as much again.
  std::unique_ptr<uint8_t[]> staging_;
  size_t staging_size_ = 0;
  std::unique_ptr<uint8_t[]> work_;  // the frame as it is made, reused
  size_t work_size_ = 0;
  double rate_ = 0;
  double link_rate_ = 0;
  uint32_t declined_ = 0;  // shrinking batches in a row sent raw (automatic mode)
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
