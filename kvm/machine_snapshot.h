// The whole machine's state, composed of its parts' sections (DESIGN.md "State format").
//
// A state file holds, in this order:
//   "machine"        v1  uint64 memory, uint32 vcpus, uint32 flags (bit 0: hugepages)
//   "memory.layout"  and "memory.run" sections (memory_image.h)
//   one section per Snapshottable part: "vcpu.0".."vcpu.N-1", "irqchip", "pit",
//   "dev.blk.0".. (one per disk, kvm/block_device.h), "clock"
//   "end"
// The debug console and exit port hold no guest-visible state, so they have no section; a
// device that gains state must become a part here, or its state is lost. A disk's contents
// are not in the state, only its ring position: restore needs the same disks attached.
//
// Restore reads every part's section first and applies them only at the end, in a fixed
// order: vCPUs, irqchip, PIT, disks, then the clock, right before the machine resumes.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/result.h"
#include "kvm/machine.h"
#include "kvm/memory_image.h"
#include "kvm/migratable.h"
#include "kvm/state_file.h"

namespace kvmig::kvm {

inline constexpr uint32_t kMachineSectionVersion = 1;
inline constexpr char kMachineSectionId[] = "machine";

StateSection machine_config_section(const MachineConfig& config);
// The saved shape of the machine: memory size, vCPU count, huge pages. Checked for sanity
// (sizes a host could hold) before anything is built from it.
Result<MachineConfig> parse_machine_config(const StateSection& section);

// The Snapshottable parts of a machine, in restore order. Holds non-owning fds: the
// machine must outlive it.
class MachineSnapshot {
 public:
  // Needs no vCPU ioctl once probed() says so; before that the machine must be paused or
  // not yet started: the one-time MSR probe runs on vCPU 0 and would wait for it to leave
  // KVM_RUN.
  static Result<MachineSnapshot> of(Machine& machine);
  // Whether of() can run on this machine without touching a vCPU.
  static bool probed(Machine& machine);

  // Every part's section; the machine must be paused.
  Result<std::vector<StateSection>> save_parts();
  // Checks that SECTIONS hold exactly the parts this machine has (no unknown, no missing,
  // no duplicate), then restores them in order. The machine must not be running.
  Result<void> restore_parts(const std::vector<StateSection>& sections);

  std::vector<std::string> part_ids() const;

 private:
  std::vector<std::unique_ptr<Snapshottable>> parts_;
};

struct SnapshotStats {
  uint64_t guest_bytes = 0;  // guest RAM size
  uint64_t data_bytes = 0;   // page bytes written/read (zero pages skipped)
  uint64_t file_bytes = 0;   // size of the state file (save only)
  double seconds = 0;
};

// Saves a paused machine into PATH (atomically: PATH appears only when complete).
Result<SnapshotStats> save_machine(Machine& machine, const std::string& path, bool sync = false);

// Opens PATH and reads its "machine" section: what create() needs to build the machine.
Result<MachineConfig> read_machine_config(StateFileReader& reader);
// Reads the rest of the file into MACHINE, freshly created from that config and not yet
// started (its memory must still be all zero).
Result<SnapshotStats> restore_machine(StateFileReader& reader, Machine& machine);

}  // namespace kvmig::kvm
