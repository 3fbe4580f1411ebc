// The interfaces through which helper/ sees a VM (after Cloud Hypervisor's split, made
// strict): every method is pure virtual, so a part that forgets its state fails to compile
// instead of migrating silently without it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/result.h"

namespace kvmig::kvm {

// One part's saved state. Each part versions its own layout (DESIGN.md "State format"), so
// hosts running different kvmig versions can still migrate to each other.
struct StateSection {
  std::string id;        // stable, e.g. "vcpu.0", "clock", "memory.layout", "dev.console"
  uint32_t version = 0;  // of this section's layout, not of kvmig
  std::vector<uint8_t> data;
};

class Pausable {
 public:
  virtual ~Pausable() = default;
  virtual Result<void> pause() = 0;
  virtual Result<void> resume() = 0;
};

class Snapshottable {
 public:
  virtual ~Snapshottable() = default;
  virtual std::string snapshot_id() const = 0;
  virtual Result<StateSection> save() = 0;
  virtual Result<void> restore(const StateSection& section) = 0;
};

// Dirty pages of one memory slot, one bit per 4 KiB page from gpa.
struct DirtyBitmap {
  uint32_t slot = 0;
  uint64_t gpa = 0;
  uint64_t pages = 0;
  std::vector<uint64_t> bits;  // (pages + 63) / 64 words
};

class DirtyTracked {
 public:
  virtual ~DirtyTracked() = default;
  // Starts write tracking. With manual protect + initially-set, every page starts dirty and
  // nothing is write-protected until rearm() says so, so starting does not stall the guest.
  virtual Result<void> start_tracking() = 0;
  virtual Result<void> stop_tracking() = 0;
  // Pages written since they were last re-armed: KVM's log merged with the VMM's own
  // bitmap of writes its devices made into guest memory.
  virtual Result<std::vector<DirtyBitmap>> harvest() = 0;
  // Write-protects [gpa, gpa+len) again so later writes show up in the next harvest.
  // Called just before those pages are sent.
  virtual Result<void> rearm(uint64_t gpa, uint64_t len) = 0;
};

}  // namespace kvmig::kvm
