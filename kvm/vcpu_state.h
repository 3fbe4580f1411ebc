// One vCPU's architectural state as a versioned state section ("vcpu.N").
//
// Section "vcpu.N", version 1: a sequence of records, each
//     uint32 tag, uint32 length, `length` bytes
// in the order below. Fixed-size records must have exactly the size of the kernel struct;
// the reader refuses unknown tags, duplicates, missing required records and wrong lengths.
//
//   tag  record        payload                                       required
//   1    regs          struct kvm_regs                               yes
//   2    sregs         struct kvm_sregs      (hosts without SREGS2)  one of 2/3
//   3    sregs2        struct kvm_sregs2     (keeps PAE PDPTRs)      one of 2/3
//   4    fpu           struct kvm_fpu                                yes
//   5    xsave         struct kvm_xsave, 4096 bytes or the size      if the host has XSAVE
//                      KVM_CAP_XSAVE2 gave (AMX makes it larger)
//   6    xcrs          struct kvm_xcrs                               if the host has XCRS
//   7    msrs          n x {uint32 index, uint32 zero, uint64 value} yes
//   8    lapic         struct kvm_lapic_state                        yes
//   9    events        struct kvm_vcpu_events                        yes
//   10   mp_state      struct kvm_mp_state                           yes
//   11   debugregs     struct kvm_debugregs                          yes
//   12   tsc_khz       uint32 guest TSC frequency (0 = unknown)      yes
//
// The MSRs are every MSR KVM lists (KVM_GET_MSR_INDEX_LIST, which includes the MSRs KVM
// emulates) that KVM_GET_MSRS accepts on this vCPU: IA32_TSC, the kvmclock MSRs, SYSCALL MSRs, PAT, ...
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "base/result.h"
#include "kvm/migratable.h"

namespace kvmig::kvm {

inline constexpr uint32_t kVcpuSectionVersion = 1;

// What this host's KVM can save and restore; probed once per VM.
struct VcpuStateCaps {
  bool sregs2 = false;
  uint32_t xsave_size = 0;  // 0: no XSAVE; 4096: KVM_GET_XSAVE; more: KVM_GET_XSAVE2
  bool xcrs = false;
  bool tsc_control = false;  // KVM_SET_TSC_KHZ works, so a guest's TSC rate can move hosts
};

Result<VcpuStateCaps> probe_vcpu_state_caps(int vm_fd);

// The MSRs to save: KVM's index list, kept when KVM_GET_MSRS accepts them on
// VCPU_FD (the lists name MSRs this CPU or this configuration does not have).
Result<std::vector<uint32_t>> migratable_msrs(int kvm_fd, int vcpu_fd);

std::string vcpu_section_id(int index);

// The vCPU must not be running (its thread paused outside KVM_RUN).
Result<StateSection> save_vcpu(int vcpu_fd, int index, const std::vector<uint32_t>& msrs,
                               const VcpuStateCaps& caps);
// Restores into a vCPU that has not run since it was created (or is paused). Every record
// is checked before the first ioctl, so a malformed section changes nothing.
Result<void> restore_vcpu(int vcpu_fd, const StateSection& section, const VcpuStateCaps& caps);

// One vCPU as a Snapshottable part. The fd stays owned by the vCPU object.
class VcpuState final : public Snapshottable {
 public:
  VcpuState(int vcpu_fd, int index, std::vector<uint32_t> msrs, VcpuStateCaps caps)
      : fd_(vcpu_fd), index_(index), msrs_(std::move(msrs)), caps_(caps) {}
  std::string snapshot_id() const override { return vcpu_section_id(index_); }
  Result<StateSection> save() override { return save_vcpu(fd_, index_, msrs_, caps_); }
  Result<void> restore(const StateSection& section) override {
    return restore_vcpu(fd_, section, caps_);
  }

 private:
  int fd_;
  int index_;
  std::vector<uint32_t> msrs_;
  VcpuStateCaps caps_;
};

}  // namespace kvmig::kvm
