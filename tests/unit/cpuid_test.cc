#include <gtest/gtest.h>

#include "kvm/cpuid.h"

namespace kvmig::kvm {
namespace {

kvm_cpuid_entry2 leaf(uint32_t function, uint32_t index, uint32_t ebx = 0) {
  kvm_cpuid_entry2 e{};
  e.function = function;
  e.index = index;
  e.ebx = ebx;
  return e;
}

TEST(Cpuid, ApicIdsAndCountPerVcpu) {
  std::vector<kvm_cpuid_entry2> supported = {leaf(1, 0, 0xff00abcd), leaf(0xb, 0), leaf(0xb, 1)};
  for (uint32_t i = 0; i < 3; ++i) {
    auto out = cpuid_for_vcpu(supported, i, 3);
    EXPECT_EQ(out[0].ebx >> 24, i);
    EXPECT_EQ((out[0].ebx >> 16) & 0xff, 3u);
    EXPECT_EQ(out[0].ebx & 0xffff, 0xabcdu);  // other fields kept
    EXPECT_TRUE(out[0].ecx & (1u << 31));     // hypervisor present
    EXPECT_EQ(out[1].edx, i);                 // x2APIC id, every sub-leaf
    EXPECT_EQ(out[2].edx, i);
    EXPECT_EQ(out[2].ebx, 3u);                // 3 logical processors at core level
  }
  EXPECT_EQ(supported[0].ebx, 0xff00abcdu);  // input untouched
}

}  // namespace
}  // namespace kvmig::kvm
