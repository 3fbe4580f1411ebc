#include "kvm/kvm_system.h"

#include <fcntl.h>

#include <cerrno>
#include <cstring>

#include "kvm/ioctl.h"

KVMIG_CHECK_KVM_UAPI_LAYOUT();

namespace kvmig::kvm {

namespace {

struct RequiredCap {
  int cap;
  const char* name;
  const char* why;
};

// What kvmig's VMM cannot work without. Dirty-log ring and manual protect are optional: the
// migration code falls back to the plain bitmap when they are missing.
constexpr RequiredCap kRequired[] = {
    {KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY", "guest RAM from user memory"},
    {KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP", "in-kernel PIC/IOAPIC/LAPIC"},
    {KVM_CAP_PIT2, "KVM_CAP_PIT2", "in-kernel PIT"},
    {KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID", "KVM_GET_SUPPORTED_CPUID/KVM_SET_CPUID2"},
    {KVM_CAP_SET_TSS_ADDR, "KVM_CAP_SET_TSS_ADDR", "TSS area for real-mode emulation"},
    {KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT", "race-free vCPU pause"},
    {KVM_CAP_MP_STATE, "KVM_CAP_MP_STATE", "vCPU run state for save/restore"},
    {KVM_CAP_GET_TSC_KHZ, "KVM_CAP_GET_TSC_KHZ", "guest TSC frequency"},
};

}  // namespace

Result<std::unique_ptr<KvmSystem>> KvmSystem::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT)
      return Error{path + " does not exist: KVM is not available here (load kvm_intel/kvm_amd, or enable nested virtualization)", err};
    if (err == EACCES || err == EPERM)
      return Error{path + ": permission denied (run as root or join the group owning " + path + ", usually 'kvm')", err};
    return Error::from_errno("open " + path, err);
  }
  std::unique_ptr<KvmSystem> sys(new KvmSystem(Fd(fd)));
  KVMIG_TRY(sys->probe());
  return sys;
}

Result<void> KvmSystem::probe() {
  KVMIG_ASSIGN(int version, kvm_ioctl(fd(), KVM_GET_API_VERSION, "KVM_GET_API_VERSION"));
  if (version != KVM_API_VERSION)
    return Error{"KVM API version " + std::to_string(version) + ", kvmig needs " + std::to_string(KVM_API_VERSION)};
  for (const auto& req : kRequired) {
    if (!has(req.cap))
      return Error{std::string("KVM lacks ") + req.name + " (needed for " + req.why + ")"};
  }
  KVMIG_ASSIGN(vcpu_mmap_size_, kvm_ioctl(fd(), KVM_GET_VCPU_MMAP_SIZE, "KVM_GET_VCPU_MMAP_SIZE"));
  max_vcpus_ = check(KVM_CAP_MAX_VCPUS);
  if (max_vcpus_ <= 0) max_vcpus_ = check(KVM_CAP_NR_VCPUS);
  if (max_vcpus_ <= 0) max_vcpus_ = 4;  // the documented default when neither is reported
  max_memslots_ = check(KVM_CAP_NR_MEMSLOTS);
  manual_protect_ = check(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
  int ring = check(KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
  if (ring <= 0) ring = check(KVM_CAP_DIRTY_LOG_RING);
  dirty_ring_bytes_ = ring > 0 ? static_cast<uint32_t>(ring) : 0;
  KVMIG_TRY(fetch_cpuid());
  KVMIG_TRY(fetch_msr_list());
  return ok();
}

int KvmSystem::check(int cap) const {
  std::lock_guard lock(mu_);
  for (const auto& [c, v] : cap_cache_)
    if (c == cap) return v;
  int v = ::ioctl(fd_.get(), KVM_CHECK_EXTENSION, cap);
  if (v < 0) v = 0;
  cap_cache_.emplace_back(cap, v);
  return v;
}

Result<void> KvmSystem::fetch_cpuid() {
  // The kernel says E2BIG until the buffer is large enough; grow it.
  for (uint32_t n = 64; n <= 4096; n *= 2) {
    std::vector<uint8_t> buf(sizeof(kvm_cpuid2) + n * sizeof(kvm_cpuid_entry2));
    auto* c = reinterpret_cast<kvm_cpuid2*>(buf.data());
    c->nent = n;
    int r = ::ioctl(fd_.get(), KVM_GET_SUPPORTED_CPUID, c);
    if (r < 0 && errno == E2BIG) continue;
    if (r < 0) return Error::from_errno("KVM_GET_SUPPORTED_CPUID");
    cpuid_.assign(c->entries, c->entries + c->nent);
    return ok();
  }
  return Error{"KVM_GET_SUPPORTED_CPUID: more than 4096 entries"};
}

Result<void> KvmSystem::fetch_msr_list() {
  kvm_msr_list probe{};
  // First call with nmsrs=0 reports the count (E2BIG).
  if (::ioctl(fd_.get(), KVM_GET_MSR_INDEX_LIST, &probe) < 0 && errno != E2BIG)
    return Error::from_errno("KVM_GET_MSR_INDEX_LIST");
  std::vector<uint32_t> buf(1 + probe.nmsrs);
  auto* list = reinterpret_cast<kvm_msr_list*>(buf.data());
  list->nmsrs = probe.nmsrs;
  if (::ioctl(fd_.get(), KVM_GET_MSR_INDEX_LIST, list) < 0)
    return Error::from_errno("KVM_GET_MSR_INDEX_LIST");
  msrs_.assign(list->indices, list->indices + list->nmsrs);
  return ok();
}

uint32_t KvmSystem::tsc_khz() {
  std::lock_guard lock(mu_);
  if (tsc_probed_) return tsc_khz_;
  tsc_probed_ = true;
  Fd vm(::ioctl(fd_.get(), KVM_CREATE_VM, 0));
  if (!vm) return 0;
  // Newer kernels answer on the VM fd; older ones only on a vCPU.
  int khz = ::ioctl(vm.get(), KVM_GET_TSC_KHZ, 0);
  if (khz <= 0) {
    Fd vcpu(::ioctl(vm.get(), KVM_CREATE_VCPU, 0));
    if (vcpu) khz = ::ioctl(vcpu.get(), KVM_GET_TSC_KHZ, 0);
  }
  tsc_khz_ = khz > 0 ? static_cast<uint32_t>(khz) : 0;
  return tsc_khz_;
}

}  // namespace kvmig::kvm
