#include <gtest/gtest.h>

#include "kvm/guest_memory.h"

namespace kvmig::kvm {
namespace {

TEST(MemoryLayout, BelowThreeGiBIsOneSlot) {
  auto plan = plan_memory_layout(1 * kGiB);
  ASSERT_EQ(plan.size(), 1u);
  EXPECT_EQ(plan[0].slot, 0u);
  EXPECT_EQ(plan[0].gpa, 0u);
  EXPECT_EQ(plan[0].size, 1 * kGiB);
  EXPECT_EQ(plan_memory_layout(3 * kGiB).size(), 1u);
}

TEST(MemoryLayout, AboveThreeGiBContinuesAtFour) {
  auto plan = plan_memory_layout(8 * kGiB);
  ASSERT_EQ(plan.size(), 2u);
  EXPECT_EQ(plan[0].size, 3 * kGiB);
  EXPECT_EQ(plan[1].slot, 1u);
  EXPECT_EQ(plan[1].gpa, 4 * kGiB);
  EXPECT_EQ(plan[1].size, 5 * kGiB);
}

const char kMeminfo[] =
    "MemTotal:       24684084 kB\n"
    "MemAvailable:    2097152 kB\n"
    "HugePages_Total:      10\n"
    "HugePages_Free:       10\n"
    "HugePages_Rsvd:        2\n"
    "Hugepagesize:       2048 kB\n";

TEST(HostMemory, RefusesMoreThanAvailable) {
  EXPECT_TRUE(check_host_memory(1 * kGiB, false, kMeminfo).ok());
  auto r = check_host_memory(3 * kGiB, false, kMeminfo);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("exceeds the host's available memory (2048 MiB"), std::string::npos)
      << r.error().message;
}

TEST(HostMemory, HugePagesMustBeReservedAndAligned) {
  EXPECT_TRUE(check_host_memory(16 * kMiB, true, kMeminfo).ok());  // 8 pages, 8 usable
  auto r = check_host_memory(18 * kMiB, true, kMeminfo);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("need 9 free 2 MiB huge pages"), std::string::npos) << r.error().message;
  EXPECT_NE(r.error().message.find("nr_hugepages"), std::string::npos);
  EXPECT_FALSE(check_host_memory(5 * kMiB, true, kMeminfo).ok());  // not a 2 MiB multiple
}

TEST(HostMemory, RejectsTinyAndUnaligned) {
  EXPECT_FALSE(check_host_memory(1 * kMiB, false, kMeminfo).ok());
  EXPECT_FALSE(check_host_memory(64 * kMiB + 1, false, kMeminfo).ok());
}

TEST(ParseSize, SuffixesAndErrors) {
  EXPECT_EQ(*parse_size("64M"), 64 * kMiB);
  EXPECT_EQ(*parse_size("1G"), 1 * kGiB);
  EXPECT_EQ(*parse_size("512K"), 512 * kKiB);
  EXPECT_EQ(*parse_size("4096"), 4096u);
  EXPECT_FALSE(parse_size("").ok());
  EXPECT_FALSE(parse_size("G").ok());
  EXPECT_FALSE(parse_size("12X").ok());
  EXPECT_FALSE(parse_size("-1G").ok());
  EXPECT_FALSE(parse_size("99999999999999999999G").ok());
}

}  // namespace
}  // namespace kvmig::kvm
