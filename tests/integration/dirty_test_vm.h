// A VM built from raw ioctls for the dirty-tracking tests, so they do not depend on Machine:
// one vCPU in 32-bit protected mode (paging off, flat segments) running a 7-instruction loop
// that writes EAX to every address listed in a table, then leaves through `out 0xf4`.
// The guest writes nothing else (no stack, code and table are only read), so the pages it
// dirties are exactly the ones the test asks for.
#pragma once

#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "base/fd.h"
#include "base/result.h"
#include "kvm/dirty_ring_log.h"
#include "kvm/dirty_tracker.h"

namespace kvmig::kvm::testing {

inline constexpr uint64_t kCodeGpa = 0x1000;
inline constexpr uint64_t kExitEachOffset = 0x100;  // second loop, in the code page
inline constexpr uint64_t kTableGpa = 0x10000;      // up to kMaxWrites 32-bit addresses
inline constexpr uint64_t kMaxWrites = 0x30000 / 4;  // table ends below 0x40000
inline constexpr uint64_t kSlot0Size = 16 << 20;     // slot 0: [0, 16 MiB)
inline constexpr uint64_t kSlot1Gpa = 32 << 20;      // slot 1: [32 MiB, 40 MiB)
inline constexpr uint64_t kSlot1Size = 8 << 20;

class DirtyTestVm {
 public:
  // ring_entries > 0 enables a dirty ring before the vCPU exists (as Machine must).
  // slot1_size: the benchmark uses a 1 GiB slot 1 (the guest reaches up to 4 GiB).
  static Result<std::unique_ptr<DirtyTestVm>> create(uint32_t ring_entries = 0,
                                                     uint64_t slot1_size = kSlot1Size) {
    std::unique_ptr<DirtyTestVm> vm(new DirtyTestVm);
    vm->kvm_ = Fd(::open("/dev/kvm", O_RDWR | O_CLOEXEC));
    if (!vm->kvm_) return Error::from_errno("open /dev/kvm");
    vm->vm_ = Fd(::ioctl(vm->kvm_.get(), KVM_CREATE_VM, 0));
    if (!vm->vm_) return Error::from_errno("KVM_CREATE_VM");
    ::ioctl(vm->vm_.get(), KVM_SET_TSS_ADDR, 0xfffbd000ul);  // VMX wants it; others ignore
    if (ring_entries) {
      KVMIG_ASSIGN(vm->ring_, DirtyRingLog::enable(vm->vm_.get(), ring_entries));
    }
    KVMIG_TRY(vm->add_slot(0, 0, kSlot0Size));
    KVMIG_TRY(vm->add_slot(1, kSlot1Gpa, slot1_size));
    vm->vcpu_ = Fd(::ioctl(vm->vm_.get(), KVM_CREATE_VCPU, 0));
    if (!vm->vcpu_) return Error::from_errno("KVM_CREATE_VCPU");
    int run_size = ::ioctl(vm->kvm_.get(), KVM_GET_VCPU_MMAP_SIZE, 0);
    void* run = ::mmap(nullptr, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vm->vcpu_.get(), 0);
    if (run == MAP_FAILED) return Error::from_errno("mmap kvm_run");
    vm->run_ = static_cast<kvm_run*>(run);
    vm->run_size_ = run_size;
    if (vm->ring_) KVMIG_TRY(vm->ring_->attach_vcpu(vm->vcpu_.get()));
    KVMIG_TRY(vm->setup_cpu());
    return vm;
  }

  ~DirtyTestVm() {
    vcpu_.reset();
    ring_.reset();
    if (run_) ::munmap(run_, run_size_);
    for (const LoggedSlot& s : slots_) ::munmap(s.host, s.size);
  }

  int vm_fd() const { return vm_.get(); }
  DirtyRingLog* ring() { return ring_.get(); }
  const std::vector<LoggedSlot>& slots() const { return slots_; }
  std::vector<DeviceDirty::Range> ranges() const {
    std::vector<DeviceDirty::Range> r;
    for (const LoggedSlot& s : slots_) r.push_back({s.gpa, s.size});
    return r;
  }
  uint8_t* host(uint64_t gpa) {
    for (const LoggedSlot& s : slots_)
      if (gpa >= s.gpa && gpa < s.gpa + s.size) return s.host + (gpa - s.gpa);
    return nullptr;
  }

  // Has the guest store `value` at each address, in order, and checks it did. With
  // exit_each, the guest exits to us (out 0xe9) after every store: kvm-pvm emulates CPL0
  // code in batches that ignore a soft-full dirty ring, and an exit ends the batch.
  Result<void> guest_write(const std::vector<uint64_t>& gpas, uint32_t value, bool exit_each = false) {
    for (size_t done = 0; done < gpas.size();) {
      const size_t n = std::min<size_t>(gpas.size() - done, kMaxWrites);
      auto* table = reinterpret_cast<uint32_t*>(host(kTableGpa));
      for (size_t i = 0; i < n; ++i) table[i] = static_cast<uint32_t>(gpas[done + i]);
      kvm_regs regs{};
      regs.rip = exit_each ? kCodeGpa + kExitEachOffset : kCodeGpa;
      regs.rflags = 2;
      regs.rsi = kTableGpa;
      regs.rcx = n;
      regs.rax = value;
      if (::ioctl(vcpu_.get(), KVM_SET_REGS, &regs) < 0) return Error::from_errno("KVM_SET_REGS");
      KVMIG_TRY(run_until_exit_port());
      done += n;
    }
    for (uint64_t gpa : gpas) {
      uint32_t got;
      std::memcpy(&got, host(gpa), 4);
      if (got != value) return Error{"guest did not write " + std::to_string(gpa)};
    }
    return ok();
  }

  uint64_t ring_full_exits() const { return ring_full_exits_; }

 private:
  DirtyTestVm() = default;

  Result<void> add_slot(uint32_t slot, uint64_t gpa, uint64_t size) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return Error::from_errno("mmap guest RAM");
    slots_.push_back(LoggedSlot{slot, gpa, size, static_cast<uint8_t*>(p), 0});
    kvm_userspace_memory_region r{slot, 0, gpa, size, reinterpret_cast<uint64_t>(p)};
    if (::ioctl(vm_.get(), KVM_SET_USER_MEMORY_REGION, &r) < 0)
      return Error::from_errno("KVM_SET_USER_MEMORY_REGION");
    return ok();
  }

  Result<void> setup_cpu() {
    static const uint8_t code[] = {
        0x8b, 0x3e,        // 1: mov edi, [esi]
        0x89, 0x07,        //    mov [edi], eax
        0x83, 0xc6, 0x04,  //    add esi, 4
        0x49,              //    dec ecx
        0x75, 0xf6,        //    jnz 1b
        0xe6, 0xf4,        //    out 0xf4, al
        0xf4,              //    hlt
    };
    static const uint8_t code_exit_each[] = {
        0x8b, 0x3e,        // 1: mov edi, [esi]
        0x89, 0x07,        //    mov [edi], eax
        0xe6, 0xe9,        //    out 0xe9, al
        0x83, 0xc6, 0x04,  //    add esi, 4
        0x49,              //    dec ecx
        0x75, 0xf4,        //    jnz 1b
        0xe6, 0xf4,        //    out 0xf4, al
        0xf4,              //    hlt
    };
    std::memcpy(host(kCodeGpa), code, sizeof code);
    std::memcpy(host(kCodeGpa + kExitEachOffset), code_exit_each, sizeof code_exit_each);
    kvm_sregs sregs{};
    if (::ioctl(vcpu_.get(), KVM_GET_SREGS, &sregs) < 0) return Error::from_errno("KVM_GET_SREGS");
    kvm_segment seg{};
    seg.base = 0;
    seg.limit = 0xffffffff;
    seg.present = 1;
    seg.s = 1;
    seg.db = 1;
    seg.g = 1;
    seg.type = 0xb;  // code: execute/read, accessed
    seg.selector = 0x8;
    sregs.cs = seg;
    seg.type = 0x3;  // data: read/write, accessed
    seg.selector = 0x10;
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = seg;
    sregs.cr0 = (sregs.cr0 | 0x1) & ~0x80000000ull;  // PE, no paging
    if (::ioctl(vcpu_.get(), KVM_SET_SREGS, &sregs) < 0) return Error::from_errno("KVM_SET_SREGS");
    return ok();
  }

  Result<void> run_until_exit_port() {
    for (;;) {
      if (::ioctl(vcpu_.get(), KVM_RUN, 0) < 0) {
        if (errno == EINTR || errno == EAGAIN) continue;
        return Error::from_errno("KVM_RUN");
      }
      switch (run_->exit_reason) {
        case KVM_EXIT_IO:
          if (run_->io.port == 0xf4) return ok();
          if (run_->io.port == 0xe9) break;
          return Error{"unexpected I/O port " + std::to_string(run_->io.port)};
        case KVM_EXIT_DIRTY_RING_FULL:
          ++ring_full_exits_;
          if (!ring_) return Error{"dirty ring full without a ring"};
          KVMIG_TRY(ring_->handle_ring_full(0));
          break;
        case KVM_EXIT_INTR:
          break;
        default:
          return Error{"unexpected exit reason " + std::to_string(run_->exit_reason)};
      }
    }
  }

  Fd kvm_, vm_, vcpu_;
  std::unique_ptr<DirtyRingLog> ring_;
  kvm_run* run_ = nullptr;
  size_t run_size_ = 0;
  std::vector<LoggedSlot> slots_;
  uint64_t ring_full_exits_ = 0;
};

}  // namespace kvmig::kvm::testing
