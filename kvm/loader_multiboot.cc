#include "kvm/loader_multiboot.h"

#include <elf.h>

#include <algorithm>
#include <cstring>

#include "kvm/boot_layout.h"
#include "kvm/guest_memory.h"
#include "kvm/multiboot_info.h"
#include "kvm/vcpu.h"

namespace kvmig::kvm {

namespace {

constexpr uint32_t kFlagAoutKludge = 1u << 16;
// Bits 0 (page-align modules), 1 (memory info) and 2 (video mode, ignored like QEMU does)
// are the required-feature bits kvmig honours; any other bit in 0..15 must refuse the boot.
constexpr uint32_t kSupportedRequiredFlags = 0x7;

uint32_t get32(const std::vector<uint8_t>& f, size_t off) {
  uint32_t v;
  std::memcpy(&v, f.data() + off, 4);
  return v;
}

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

Result<size_t> find_multiboot_header(const std::vector<uint8_t>& f) {
  size_t limit = std::min(f.size(), kMultibootSearchBytes);
  for (size_t off = 0; off + 12 <= limit; off += 4) {
    if (get32(f, off) != kMultibootHeaderMagic) continue;
    uint32_t flags = get32(f, off + 4);
    uint32_t sum = kMultibootHeaderMagic + flags + get32(f, off + 8);
    if (sum != 0) return Error{"Multiboot header at offset " + std::to_string(off) + " has a bad checksum"};
    return off;
  }
  return Error{"not a Multiboot kernel (no Multiboot header in the first 8 KiB)"};
}

// a.out kludge: the header gives the physical load addresses directly (Multiboot 3.1.3).
Result<KernelImage> parse_aout_kludge(const std::vector<uint8_t>& f, size_t mb) {
  if (mb + 32 > f.size()) return Error{"Multiboot header truncated (address fields missing)"};
  uint32_t header_addr = get32(f, mb + 12), load_addr = get32(f, mb + 16), load_end = get32(f, mb + 20);
  uint32_t bss_end = get32(f, mb + 24), entry = get32(f, mb + 28);
  if (load_addr > header_addr || header_addr - load_addr > mb)
    return Error{"Multiboot header: load_addr " + hex(load_addr) + " / header_addr " + hex(header_addr) + " inconsistent"};
  uint64_t file_offset = mb - (header_addr - load_addr);
  uint64_t file_size = load_end ? uint64_t{load_end} - load_addr : f.size() - file_offset;
  if (load_end && load_end < load_addr) return Error{"Multiboot header: load_end_addr below load_addr"};
  if (file_offset + file_size > f.size()) return Error{"Multiboot header: load range extends past the end of the file"};
  uint64_t mem_size = file_size;
  if (bss_end) {
    if (bss_end < load_addr + file_size) return Error{"Multiboot header: bss_end_addr below the loaded image"};
    mem_size = uint64_t{bss_end} - load_addr;
  }
  KernelImage image;
  image.segments.push_back({load_addr, file_offset, file_size, mem_size});
  image.entry = entry;
  return image;
}

}  // namespace

Result<KernelImage> parse_multiboot_elf32(const std::vector<uint8_t>& f) {
  if (f.size() < 4 || std::memcmp(f.data(), ELFMAG, SELFMAG) != 0) {
    // Multiboot allows non-ELF kernels through the a.out kludge alone.
    auto mb = find_multiboot_header(f);
    if (!mb.ok() || (get32(f, *mb + 4) & kFlagAoutKludge) == 0) return Error{"not an ELF file and not a Multiboot a.out kernel"};
    return parse_aout_kludge(f, *mb);
  }
  if (f.size() < sizeof(Elf32_Ehdr)) return Error{"truncated ELF header (" + std::to_string(f.size()) + " bytes)"};
  Elf32_Ehdr eh;
  std::memcpy(&eh, f.data(), sizeof eh);
  if (eh.e_ident[EI_CLASS] != ELFCLASS32) return Error{"not an ELF32 file (ELF class " + std::to_string(eh.e_ident[EI_CLASS]) + ")"};
  if (eh.e_ident[EI_DATA] != ELFDATA2LSB) return Error{"ELF file is not little-endian"};
  if (eh.e_ident[EI_VERSION] != EV_CURRENT || eh.e_version != EV_CURRENT) return Error{"unknown ELF version"};
  if (eh.e_machine != EM_386) return Error{"ELF32 machine " + std::to_string(eh.e_machine) + " is not i386"};
  if (eh.e_type != ET_EXEC) return Error{"ELF file is not an executable (e_type " + std::to_string(eh.e_type) + ")"};

  KVMIG_ASSIGN(size_t mb, find_multiboot_header(f));
  uint32_t flags = get32(f, mb + 4);
  uint32_t unsupported = flags & 0xffff & ~kSupportedRequiredFlags;
  if (unsupported) return Error{"Multiboot header requires unsupported features (flags " + hex(unsupported) + ")"};
  if (flags & kFlagAoutKludge) return parse_aout_kludge(f, mb);

  if (eh.e_phentsize != sizeof(Elf32_Phdr)) return Error{"ELF program header size " + std::to_string(eh.e_phentsize) + " is wrong"};
  if (eh.e_phnum == 0) return Error{"ELF file has no program headers"};
  if (uint64_t{eh.e_phoff} + uint64_t{eh.e_phnum} * sizeof(Elf32_Phdr) > f.size())
    return Error{"truncated ELF file (program headers past the end)"};

  KernelImage image;
  uint64_t entry = eh.e_entry;
  bool entry_translated = false;
  for (unsigned i = 0; i < eh.e_phnum; ++i) {
    Elf32_Phdr ph;
    std::memcpy(&ph, f.data() + eh.e_phoff + i * sizeof(Elf32_Phdr), sizeof ph);
    if (ph.p_type != PT_LOAD || ph.p_memsz == 0) continue;
    if (ph.p_filesz > ph.p_memsz) return Error{"ELF segment " + std::to_string(i) + ": file size larger than memory size"};
    if (uint64_t{ph.p_offset} + ph.p_filesz > f.size())
      return Error{"truncated ELF file (segment " + std::to_string(i) + " extends past the end)"};
    image.segments.push_back({ph.p_paddr, ph.p_offset, ph.p_filesz, ph.p_memsz});
    // Kernels linked high give a virtual entry; like QEMU, translate it to the physical
    // address of the segment that holds it.
    if (!entry_translated && ph.p_vaddr != ph.p_paddr && entry >= ph.p_vaddr && entry < uint64_t{ph.p_vaddr} + ph.p_memsz) {
      entry = entry - ph.p_vaddr + ph.p_paddr;
      entry_translated = true;
    }
  }
  if (image.segments.empty()) return Error{"ELF file has no loadable segments"};
  image.entry = entry;
  return image;
}

Result<uint64_t> write_multiboot_info(GuestMemory& memory, const std::string& cmdline) {
  KVMIG_ASSIGN(std::vector<uint8_t> info, build_multiboot_info(kMultibootInfo, kMultibootInfoEnd, memory.ram_size(), cmdline));
  uint8_t* host = memory.host_ptr(kMultibootInfo, info.size());
  if (!host) return Error{"guest RAM too small for the Multiboot information"};
  std::memcpy(host, info.data(), info.size());
  return kMultibootInfo;
}

Result<void> load_multiboot(const std::vector<uint8_t>& file, const std::string& cmdline, GuestMemory& memory,
                            Vcpu& bsp) {
  KVMIG_ASSIGN(KernelImage image, parse_multiboot_elf32(file));
  KVMIG_TRY(check_image_fits(image, memory.ram_size()));
  KVMIG_TRY(copy_image(image, file, memory));
  KVMIG_ASSIGN(uint64_t info, write_multiboot_info(memory, cmdline));

  // The GDT QEMU's multiboot option ROM leaves behind: null, flat code 0x08, flat data 0x10.
  const uint64_t gdt[3] = {0, 0x00cf9a000000ffffULL, 0x00cf92000000ffffULL};
  uint8_t* gdt_host = memory.host_ptr(kBootGdt, sizeof gdt);
  if (!gdt_host) return Error{"guest RAM too small for the boot GDT"};
  std::memcpy(gdt_host, gdt, sizeof gdt);

  KVMIG_ASSIGN(kvm_sregs sregs, bsp.get_sregs());
  auto flat = [](uint16_t selector, uint8_t type) {
    kvm_segment s{};
    s.base = 0;
    s.limit = 0xffffffff;
    s.selector = selector;
    s.type = type;
    s.present = 1;
    s.dpl = 0;
    s.db = 1;
    s.s = 1;
    s.l = 0;
    s.g = 1;
    return s;
  };
  sregs.cs = flat(kCodeSelector, 0xb);  // execute/read, accessed
  sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = flat(kDataSelector, 0x3);  // read/write, accessed
  sregs.gdt.base = kBootGdt;
  sregs.gdt.limit = sizeof gdt - 1;
  sregs.cr0 = 0x11;  // PE | ET: protected mode, paging off
  sregs.cr4 = 0;
  sregs.efer = 0;
  KVMIG_TRY(bsp.set_sregs(sregs));
  KVMIG_ASSIGN(kvm_sregs back, bsp.get_sregs());
  if ((back.cr0 & 0x80000001) != 0x1 || back.cs.db != 1 || back.cs.base != 0 || (back.efer & 0x400))
    return Error{"KVM_SET_SREGS: KVM did not keep 32-bit protected mode (cr0 " + hex(back.cr0) + ", efer " + hex(back.efer) +
                 ")"};

  kvm_regs regs{};
  regs.rip = image.entry;
  regs.rax = kMultibootBootloaderMagic;
  regs.rbx = info;
  regs.rflags = 0x2;  // IF clear, as Multiboot requires
  KVMIG_TRY(bsp.set_regs(regs));
  return ok();
}

}  // namespace kvmig::kvm
