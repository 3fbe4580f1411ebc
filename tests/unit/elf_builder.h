// Builds tiny kernels in memory for the loader tests: a Multiboot ELF32 or an ELF64 whose
// single PT_LOAD segment holds the headers and `code`, loaded at `load_addr`, entry at code.
#pragma once

#include <elf.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace kvmig::test {

struct TinyElf {
  std::vector<uint8_t> bytes;
  size_t multiboot_offset = 0;  // of the Multiboot header (ELF32 only)
  size_t phdr_offset = 0;
  uint64_t entry = 0;
};

// One PT_LOAD segment covering the whole file at `load_addr`, entry at `entry`: the same
// layout for both classes, only the field widths differ.
template <typename Ehdr, typename Phdr>
void put_elf_headers(TinyElf& t, unsigned char elf_class, uint16_t machine, uint64_t load_addr,
                     uint64_t entry) {
  Ehdr eh{};
  std::memcpy(eh.e_ident, ELFMAG, SELFMAG);
  eh.e_ident[EI_CLASS] = elf_class;
  eh.e_ident[EI_DATA] = ELFDATA2LSB;
  eh.e_ident[EI_VERSION] = EV_CURRENT;
  eh.e_type = ET_EXEC;
  eh.e_machine = machine;
  eh.e_version = EV_CURRENT;
  eh.e_entry = entry;
  eh.e_phoff = sizeof(Ehdr);
  eh.e_ehsize = sizeof(Ehdr);
  eh.e_phentsize = sizeof(Phdr);
  eh.e_phnum = 1;
  Phdr ph{};
  ph.p_type = PT_LOAD;
  ph.p_offset = 0;
  ph.p_vaddr = ph.p_paddr = load_addr;
  ph.p_filesz = ph.p_memsz = t.bytes.size();
  ph.p_flags = PF_R | PF_W | PF_X;
  std::memcpy(t.bytes.data(), &eh, sizeof eh);
  std::memcpy(t.bytes.data() + eh.e_phoff, &ph, sizeof ph);
  t.phdr_offset = eh.e_phoff;
  t.entry = entry;
}

inline TinyElf make_multiboot_elf32(const std::vector<uint8_t>& code, uint32_t load_addr = 0x100000,
                                    uint32_t mb_flags = 0x2) {
  TinyElf t;
  const size_t code_off = sizeof(Elf32_Ehdr) + sizeof(Elf32_Phdr) + 12;
  t.bytes.assign(code_off + code.size(), 0);
  put_elf_headers<Elf32_Ehdr, Elf32_Phdr>(t, ELFCLASS32, EM_386, load_addr, load_addr + code_off);
  t.multiboot_offset = sizeof(Elf32_Ehdr) + sizeof(Elf32_Phdr);
  uint32_t mb[3] = {0x1badb002, mb_flags, static_cast<uint32_t>(-(0x1badb002 + mb_flags))};
  std::memcpy(t.bytes.data() + t.multiboot_offset, mb, sizeof mb);
  std::memcpy(t.bytes.data() + code_off, code.data(), code.size());
  return t;
}

inline TinyElf make_elf64(const std::vector<uint8_t>& code, uint64_t load_addr = 0x100000) {
  TinyElf t;
  const size_t code_off = sizeof(Elf64_Ehdr) + sizeof(Elf64_Phdr);
  t.bytes.assign(code_off + code.size(), 0);
  put_elf_headers<Elf64_Ehdr, Elf64_Phdr>(t, ELFCLASS64, EM_X86_64, load_addr, load_addr + code_off);
  std::memcpy(t.bytes.data() + code_off, code.data(), code.size());
  return t;
}

// x86 code (valid in 32- and 64-bit mode): print `text` on port 0xe9, then write `status`
// to the exit port 0xf4.
inline std::vector<uint8_t> code_print_and_exit(const std::string& text, uint32_t status) {
  std::vector<uint8_t> c;
  for (char ch : text) {
    c.insert(c.end(), {0xb0, static_cast<uint8_t>(ch)});  // mov al, ch
    c.insert(c.end(), {0xe6, 0xe9});                      // out 0xe9, al
  }
  c.push_back(0xb8);  // mov eax, status
  for (int i = 0; i < 4; ++i) c.push_back(static_cast<uint8_t>(status >> (8 * i)));
  c.insert(c.end(), {0xe7, 0xf4});  // out 0xf4, eax
  c.insert(c.end(), {0xf4, 0xeb, 0xfd});  // hlt; jmp hlt
  return c;
}

// Prints `text` once, then increments the dword at guest-physical `counter` forever.
inline std::vector<uint8_t> code_print_then_count(const std::string& text, uint32_t counter) {
  std::vector<uint8_t> c;
  for (char ch : text) c.insert(c.end(), {0xb0, static_cast<uint8_t>(ch), 0xe6, 0xe9});
  c.insert(c.end(), {0xff, 0x05});  // inc dword [counter] (absolute in 32-bit mode)
  for (int i = 0; i < 4; ++i) c.push_back(static_cast<uint8_t>(counter >> (8 * i)));
  c.insert(c.end(), {0xeb, 0xf8});  // jmp back to the inc
  return c;
}

}  // namespace kvmig::test
