// Guest memory images: zero pages skipped, contents restored exactly, and a file that points
// outside guest memory never gets to write there.
#include "kvm/memory_image.h"

#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <random>
#include <string>

#include "test_util.h"

namespace kvmig::kvm {
namespace {

struct Mapping {
  explicit Mapping(size_t n) : size(n) {
    void* p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ptr = p == MAP_FAILED ? nullptr : static_cast<uint8_t*>(p);
  }
  ~Mapping() {
    if (ptr) munmap(ptr, size);
  }
  uint8_t* ptr;
  size_t size;
};

class MemoryImageTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test::make_temp_dir("kvmig-memory-image-test");
    ASSERT_FALSE(dir_.empty());
    path_ = dir_ + "/state";
  }
  void TearDown() override { std::system(("rm -rf " + dir_).c_str()); }

  // Saves RANGES, then restores into DEST; returns the first error or "".
  std::string restore_into(std::span<const MemoryRange> dest, MemoryImageStats* stats) {
    auto r = StateFileReader::open(path_);
    if (!r) return r.error().message;
    for (;;) {
      auto info = r->next();
      if (!info) return info.error().message;
      if (info->id == kEndSectionId) return "";
      if (info->id == kMemoryLayoutId) {
        auto s = r->read_section();
        if (!s) return s.error().message;
        auto c = check_memory_layout(*s, dest);
        if (!c) return c.error().message;
        continue;
      }
      auto run = restore_memory_run(*r, dest, stats);
      if (!run) return run.error().message;
    }
  }

  std::string dir_, path_;
};

TEST(IsZeroPage, FindsANonZeroByteAnywhere) {
  alignas(64) uint8_t page[kPageSize] = {};
  EXPECT_TRUE(is_zero_page(page));
  for (size_t i = 0; i < kPageSize; i += 509) {
    page[i] = 1;
    EXPECT_FALSE(is_zero_page(page)) << i;
    page[i] = 0;
  }
  page[kPageSize - 1] = 0x80;
  EXPECT_FALSE(is_zero_page(page));
}

TEST_F(MemoryImageTest, RoundTripSkipsZeroPages) {
  const size_t size = 64 << 20;
  Mapping src_lo(size), src_hi(size / 2);
  ASSERT_TRUE(src_lo.ptr && src_hi.ptr);
  std::mt19937_64 rng(42);
  // Scattered pages, a dense block, the first and last pages, and far gaps between them.
  for (int i = 0; i < 300; ++i) {
    size_t page = rng() % (size / kPageSize);
    uint64_t v = rng() | 1;
    std::memcpy(src_lo.ptr + page * kPageSize + (v % 4000), &v, sizeof(v));
  }
  std::memset(src_lo.ptr + (8 << 20), 0xab, 1 << 20);
  src_hi.ptr[0] = 1;
  src_hi.ptr[src_hi.size - 1] = 2;

  MemoryRange ranges[2] = {{0, 0, size, src_lo.ptr}, {1, 4ull << 30, size / 2, src_hi.ptr}};
  {
    auto w = StateFileWriter::create(path_);
    ASSERT_TRUE(w.ok());
    auto stats = save_memory(*w, ranges);
    ASSERT_TRUE(stats.ok()) << stats.error().message;
    EXPECT_EQ(stats->guest_bytes, size + size / 2);
    // Far fewer bytes than the guest: only non-zero pages and short gaps are written.
    EXPECT_LT(stats->data_bytes, 16u << 20);
    EXPECT_GE(stats->data_bytes, (1u << 20) + 2 * kPageSize);
    ASSERT_TRUE(w->finish().ok());
  }
  Mapping dst_lo(size), dst_hi(size / 2);
  MemoryRange dest[2] = {{0, 0, size, dst_lo.ptr}, {1, 4ull << 30, size / 2, dst_hi.ptr}};
  MemoryImageStats stats;
  EXPECT_EQ(restore_into(dest, &stats), "");
  EXPECT_EQ(std::memcmp(src_lo.ptr, dst_lo.ptr, size), 0);
  EXPECT_EQ(std::memcmp(src_hi.ptr, dst_hi.ptr, size / 2), 0);
  EXPECT_GT(stats.runs, 2u);
}

TEST_F(MemoryImageTest, LayoutMismatchIsRefused) {
  Mapping src(1 << 20);
  ASSERT_TRUE(src.ptr);
  src.ptr[100] = 1;
  MemoryRange ranges[1] = {{0, 0, 1 << 20, src.ptr}};
  {
    auto w = StateFileWriter::create(path_);
    ASSERT_TRUE(save_memory(*w, ranges).ok());
    ASSERT_TRUE(w->finish().ok());
  }
  Mapping dst(2 << 20);
  MemoryRange bigger[1] = {{0, 0, 2 << 20, dst.ptr}};
  std::string err = restore_into(bigger, nullptr);
  EXPECT_NE(err.find("memory layout: saved region slot 0 at 0 size 0x100000 differs"),
            std::string::npos)
      << err;
}

// A run whose gpa/len reach outside guest memory must be refused before any byte is copied.
TEST_F(MemoryImageTest, RunOutsideGuestMemoryIsRefusedWithoutWriting) {
  Mapping guest(2 << 20);
  ASSERT_TRUE(guest.ptr);
  MemoryRange dest[1] = {{0, 0x100000, 1 << 20, guest.ptr}};
  std::vector<uint8_t> page(kPageSize, 0xee);
  struct Case {
    uint64_t gpa;
    size_t pages;
  } cases[] = {
      {0x100000 + (1 << 20) - kPageSize, 2},  // crosses the end
      {0xff000, 1},                           // just below
      {0x200000, 1},                          // just past
      {~0ull - kPageSize + 1, 1},             // gpa + len wraps around
      {0x100800, 1},                          // not page aligned
  };
  for (const Case& c : cases) {
    {
      auto w = StateFileWriter::create(path_);
      ASSERT_TRUE(w.ok());
      std::vector<iovec> parts;
      uint64_t gpa = c.gpa;
      parts.push_back({&gpa, sizeof(gpa)});
      for (size_t i = 0; i < c.pages; ++i) parts.push_back({page.data(), page.size()});
      ASSERT_TRUE(w->write_section(kMemoryRunId, kMemoryRunVersion, parts).ok());
      ASSERT_TRUE(w->finish().ok());
    }
    std::string err = restore_into(dest, nullptr);
    EXPECT_NE(err.find("not inside guest memory"), std::string::npos) << c.gpa << ": " << err;
    for (size_t i = 0; i < guest.size; ++i) ASSERT_EQ(guest.ptr[i], 0) << "byte " << i;
  }
}

TEST_F(MemoryImageTest, RunWithBadLengthIsRefused) {
  Mapping guest(1 << 20);
  MemoryRange dest[1] = {{0, 0, 1 << 20, guest.ptr}};
  {
    auto w = StateFileWriter::create(path_);
    uint64_t gpa = 0;
    uint8_t odd[100] = {};
    iovec parts[2] = {{&gpa, sizeof(gpa)}, {odd, sizeof(odd)}};
    ASSERT_TRUE(w->write_section(kMemoryRunId, kMemoryRunVersion, parts).ok());
    ASSERT_TRUE(w->finish().ok());
  }
  std::string err = restore_into(dest, nullptr);
  EXPECT_NE(err.find("is not 8 + whole pages"), std::string::npos) << err;
}

}  // namespace
}  // namespace kvmig::kvm
