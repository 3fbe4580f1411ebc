// Vcpu: owner of one vCPU fd and its shared kvm_run page. Register access helpers live here;
// the run loop lives in vcpu_runner.
#pragma once

#include "kvm/kvm_uapi.h"

#include <memory>
#include <string>

#include "base/fd.h"
#include "base/result.h"

namespace kvmig::kvm {

class Vcpu {
 public:
  // KVM_CREATE_VCPU with id `index` (== its APIC id), then maps kvm_run.
  static Result<std::unique_ptr<Vcpu>> create(int vm_fd, int index, int mmap_size);
  ~Vcpu();
  Vcpu(const Vcpu&) = delete;
  Vcpu& operator=(const Vcpu&) = delete;

  int fd() const { return fd_.get(); }
  int index() const { return index_; }
  kvm_run* run() const { return run_; }
  int mmap_size() const { return mmap_size_; }

  Result<kvm_regs> get_regs() const;
  Result<void> set_regs(const kvm_regs& regs);
  Result<kvm_sregs> get_sregs() const;
  Result<void> set_sregs(const kvm_sregs& sregs);
  // "rip=... rsp=... cr0=..." with all general, segment and control registers, for errors
  // such as a triple fault.
  std::string dump_registers() const;

 private:
  Vcpu(Fd fd, int index, kvm_run* run, int mmap_size)
      : fd_(std::move(fd)), index_(index), run_(run), mmap_size_(mmap_size) {}

  Fd fd_;
  int index_;
  kvm_run* run_;
  int mmap_size_;
};

}  // namespace kvmig::kvm
