// The block backend serving a kvmig base + delta chain (kvm/block_backend.h, kvm/block_chain.h)
// on real files through io_uring: reads resolve to the top-most layer holding each byte, writes
// go to the top only, a partial write of a granule the top lacks copies the rest up (so the
// parent's bytes around it survive), concurrent partial writes to one fresh granule both land,
// and bad chains are refused with one line. No KVM needed.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>

#include "helper/disk_chain_migration.h"
#include "kvm/block_backend.h"
#include "test_util.h"

namespace kvmig::kvm {
namespace {
using test::make_temp_dir;
using test::read_file;

constexpr uint64_t kSize = 1 << 20;

struct Waiter {
  std::mutex mu;
  std::condition_variable cv;
  std::map<uint64_t, int64_t> done;
  BlockBackend::Completion callback() {
    return [this](uint64_t tag, int64_t result) {
      std::lock_guard lock(mu);
      done[tag] = result;
      cv.notify_all();
    };
  }
  int64_t wait(uint64_t tag) {
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return done.count(tag) > 0; });
    return done[tag];
  }
};

std::vector<uint8_t> pattern(uint8_t seed) {
  std::vector<uint8_t> v(kSize);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<uint8_t>(seed + i * 7 + i / 4096);
  return v;
}

void write_file(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

std::vector<uint8_t> read_all(const std::string& path) {
  std::string s = read_file(path);
  return std::vector<uint8_t>(s.begin(), s.end());
}

void make_delta(const std::string& path, const std::string& parent) {
  ASSERT_EQ(::truncate(path.c_str(), 0) == 0 || errno == ENOENT, true);
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, kSize), 0);
  ::close(fd);
  std::ofstream(path + ".kvmig-delta") << R"({"kvmig_delta": 1, "parent": ")" << parent << R"(", "size": )" << kSize
                                        << "}\n";
}

// The data extents of a file, as (offset, length).
std::vector<std::pair<uint64_t, uint64_t>> extents(const std::string& path) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  int fd = ::open(path.c_str(), O_RDONLY);
  for (off_t at = 0;;) {
    off_t d = ::lseek(fd, at, SEEK_DATA);
    if (d < 0) break;
    off_t h = ::lseek(fd, d, SEEK_HOLE);
    out.push_back({static_cast<uint64_t>(d), static_cast<uint64_t>(h - d)});
    at = h;
  }
  ::close(fd);
  return out;
}

class BlockChainBackend : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = make_temp_dir("kvmig-chain-backend");
    base_ = pattern(1);
    mid_data_ = pattern(99);
    write_file(dir_ + "/base.raw", base_);
    make_delta(dir_ + "/mid.raw", "base.raw");
    // mid holds [64K, 128K)
    int fd = ::open((dir_ + "/mid.raw").c_str(), O_RDWR);
    ASSERT_EQ(::pwrite(fd, mid_data_.data() + 65536, 65536, 65536), 65536);
    ::close(fd);
    make_delta(dir_ + "/top.raw", "mid.raw");
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // What the chain must read: base, overlaid by mid's extent, overlaid by `top_writes`.
  std::vector<uint8_t> expected() const {
    std::vector<uint8_t> e = base_;
    std::memcpy(e.data() + 65536, mid_data_.data() + 65536, 65536);
    for (const auto& [off, bytes] : top_writes_) std::memcpy(e.data() + off, bytes.data(), bytes.size());
    return e;
  }
  std::vector<uint8_t> read_through(BlockBackend& b, Waiter& w, uint64_t tag) {
    auto* buf = static_cast<uint8_t*>(std::aligned_alloc(4096, kSize));
    EXPECT_TRUE(b.submit(BlockBackend::Op::kRead, 0, buf, kSize, tag).ok());
    EXPECT_EQ(w.wait(tag), static_cast<int64_t>(kSize));
    std::vector<uint8_t> out(buf, buf + kSize);
    std::free(buf);
    return out;
  }

  std::string dir_;
  std::vector<uint8_t> base_, mid_data_;
  std::vector<std::pair<uint64_t, std::vector<uint8_t>>> top_writes_;
};

TEST_F(BlockChainBackend, ReadsResolveThroughEveryLayer) {
  Waiter w;
  auto b = BlockBackend::open(dir_ + "/top.raw", 8, w.callback());
  ASSERT_TRUE(b.ok()) << b.error().message;
  EXPECT_EQ((*b)->layer_paths(), (std::vector<std::string>{dir_ + "/base.raw", dir_ + "/mid.raw", dir_ + "/top.raw"}));
  EXPECT_EQ(read_through(**b, w, 1), expected());
}

TEST_F(BlockChainBackend, PartialWritesCopyUpAndOnlyTheTopChanges) {
  Waiter w;
  auto b = BlockBackend::open(dir_ + "/top.raw", 8, w.callback());
  ASSERT_TRUE(b.ok()) << b.error().message;
  // 512 bytes into [4K, 8K) over the base, and into [68K, 72K) over mid; both the same
  // granule pair twice at once (concurrent partial writes to one fresh granule).
  std::vector<uint8_t> a(512, 0xa1), c(512, 0xc3), d(512, 0xd4), e(1024, 0xe5);
  ASSERT_TRUE((*b)->submit(BlockBackend::Op::kWrite, 5120, a.data(), 512, 10).ok());
  ASSERT_TRUE((*b)->submit(BlockBackend::Op::kWrite, 6144, c.data(), 512, 11).ok());
  ASSERT_TRUE((*b)->submit(BlockBackend::Op::kWrite, 70144, d.data(), 512, 12).ok());
  ASSERT_TRUE((*b)->submit(BlockBackend::Op::kWrite, 1024 * 1024 - 1024, e.data(), 1024, 13).ok());
  for (uint64_t t : {10, 11, 12, 13}) EXPECT_GT(w.wait(t), 0) << t;
  top_writes_ = {{5120, a}, {6144, c}, {70144, d}, {1024 * 1024 - 1024, e}};
  EXPECT_EQ(read_through(**b, w, 20), expected());
  EXPECT_GE((*b)->copy_ups(), 3u);
  b->reset();
  // The lower layers are untouched; the top holds whole granules, nothing more.
  EXPECT_EQ(read_all(dir_ + "/base.raw"), base_);
  auto top = extents(dir_ + "/top.raw");
  uint64_t held = 0;
  for (auto [o, l] : top) held += l;
  EXPECT_EQ(held, 3u * 4096) << "three granules written";
  // Reopened (a new map from the file's extents): the same bytes.
  Waiter w2;
  auto again = BlockBackend::open(dir_ + "/top.raw", 8, w2.callback());
  ASSERT_TRUE(again.ok()) << again.error().message;
  EXPECT_EQ(read_through(**again, w2, 30), expected());
}

TEST_F(BlockChainBackend, ARawImageStaysOneLayer) {
  Waiter w;
  auto b = BlockBackend::open(dir_ + "/base.raw", 8, w.callback());
  ASSERT_TRUE(b.ok()) << b.error().message;
  EXPECT_EQ((*b)->layer_paths().size(), 1u);
  std::vector<uint8_t> a(512, 0x5a);
  ASSERT_TRUE((*b)->submit(BlockBackend::Op::kWrite, 512, a.data(), 512, 1).ok());
  EXPECT_EQ(w.wait(1), 512);
  EXPECT_EQ((*b)->copy_ups(), 0u);
}

TEST_F(BlockChainBackend, BadChainsAreRefusedWithOneLine) {
  auto refused = [&](const std::string& top, const std::string& needle) {
    Waiter w;
    auto b = BlockBackend::open(top, 8, w.callback());
    ASSERT_FALSE(b.ok()) << top << " opened";
    EXPECT_NE(b.error().message.find(needle), std::string::npos) << b.error().message;
    EXPECT_EQ(b.error().message.find('\n'), std::string::npos);
  };
  make_delta(dir_ + "/orphan.raw", "gone.raw");
  refused(dir_ + "/orphan.raw", "missing parent");
  make_delta(dir_ + "/x.raw", "y.raw");
  make_delta(dir_ + "/y.raw", "x.raw");
  refused(dir_ + "/x.raw", "chain loops");
  make_delta(dir_ + "/short.raw", "base.raw");
  ASSERT_EQ(::truncate((dir_ + "/short.raw").c_str(), kSize - 512), 0);
  refused(dir_ + "/short.raw", "shorter than declared");
  std::ofstream(dir_ + "/top.raw.kvmig-delta") << "{not json";
  refused(dir_ + "/top.raw", "not a kvmig delta descriptor");
  // Well-formed JSON with a field of the wrong type: refused, not an exception.
  std::ofstream(dir_ + "/top.raw.kvmig-delta", std::ios::trunc)
      << R"({"kvmig_delta":"1","parent":"mid.raw","size":)" << kSize << "}";
  refused(dir_ + "/top.raw", "not a kvmig delta descriptor");
  // A parent of another size.
  write_file(dir_ + "/small.raw", std::vector<uint8_t>(kSize / 2));
  make_delta(dir_ + "/big.raw", "small.raw");
  refused(dir_ + "/big.raw", "the disk's size");
}

// The migration source reads the top's blocks and fills their holes from below
// (helper::ChainHoleFiller): what it sends must be what the guest reads there, never zeros
// where the chain reads the parent's bytes.
TEST_F(BlockChainBackend, TheSourcesHoleFillerYieldsWhatTheChainReads) {
  Waiter w;
  auto b = BlockBackend::open(dir_ + "/top.raw", 8, w.callback());
  ASSERT_TRUE(b.ok()) << b.error().message;
  std::vector<uint8_t> a(4096, 0x3c);
  ASSERT_TRUE((*b)->submit(BlockBackend::Op::kWrite, 8192, a.data(), 4096, 1).ok());
  ASSERT_TRUE((*b)->submit(BlockBackend::Op::kWrite, 65536 + 12288, a.data(), 4096, 2).ok());
  EXPECT_EQ(w.wait(1), 4096);
  EXPECT_EQ(w.wait(2), 4096);
  top_writes_ = {{8192, a}, {65536 + 12288, a}};
  std::vector<uint8_t> want = expected();
  int top = ::open((dir_ + "/top.raw").c_str(), O_RDONLY);
  ASSERT_GE(top, 0);
  auto filler = helper::ChainHoleFiller::open(top, {dir_ + "/base.raw", dir_ + "/mid.raw"}, kSize);
  ASSERT_TRUE(filler.ok()) << filler.error().message;
  // Two 64 KiB tracking blocks, each partly a hole of the top: over the base, over mid.
  std::vector<uint8_t> buf(128 * 1024);
  ASSERT_EQ(::pread(top, buf.data(), buf.size(), 0), static_cast<ssize_t>(buf.size()));
  EXPECT_NE(std::vector<uint8_t>(buf.begin(), buf.end()), std::vector<uint8_t>(want.begin(), want.begin() + buf.size()))
      << "the top alone reads zeros in its holes";
  ASSERT_TRUE((*filler)->fill(0, buf.data(), buf.size()).ok());
  EXPECT_EQ(std::vector<uint8_t>(buf.begin(), buf.end()), std::vector<uint8_t>(want.begin(), want.begin() + buf.size()));
  ::close(top);
}

}  // namespace
}  // namespace kvmig::kvm
