// VM-wide KVM state outside the vCPUs: the kvmclock base, the in-kernel irqchip and the PIT.
//
// Section layouts (each the kernel struct as KVM returns it, little-endian, exact length):
//   "clock"   v1  struct kvm_clock_data (the kvmclock value; flags/realtime kept for tools)
//   "irqchip" v1  3 x struct kvm_irqchip: chip_id 0 (PIC master), 1 (PIC slave), 2 (IOAPIC)
//   "pit"     v1  struct kvm_pit_state2 (channels, flags)
#pragma once

#include <cstdint>
#include <string>

#include "base/result.h"
#include "kvm/migratable.h"

namespace kvmig::kvm {

inline constexpr uint32_t kClockSectionVersion = 1;
inline constexpr uint32_t kIrqchipSectionVersion = 1;
inline constexpr uint32_t kPitSectionVersion = 1;

Result<StateSection> save_clock(int vm_fd);
// Sets kvmclock to the saved value: the guest sees no time pass while it was saved, which
// matches its TSC, also restored to the saved value.
Result<void> restore_clock(int vm_fd, const StateSection& section);

Result<StateSection> save_irqchip(int vm_fd);
Result<void> restore_irqchip(int vm_fd, const StateSection& section);

Result<StateSection> save_pit(int vm_fd);
Result<void> restore_pit(int vm_fd, const StateSection& section);

// The three as Snapshottable parts of a VM (the fd stays owned by the VM).
class VmClockState final : public Snapshottable {
 public:
  explicit VmClockState(int vm_fd) : fd_(vm_fd) {}
  std::string snapshot_id() const override { return "clock"; }
  Result<StateSection> save() override { return save_clock(fd_); }
  Result<void> restore(const StateSection& s) override { return restore_clock(fd_, s); }

 private:
  int fd_;
};

class IrqchipState final : public Snapshottable {
 public:
  explicit IrqchipState(int vm_fd) : fd_(vm_fd) {}
  std::string snapshot_id() const override { return "irqchip"; }
  Result<StateSection> save() override { return save_irqchip(fd_); }
  Result<void> restore(const StateSection& s) override { return restore_irqchip(fd_, s); }

 private:
  int fd_;
};

class PitState final : public Snapshottable {
 public:
  explicit PitState(int vm_fd) : fd_(vm_fd) {}
  std::string snapshot_id() const override { return "pit"; }
  Result<StateSection> save() override { return save_pit(fd_); }
  Result<void> restore(const StateSection& s) override { return restore_pit(fd_, s); }

 private:
  int fd_;
};

}  // namespace kvmig::kvm
