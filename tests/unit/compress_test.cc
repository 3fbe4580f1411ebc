// Compression of page batches: the pure "does it pay" decision, and PageCompressor acting on
// it with real zstd on sparse, random and mixed pages.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "helper/compress.h"

namespace kvmig::helper {
namespace {

constexpr double kGB = 1e9;

TEST(CompressionPays, NeverWhenTheSampleDoesNotShrink) {
  for (CompressMode m : {CompressMode::off, CompressMode::on, CompressMode::automatic}) {
    EXPECT_FALSE(compression_pays(m, {0.9, 10 * kGB, 0.1 * kGB})) << compress_mode_name(m);
    EXPECT_FALSE(compression_pays(m, {1.0, 0, 0})) << compress_mode_name(m);
  }
}

TEST(CompressionPays, OffNeverOnWhereverItShrinks) {
  EXPECT_FALSE(compression_pays(CompressMode::off, {0.01, 10 * kGB, 0.1 * kGB}));
  // `on` ignores speed: a compressor 100x slower than the link still compresses.
  EXPECT_TRUE(compression_pays(CompressMode::on, {0.5, 0.01 * kGB, 1 * kGB}));
  EXPECT_TRUE(compression_pays(CompressMode::on, {kMaxCompressRatio, 0, 0}));
}

TEST(CompressionPays, AutoTriesWhileARateIsUnknown) {
  EXPECT_TRUE(compression_pays(CompressMode::automatic, {0.5, 0, 0}));
  EXPECT_TRUE(compression_pays(CompressMode::automatic, {0.5, 0.01 * kGB, 0}));
  EXPECT_TRUE(compression_pays(CompressMode::automatic, {0.5, 0, 10 * kGB}));
}

TEST(CompressionPays, AutoWeighsCompressorAgainstLink) {
  // Sparse pages (ratio 0.003) at 7 GB/s over a 2 GB/s loopback: 0.14 + 0.0015 < 0.5 ns/B.
  EXPECT_TRUE(compression_pays(CompressMode::automatic, {0.003, 7 * kGB, 2 * kGB}));
  // Mixed data (ratio 0.42) at 0.3 GB/s: loses on that loopback (3.3 + 0.2 > 0.5 ns/B) ...
  EXPECT_FALSE(compression_pays(CompressMode::automatic, {0.42, 0.3 * kGB, 2 * kGB}));
  // ... and wins on a 1 Gbit/s link (3.3 + 3.4 < 8 ns/B).
  EXPECT_TRUE(compression_pays(CompressMode::automatic, {0.42, 0.3 * kGB, 0.125 * kGB}));
  // The break-even point: ratio < 1 - link/compressor.
  EXPECT_TRUE(compression_pays(CompressMode::automatic, {0.49, 2 * kGB, 1 * kGB}));
  EXPECT_FALSE(compression_pays(CompressMode::automatic, {0.51, 2 * kGB, 1 * kGB}));
  // A compressor slower than the link never pays, however well it shrinks.
  EXPECT_FALSE(compression_pays(CompressMode::automatic, {0.001, 1 * kGB, 1.5 * kGB}));
}

TEST(CompressMode, ParsesTheCliWords) {
  EXPECT_EQ(*parse_compress_mode("auto"), CompressMode::automatic);
  EXPECT_EQ(*parse_compress_mode("on"), CompressMode::on);
  EXPECT_EQ(*parse_compress_mode("off"), CompressMode::off);
  EXPECT_FALSE(parse_compress_mode("yes").ok());
  EXPECT_FALSE(parse_compress_mode("").ok());
  EXPECT_STREQ(compress_mode_name(CompressMode::automatic), "auto");
}

constexpr size_t kPages = 512;  // 2 MiB batches: enough for the write-rate floor of 1 MiB

// Pages as the test guest leaves them: 16 bytes at each end, zeros between.
std::vector<uint8_t> sparse_pages() {
  std::vector<uint8_t> v(kPages * 4096, 0);
  for (size_t p = 0; p < kPages; ++p) {
    uint64_t tag[2] = {p * 0x9e3779b97f4a7c15ull, p + 1};
    std::memcpy(&v[p * 4096], tag, 16);
    std::memcpy(&v[p * 4096 + 4080], tag, 16);
  }
  return v;
}

std::vector<uint8_t> random_pages() {
  std::vector<uint8_t> v(kPages * 4096);
  std::mt19937_64 rng(7);
  for (size_t i = 0; i < v.size(); i += 8) {
    uint64_t x = rng();
    std::memcpy(&v[i], &x, 8);
  }
  return v;
}

TEST(PageCompressor, AutoCompressesSparsePagesAndMeasuresItself) {
  auto data = sparse_pages();
  iovec in{data.data(), data.size()};
  std::vector<uint8_t> out;
  PageCompressor c(CompressMode::automatic);
  auto r = c.compress({&in, 1}, out);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_TRUE(*r);
  EXPECT_LT(out.size(), data.size() / 50);
  EXPECT_GT(c.compress_rate(), 0);
  PageDecompressor d;
  std::vector<uint8_t> back(data.size());
  iovec o{back.data(), back.size()};
  ASSERT_TRUE(d.decompress(out, {&o, 1}).ok());
  EXPECT_EQ(back, data);
}

TEST(PageCompressor, RandomPagesCostOnlyTheSample) {
  auto data = random_pages();
  iovec in{data.data(), data.size()};
  std::vector<uint8_t> out;
  for (CompressMode m : {CompressMode::on, CompressMode::automatic}) {
    PageCompressor c(m);
    auto r = c.compress({&in, 1}, out);
    ASSERT_TRUE(r.ok());
    EXPECT_FALSE(*r);
    EXPECT_TRUE(out.empty());
    EXPECT_EQ(c.compress_rate(), 0) << "the whole batch must not have been compressed";
  }
}

TEST(PageCompressor, AutoSendsRawOverALinkFasterThanTheCompressorButProbesAgain) {
  auto data = sparse_pages();
  iovec in{data.data(), data.size()};
  std::vector<uint8_t> out;
  PageCompressor c(CompressMode::automatic);
  ASSERT_TRUE(*c.compress({&in, 1}, out));  // rates unknown: try, which measures the compressor
  // A raw batch went out at 10^6 GB/s: no compressor keeps up with that.
  c.note_raw_write(data.size(), data.size() / (1e6 * kGB));
  EXPECT_GT(c.link_rate(), 1e5 * kGB);
  int compressed = 0;
  for (int i = 0; i < 17; ++i) compressed += *c.compress({&in, 1}, out) ? 1 : 0;
  // Sixteen raw in a row, then one compressed to see whether the compressor got faster.
  EXPECT_EQ(compressed, 1);
  // Small writes say nothing about the link and are not counted.
  PageCompressor fresh(CompressMode::automatic);
  fresh.note_raw_write(64 * 1024, 1e-9);
  EXPECT_EQ(fresh.link_rate(), 0);
}

TEST(PageCompressor, AutoKeepsCompressingWhileTheLinkIsUnknown) {
  auto data = sparse_pages();
  iovec in{data.data(), data.size()};
  std::vector<uint8_t> out;
  PageCompressor c(CompressMode::automatic);
  int compressed = 0;
  for (int i = 0; i < 40; ++i) compressed += *c.compress({&in, 1}, out) ? 1 : 0;
  EXPECT_EQ(compressed, 40);
  EXPECT_EQ(c.link_rate(), 0);
}

TEST(PageCompressor, AutoKeepsCompressingOverASlowLink) {
  auto data = sparse_pages();
  iovec in{data.data(), data.size()};
  std::vector<uint8_t> out;
  PageCompressor c(CompressMode::automatic);
  ASSERT_TRUE(*c.compress({&in, 1}, out));
  c.note_raw_write(data.size(), data.size() / (0.01 * kGB));  // 10 MB/s
  int compressed = 0;
  for (int i = 0; i < 40; ++i) compressed += *c.compress({&in, 1}, out) ? 1 : 0;
  EXPECT_EQ(compressed, 40) << "a compressible batch is never sent raw just to time the link";
}

}  // namespace
}  // namespace kvmig::helper
