// CPUID for a vCPU: KVM's supported set, made true for this vCPU (its APIC id, the vCPU
// count, the hypervisor bit), so the guest's SMP bring-up finds the LAPIC ids it expects.
#pragma once

#include "kvm/kvm_uapi.h"

#include <cstdint>
#include <vector>

#include "base/result.h"

namespace kvmig::kvm {

// Pure: returns `supported` adjusted for vCPU `index` of `count` (APIC id == index).
std::vector<kvm_cpuid_entry2> cpuid_for_vcpu(const std::vector<kvm_cpuid_entry2>& supported, uint32_t index,
                                             uint32_t count);

// KVM_SET_CPUID2 on `vcpu_fd`.
Result<void> set_cpuid(int vcpu_fd, const std::vector<kvm_cpuid_entry2>& entries);

}  // namespace kvmig::kvm
