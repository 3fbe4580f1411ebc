// KvmSystem: /dev/kvm opened once, its API version and capabilities checked up front so a
// missing feature is one clear message at start, not an obscure ioctl failure later.
#pragma once

#include "kvm/kvm_uapi.h"

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "base/fd.h"
#include "base/result.h"

namespace kvmig::kvm {

class KvmSystem {
 public:
  // Opens the device (default /dev/kvm) and checks every capability kvmig cannot run without.
  static Result<std::unique_ptr<KvmSystem>> open(const std::string& path = "/dev/kvm");

  int fd() const { return fd_.get(); }
  // KVM_CHECK_EXTENSION, answered from a cache filled lazily (the answer never changes).
  int check(int cap) const;
  bool has(int cap) const { return check(cap) > 0; }

  int vcpu_mmap_size() const { return vcpu_mmap_size_; }
  int max_vcpus() const { return max_vcpus_; }
  int max_memslots() const { return max_memslots_; }
  // Optional features, probed once.
  bool has_manual_dirty_log_protect() const { return manual_protect_ > 0; }
  uint32_t max_dirty_ring_bytes() const { return dirty_ring_bytes_; }

  // KVM_GET_SUPPORTED_CPUID and KVM_GET_MSR_INDEX_LIST, fetched once by open().
  const std::vector<kvm_cpuid_entry2>& supported_cpuid() const { return cpuid_; }
  const std::vector<uint32_t>& msr_index_list() const { return msrs_; }
  // The host TSC frequency KVM gives guests by default (KVM_GET_TSC_KHZ on a scratch VM).
  // 0 when KVM cannot say.
  uint32_t tsc_khz();

 private:
  explicit KvmSystem(Fd fd) : fd_(std::move(fd)) {}
  Result<void> probe();
  Result<void> fetch_cpuid();
  Result<void> fetch_msr_list();

  Fd fd_;
  int vcpu_mmap_size_ = 0;
  int max_vcpus_ = 0;
  int max_memslots_ = 0;
  int manual_protect_ = 0;
  uint32_t dirty_ring_bytes_ = 0;

  mutable std::mutex mu_;
  mutable std::vector<std::pair<int, int>> cap_cache_;
  std::vector<kvm_cpuid_entry2> cpuid_;
  std::vector<uint32_t> msrs_;
  uint32_t tsc_khz_ = 0;
  bool tsc_probed_ = false;
};

}  // namespace kvmig::kvm
