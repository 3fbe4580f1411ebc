#include "kvm/vcpu.h"

#include <sys/mman.h>

#include <cinttypes>
#include <cstdio>
#include <memory>

#include "kvm/ioctl.h"

KVMIG_CHECK_KVM_UAPI_LAYOUT();

namespace kvmig::kvm {

Result<std::unique_ptr<Vcpu>> Vcpu::create(int vm_fd, int index, int mmap_size) {
  auto fd = kvm_ioctl(vm_fd, KVM_CREATE_VCPU, "KVM_CREATE_VCPU", static_cast<unsigned long>(index));
  if (!fd.ok()) return std::move(fd.error().prefix("vCPU " + std::to_string(index)));
  Fd owner(*fd);
  void* run = ::mmap(nullptr, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, owner.get(), 0);
  if (run == MAP_FAILED) return Error::from_errno("mmap kvm_run of vCPU " + std::to_string(index));
  return std::unique_ptr<Vcpu>(new Vcpu(std::move(owner), index, static_cast<kvm_run*>(run), mmap_size));
}

Vcpu::~Vcpu() {
  if (run_) ::munmap(run_, mmap_size_);
}

Result<kvm_regs> Vcpu::get_regs() const {
  kvm_regs regs{};
  KVMIG_TRY(kvm_ioctl(fd(), KVM_GET_REGS, "KVM_GET_REGS", &regs));
  return regs;
}

Result<void> Vcpu::set_regs(const kvm_regs& regs) {
  KVMIG_TRY(kvm_ioctl(fd(), KVM_SET_REGS, "KVM_SET_REGS", const_cast<kvm_regs*>(&regs)));
  return ok();
}

Result<kvm_sregs> Vcpu::get_sregs() const {
  kvm_sregs sregs{};
  KVMIG_TRY(kvm_ioctl(fd(), KVM_GET_SREGS, "KVM_GET_SREGS", &sregs));
  return sregs;
}

Result<void> Vcpu::set_sregs(const kvm_sregs& sregs) {
  KVMIG_TRY(kvm_ioctl(fd(), KVM_SET_SREGS, "KVM_SET_SREGS", const_cast<kvm_sregs*>(&sregs)));
  return ok();
}

namespace {
void append_segment(std::string& out, const char* name, const kvm_segment& s) {
  char buf[160];
  std::snprintf(buf, sizeof buf, " %s=%04x/base=%" PRIx64 "/limit=%x/type=%x/dpl=%u/l=%u/db=%u/p=%u", name, s.selector,
                static_cast<uint64_t>(s.base), s.limit, s.type, s.dpl, s.l, s.db, s.present);
  out += buf;
}
}  // namespace

std::string Vcpu::dump_registers() const {
  std::string out = "vCPU " + std::to_string(index_) + ":";
  auto regs = get_regs();
  if (regs.ok()) {
    const kvm_regs& r = *regs;
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  " rip=%llx rsp=%llx rbp=%llx rflags=%llx rax=%llx rbx=%llx rcx=%llx rdx=%llx rsi=%llx rdi=%llx"
                  " r8=%llx r9=%llx r10=%llx r11=%llx r12=%llx r13=%llx r14=%llx r15=%llx",
                  r.rip, r.rsp, r.rbp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
                  r.r12, r.r13, r.r14, r.r15);
    out += buf;
  } else {
    out += " (" + regs.error().message + ")";
  }
  auto sregs = get_sregs();
  if (sregs.ok()) {
    const kvm_sregs& s = *sregs;
    char buf[256];
    std::snprintf(buf, sizeof buf, " cr0=%llx cr2=%llx cr3=%llx cr4=%llx cr8=%llx efer=%llx apic_base=%llx", s.cr0,
                  s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base);
    out += buf;
    append_segment(out, "cs", s.cs);
    append_segment(out, "ds", s.ds);
    append_segment(out, "ss", s.ss);
    append_segment(out, "es", s.es);
    append_segment(out, "fs", s.fs);
    append_segment(out, "gs", s.gs);
    append_segment(out, "tr", s.tr);
    std::snprintf(buf, sizeof buf, " gdt=%llx/%x idt=%llx/%x", s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit);
    out += buf;
  } else {
    out += " (" + sregs.error().message + ")";
  }
  return out;
}

}  // namespace kvmig::kvm
