#include "kvm/cpuid.h"

#include "kvm/ioctl.h"

KVMIG_CHECK_KVM_UAPI_LAYOUT();

namespace kvmig::kvm {

namespace {
constexpr uint32_t kHypervisorBit = 1u << 31;  // CPUID.1:ECX, "running under a hypervisor"
constexpr uint32_t kHtBit = 1u << 28;          // CPUID.1:EDX, EBX[23:16] is valid
}  // namespace

std::vector<kvm_cpuid_entry2> cpuid_for_vcpu(const std::vector<kvm_cpuid_entry2>& supported, uint32_t index,
                                             uint32_t count) {
  std::vector<kvm_cpuid_entry2> out = supported;
  for (kvm_cpuid_entry2& e : out) {
    switch (e.function) {
      case 1:
        // Initial APIC id in EBX[31:24]; logical processor count in EBX[23:16].
        e.ebx = (e.ebx & 0x0000ffffu) | (index << 24) | ((count & 0xffu) << 16);
        e.ecx |= kHypervisorBit;
        if (count > 1) e.edx |= kHtBit;
        break;
      case 0xb:
      case 0x1f:
        // x2APIC topology: every vCPU is its own core in one package; EDX is the x2APIC id.
        // Level 0 (SMT): 1 thread per core, shift 0; level 1 (core): `count` cores.
        if (e.index == 0) {
          e.eax = 0;
          e.ebx = 1;
          e.ecx = (1u << 8) | 0;
        } else if (e.index == 1) {
          uint32_t shift = 0;
          while ((1u << shift) < count) ++shift;
          e.eax = shift;
          e.ebx = count;
          e.ecx = (2u << 8) | 1;
        } else {
          e.eax = 0;
          e.ebx = 0;
          e.ecx = e.index;
        }
        e.edx = index;
        break;
      case 4:
        // Cores per package - 1 in EAX[31:26], matching the topology above.
        e.eax = (e.eax & 0x03ffffffu) | (((count - 1) & 0x3fu) << 26);
        break;
      default:
        break;
    }
  }
  return out;
}

Result<void> set_cpuid(int vcpu_fd, const std::vector<kvm_cpuid_entry2>& entries) {
  std::vector<uint8_t> buf(sizeof(kvm_cpuid2) + entries.size() * sizeof(kvm_cpuid_entry2));
  auto* c = reinterpret_cast<kvm_cpuid2*>(buf.data());
  c->nent = static_cast<uint32_t>(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) c->entries[i] = entries[i];
  KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_SET_CPUID2, "KVM_SET_CPUID2", c));
  return ok();
}

}  // namespace kvmig::kvm
