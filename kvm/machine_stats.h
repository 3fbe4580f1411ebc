// MachineStats: what a running Machine counts, for `stats` on the control socket and tests.
#pragma once

#include <cstdint>

namespace kvmig::kvm {

struct MachineStats {
  // KVM_RUN exits by kind, all vCPUs together.
  uint64_t exits_io = 0;
  uint64_t exits_mmio = 0;
  uint64_t exits_hlt = 0;
  uint64_t exits_intr = 0;  // KVM_RUN returned EINTR: a kick (pause, stop) or a stray signal
  uint64_t exits_shutdown = 0;
  uint64_t exits_dirty_ring_full = 0;
  uint64_t exits_other = 0;
  uint64_t unknown_io = 0;    // port accesses no device claims
  uint64_t unknown_mmio = 0;  // MMIO accesses no device claims
  uint64_t console_bytes = 0;
  // pause(): from the call until every vCPU is out of KVM_RUN and parked.
  uint64_t pauses = 0;
  double pause_min_us = 0;
  double pause_avg_us = 0;
  double pause_max_us = 0;
  // From MachineConfig::start_time (the `kvmig vm run` start) to the end of create(), and to
  // the guest's first console byte (-1: no byte yet).
  int64_t create_us = 0;
  int64_t first_console_byte_us = -1;
};

}  // namespace kvmig::kvm
