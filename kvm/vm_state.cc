#include "kvm/kvm_uapi.h"  // first: fixes <linux/kvm.h> layouts for C++
#include "kvm/vm_state.h"

#include <cstring>

#include "kvm/ioctl.h"

namespace kvmig::kvm {
namespace {

template <class T>
StateSection section_of(const char* id, uint32_t version, const T* values, size_t count) {
  StateSection s{id, version, {}};
  s.data.resize(sizeof(T) * count);
  std::memcpy(s.data.data(), values, s.data.size());
  return s;
}

// Checks id, version and exact length before anything is copied out of the section.
template <class T>
Result<void> unpack(const StateSection& s, const char* id, uint32_t version, T* values,
                    size_t count) {
  if (s.id != id) return Error{std::string("expected section '") + id + "', got '" + s.id + "'"};
  if (s.version != version)
    return Error{"section '" + s.id + "': unsupported version " + std::to_string(s.version)};
  if (s.data.size() != sizeof(T) * count)
    return Error{"section '" + s.id + "': " + std::to_string(s.data.size()) +
                 " bytes, expected " + std::to_string(sizeof(T) * count)};
  std::memcpy(values, s.data.data(), s.data.size());
  return ok();
}

}  // namespace

Result<StateSection> save_clock(int vm_fd) {
  kvm_clock_data clock{};
  KVMIG_TRY(kvm_ioctl(vm_fd, KVM_GET_CLOCK, "KVM_GET_CLOCK", &clock));
  return section_of("clock", kClockSectionVersion, &clock, 1);
}

Result<void> restore_clock(int vm_fd, const StateSection& section) {
  kvm_clock_data clock{};
  KVMIG_TRY(unpack(section, "clock", kClockSectionVersion, &clock, 1));
  // Only the value: KVM_CLOCK_REALTIME would advance the clock by the wall time spent saved
  // and restoring, while the guest's TSC was restored unadvanced; the two must agree.
  kvm_clock_data set{};
  set.clock = clock.clock;
  KVMIG_TRY(kvm_ioctl(vm_fd, KVM_SET_CLOCK, "KVM_SET_CLOCK", &set));
  return ok();
}

Result<StateSection> save_irqchip(int vm_fd) {
  kvm_irqchip chips[3]{};
  static const char* const names[3] = {"KVM_GET_IRQCHIP (PIC master)",
                                       "KVM_GET_IRQCHIP (PIC slave)", "KVM_GET_IRQCHIP (IOAPIC)"};
  for (uint32_t i = 0; i < 3; ++i) {
    chips[i].chip_id = i;
    KVMIG_TRY(kvm_ioctl(vm_fd, KVM_GET_IRQCHIP, names[i], &chips[i]));
  }
  return section_of("irqchip", kIrqchipSectionVersion, chips, 3);
}

Result<void> restore_irqchip(int vm_fd, const StateSection& section) {
  kvm_irqchip chips[3]{};
  KVMIG_TRY(unpack(section, "irqchip", kIrqchipSectionVersion, chips, 3));
  static const char* const names[3] = {"KVM_SET_IRQCHIP (PIC master)",
                                       "KVM_SET_IRQCHIP (PIC slave)", "KVM_SET_IRQCHIP (IOAPIC)"};
  for (uint32_t i = 0; i < 3; ++i) {
    if (chips[i].chip_id != i)
      return Error{"section 'irqchip': entry " + std::to_string(i) + " has chip_id " +
                   std::to_string(chips[i].chip_id)};
  }
  for (uint32_t i = 0; i < 3; ++i) KVMIG_TRY(kvm_ioctl(vm_fd, KVM_SET_IRQCHIP, names[i], &chips[i]));
  return ok();
}

Result<StateSection> save_pit(int vm_fd) {
  kvm_pit_state2 pit{};
  KVMIG_TRY(kvm_ioctl(vm_fd, KVM_GET_PIT2, "KVM_GET_PIT2", &pit));
  return section_of("pit", kPitSectionVersion, &pit, 1);
}

Result<void> restore_pit(int vm_fd, const StateSection& section) {
  kvm_pit_state2 pit{};
  KVMIG_TRY(unpack(section, "pit", kPitSectionVersion, &pit, 1));
  KVMIG_TRY(kvm_ioctl(vm_fd, KVM_SET_PIT2, "KVM_SET_PIT2", &pit));
  return ok();
}

}  // namespace kvmig::kvm
