#include <gtest/gtest.h>

#include <cstring>

#include "kvm/boot_layout.h"
#include "kvm/guest_memory.h"
#include "kvm/multiboot_info.h"

namespace kvmig::kvm {
namespace {

uint32_t get32(const std::vector<uint8_t>& b, size_t off) {
  uint32_t v;
  std::memcpy(&v, b.data() + off, 4);
  return v;
}

TEST(TscKhz, AppendedWhenAbsent) {
  EXPECT_EQ(with_tsc_khz("", 2500000), "tsc_khz=2500000");
  EXPECT_EQ(with_tsc_khz("ws=64M", 2500000), "ws=64M tsc_khz=2500000");
  EXPECT_EQ(with_tsc_khz("ws=64M ", 1000), "ws=64M tsc_khz=1000");
}

TEST(TscKhz, KeptWhenPresentOrUnknown) {
  EXPECT_EQ(with_tsc_khz("tsc_khz=5 ws=1G", 2500000), "tsc_khz=5 ws=1G");
  EXPECT_EQ(with_tsc_khz("ws=1G tsc_khz=5", 2500000), "ws=1G tsc_khz=5");
  EXPECT_EQ(with_tsc_khz("ws=1G", 0), "ws=1G");
  // Only a whole key counts, not a suffix of another one.
  EXPECT_EQ(with_tsc_khz("my_tsc_khz=5", 7), "my_tsc_khz=5 tsc_khz=7");
}

TEST(E820, SmallGuestHasNoHighRam) {
  auto map = e820_map(64 * kMiB);
  ASSERT_EQ(map.size(), 4u);
  EXPECT_EQ(map[0].addr, 0u);
  EXPECT_EQ(map[0].len, kEbdaStart);
  EXPECT_EQ(map[0].type, 1u);
  EXPECT_EQ(map[1].type, 2u);  // EBDA + boot area reserved
  EXPECT_EQ(map[2].addr, 1 * kMiB);
  EXPECT_EQ(map[2].addr + map[2].len, 64 * kMiB);
  EXPECT_EQ(map[3].type, 2u);  // KVM's TSS pages in the hole
}

TEST(E820, BigGuestContinuesAboveFourGiB) {
  auto map = e820_map(8 * kGiB);
  uint64_t ram = 0;
  for (const auto& e : map) {
    if (e.type == 1) ram += e.len;
    if (e.type == 1) EXPECT_TRUE(e.addr + e.len <= 3 * kGiB || e.addr >= 4 * kGiB) << "RAM in the hole";
  }
  EXPECT_EQ(ram, 8 * kGiB - (kBootAreaEnd - kEbdaStart));
  EXPECT_EQ(map.back().addr, 4 * kGiB);
  EXPECT_EQ(map.back().len, 5 * kGiB);
}

TEST(MultibootInfo, FieldsPointInsideTheBlock) {
  const uint64_t base = kMultibootInfo;
  auto info = build_multiboot_info(base, kMultibootInfoEnd, 1 * kGiB, "ws=64M passes=1");
  ASSERT_TRUE(info.ok());
  const auto& b = *info;
  uint32_t flags = get32(b, 0);
  EXPECT_EQ(flags & 0x245, 0x245u);  // mem, cmdline, mmap, loader name
  EXPECT_EQ(get32(b, 4), 639u);
  EXPECT_EQ(get32(b, 8), (1 * kGiB - 1 * kMiB) / 1024);
  uint32_t cmdline = get32(b, 16);
  ASSERT_GE(cmdline, base);
  ASSERT_LT(cmdline - base, b.size());
  EXPECT_STREQ(reinterpret_cast<const char*>(b.data() + (cmdline - base)), "ws=64M passes=1");
  uint32_t mmap_len = get32(b, 44), mmap_addr = get32(b, 48);
  EXPECT_EQ(mmap_len, e820_map(1 * kGiB).size() * 24);
  ASSERT_LE(mmap_addr - base + mmap_len, b.size());
  EXPECT_EQ(get32(b, mmap_addr - base), 20u);  // entry size field, as Multiboot defines it
  EXPECT_STREQ(reinterpret_cast<const char*>(b.data() + (get32(b, 64) - base)), "kvmig");
}

TEST(MultibootInfo, TooLongCommandLineIsAnError) {
  std::string huge(kMultibootInfoEnd - kMultibootInfo, 'x');
  auto info = build_multiboot_info(kMultibootInfo, kMultibootInfoEnd, 1 * kGiB, huge);
  ASSERT_FALSE(info.ok());
  EXPECT_NE(info.error().message.find("too long"), std::string::npos);
}

}  // namespace
}  // namespace kvmig::kvm
