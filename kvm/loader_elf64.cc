#include "kvm/loader_elf64.h"

#include <elf.h>

#include <cstring>

#include "kvm/boot_layout.h"
#include "kvm/guest_memory.h"
#include "kvm/loader_multiboot.h"
#include "kvm/vcpu.h"

namespace kvmig::kvm {

namespace {

constexpr uint64_t kPtePresent = 1, kPteWrite = 2, kPteLarge = 0x80;
constexpr uint64_t kCr0Pe = 1, kCr0Mp = 2, kCr0Et = 0x10, kCr0Ne = 0x20, kCr0Wp = 0x10000, kCr0Pg = 0x80000000;
constexpr uint64_t kCr4Pae = 0x20, kCr4Osfxsr = 0x200, kCr4Osxmmexcpt = 0x400;
constexpr uint64_t kEferLme = 0x100, kEferLma = 0x400;

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

Result<KernelImage> parse_elf64(const std::vector<uint8_t>& f) {
  if (f.size() < 4 || std::memcmp(f.data(), ELFMAG, SELFMAG) != 0) return Error{"not an ELF file"};
  if (f.size() < sizeof(Elf64_Ehdr)) return Error{"truncated ELF header (" + std::to_string(f.size()) + " bytes)"};
  Elf64_Ehdr eh;
  std::memcpy(&eh, f.data(), sizeof eh);
  if (eh.e_ident[EI_CLASS] != ELFCLASS64) return Error{"not an ELF64 file"};
  if (eh.e_ident[EI_DATA] != ELFDATA2LSB) return Error{"ELF file is not little-endian"};
  if (eh.e_ident[EI_VERSION] != EV_CURRENT || eh.e_version != EV_CURRENT) return Error{"unknown ELF version"};
  if (eh.e_machine != EM_X86_64) return Error{"ELF64 machine " + std::to_string(eh.e_machine) + " is not x86-64"};
  if (eh.e_type != ET_EXEC) return Error{"ELF file is not an executable (e_type " + std::to_string(eh.e_type) + ")"};
  if (eh.e_phentsize != sizeof(Elf64_Phdr)) return Error{"ELF program header size " + std::to_string(eh.e_phentsize) + " is wrong"};
  if (eh.e_phnum == 0) return Error{"ELF file has no program headers"};
  if (eh.e_phoff > f.size() || uint64_t{eh.e_phnum} * sizeof(Elf64_Phdr) > f.size() - eh.e_phoff)
    return Error{"truncated ELF file (program headers past the end)"};

  KernelImage image;
  uint64_t entry = eh.e_entry;
  for (unsigned i = 0; i < eh.e_phnum; ++i) {
    Elf64_Phdr ph;
    std::memcpy(&ph, f.data() + eh.e_phoff + i * sizeof(Elf64_Phdr), sizeof ph);
    if (ph.p_type != PT_LOAD || ph.p_memsz == 0) continue;
    if (ph.p_filesz > ph.p_memsz) return Error{"ELF segment " + std::to_string(i) + ": file size larger than memory size"};
    if (ph.p_offset > f.size() || ph.p_filesz > f.size() - ph.p_offset)
      return Error{"truncated ELF file (segment " + std::to_string(i) + " extends past the end)"};
    image.segments.push_back({ph.p_paddr, ph.p_offset, ph.p_filesz, ph.p_memsz});
    if (ph.p_vaddr != ph.p_paddr && entry >= ph.p_vaddr && entry - ph.p_vaddr < ph.p_memsz) entry = entry - ph.p_vaddr + ph.p_paddr;
  }
  if (image.segments.empty()) return Error{"ELF file has no loadable segments"};
  image.entry = entry;
  return image;
}

Result<std::vector<uint8_t>> build_identity_page_tables(uint64_t base, uint64_t limit, uint64_t ram) {
  // Map up to the top of RAM, and at least the 4 GiB below it so the xAPIC page is reachable.
  uint64_t top = ram <= kLowRamEnd ? ram : kHighRamStart + (ram - kLowRamEnd);
  if (top < kHighRamStart) top = kHighRamStart;
  uint64_t gibs = (top + kGiB - 1) / kGiB;
  if (gibs > 512) return Error{"64-bit boot maps at most 512 GiB of guest-physical space"};
  uint64_t bytes = (2 + gibs) * kPageSize;
  if (base + bytes > limit)
    return Error{"64-bit boot: identity page tables for " + std::to_string(gibs) + " GiB do not fit in the boot area (at most " +
                 std::to_string((limit - base) / kPageSize - 2) + " GiB)"};
  std::vector<uint64_t> t(bytes / 8, 0);
  const uint64_t pdpt = base + kPageSize, pd0 = base + 2 * kPageSize;
  t[0] = pdpt | kPtePresent | kPteWrite;
  for (uint64_t g = 0; g < gibs; ++g) {
    t[512 + g] = (pd0 + g * kPageSize) | kPtePresent | kPteWrite;
    for (uint64_t i = 0; i < 512; ++i) t[1024 + g * 512 + i] = (g * kGiB + i * kHugePageSize) | kPtePresent | kPteWrite | kPteLarge;
  }
  std::vector<uint8_t> out(bytes);
  std::memcpy(out.data(), t.data(), bytes);
  return out;
}

Result<void> load_elf64(const std::vector<uint8_t>& file, const std::string& cmdline, GuestMemory& memory, Vcpu& bsp) {
  KVMIG_ASSIGN(KernelImage image, parse_elf64(file));
  KVMIG_TRY(check_image_fits(image, memory.ram_size()));
  KVMIG_TRY(copy_image(image, file, memory));
  KVMIG_ASSIGN(uint64_t info, write_multiboot_info(memory, cmdline));

  KVMIG_ASSIGN(std::vector<uint8_t> tables, build_identity_page_tables(kPageTables, kPageTablesEnd, memory.ram_size()));
  uint8_t* pt_host = memory.host_ptr(kPageTables, tables.size());
  if (!pt_host) return Error{"guest RAM too small for the boot page tables"};
  std::memcpy(pt_host, tables.data(), tables.size());

  // null, 64-bit code 0x08 (L=1), data 0x10.
  const uint64_t gdt[3] = {0, 0x00af9a000000ffffULL, 0x00cf92000000ffffULL};
  uint8_t* gdt_host = memory.host_ptr(kBootGdt, sizeof gdt);
  if (!gdt_host) return Error{"guest RAM too small for the boot GDT"};
  std::memcpy(gdt_host, gdt, sizeof gdt);

  KVMIG_ASSIGN(kvm_sregs sregs, bsp.get_sregs());
  kvm_segment code{};
  code.limit = 0xffffffff;
  code.selector = kCodeSelector;
  code.type = 0xb;
  code.present = 1;
  code.s = 1;
  code.l = 1;
  code.g = 1;
  kvm_segment data = code;
  data.selector = kDataSelector;
  data.type = 0x3;
  data.l = 0;
  data.db = 1;
  sregs.cs = code;
  sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
  sregs.gdt.base = kBootGdt;
  sregs.gdt.limit = sizeof gdt - 1;
  sregs.cr3 = kPageTables;
  sregs.cr4 = kCr4Pae | kCr4Osfxsr | kCr4Osxmmexcpt;
  sregs.cr0 = kCr0Pe | kCr0Mp | kCr0Et | kCr0Ne | kCr0Wp | kCr0Pg;
  sregs.efer = kEferLme | kEferLma;
  KVMIG_TRY(bsp.set_sregs(sregs));
  // Some KVMs (PVM) drop bits they refuse without an error: a guest entered with paging
  // off would fault in confusing ways, so compare what matters.
  KVMIG_ASSIGN(kvm_sregs back, bsp.get_sregs());
  if ((back.cr0 & (kCr0Pe | kCr0Pg)) != (kCr0Pe | kCr0Pg) || !(back.cr4 & kCr4Pae) || !(back.efer & kEferLma) ||
      back.cr3 != kPageTables || back.cs.l != 1)
    return Error{"KVM_SET_SREGS: KVM did not keep long mode (asked cr0 " + hex(sregs.cr0) + " efer " + hex(sregs.efer) +
                 ", got cr0 " + hex(back.cr0) + " cr4 " + hex(back.cr4) + " efer " + hex(back.efer) + " cs.l " +
                 std::to_string(back.cs.l) + ")"};

  kvm_regs regs{};
  regs.rip = image.entry;
  regs.rdi = info;
  regs.rsp = 0;
  regs.rflags = 0x2;
  KVMIG_TRY(bsp.set_regs(regs));
  return ok();
}

}  // namespace kvmig::kvm
