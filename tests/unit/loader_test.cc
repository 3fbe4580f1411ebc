// Validation of kernel images on crafted byte buffers: every malformed input must give a
// clear error, never a load outside guest RAM.
#include <gtest/gtest.h>

#include "kvm/boot_layout.h"
#include "kvm/guest_memory.h"
#include "kvm/kernel_image.h"
#include "kvm/loader_elf64.h"
#include "kvm/loader_multiboot.h"
#include "unit/elf_builder.h"

namespace kvmig::kvm {
namespace {

using test::make_elf64;
using test::make_multiboot_elf32;

const std::vector<uint8_t> kCode = test::code_print_and_exit("hi", 3);

void set32(std::vector<uint8_t>& b, size_t off, uint32_t v) { std::memcpy(b.data() + off, &v, 4); }

TEST(MultibootLoader, ParsesValidKernel) {
  auto t = make_multiboot_elf32(kCode);
  auto image = parse_multiboot_elf32(t.bytes);
  ASSERT_TRUE(image.ok()) << image.error().message;
  ASSERT_EQ(image->segments.size(), 1u);
  EXPECT_EQ(image->segments[0].gpa, 0x100000u);
  EXPECT_EQ(image->segments[0].file_size, t.bytes.size());
  EXPECT_EQ(image->entry, t.entry);
  EXPECT_TRUE(check_image_fits(*image, 64 * kMiB).ok());
}

TEST(MultibootLoader, RejectsTruncatedHeader) {
  auto t = make_multiboot_elf32(kCode);
  t.bytes.resize(30);
  auto r = parse_multiboot_elf32(t.bytes);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("truncated ELF header"), std::string::npos) << r.error().message;
}

TEST(MultibootLoader, RejectsNonElf) {
  std::vector<uint8_t> junk(4096, 0x90);
  auto r = parse_multiboot_elf32(junk);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("not an ELF"), std::string::npos) << r.error().message;
}

TEST(MultibootLoader, RejectsMissingMultibootHeader) {
  auto t = make_multiboot_elf32(kCode);
  set32(t.bytes, t.multiboot_offset, 0);
  auto r = parse_multiboot_elf32(t.bytes);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("no Multiboot header"), std::string::npos) << r.error().message;
}

TEST(MultibootLoader, RejectsBadChecksum) {
  auto t = make_multiboot_elf32(kCode);
  set32(t.bytes, t.multiboot_offset + 8, 12345);
  auto r = parse_multiboot_elf32(t.bytes);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("checksum"), std::string::npos) << r.error().message;
}

TEST(MultibootLoader, RejectsUnsupportedRequiredFlags) {
  auto t = make_multiboot_elf32(kCode, 0x100000, 0x2 | 0x10);
  auto r = parse_multiboot_elf32(t.bytes);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("unsupported features"), std::string::npos) << r.error().message;
}

TEST(MultibootLoader, RejectsElf64AndWrongMachine) {
  auto t64 = make_elf64(kCode);
  EXPECT_FALSE(parse_multiboot_elf32(t64.bytes).ok());
  auto t = make_multiboot_elf32(kCode);
  t.bytes[18] = 40;  // e_machine = ARM
  auto r = parse_multiboot_elf32(t.bytes);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("not i386"), std::string::npos);
}

TEST(MultibootLoader, RejectsSegmentPastEndOfFile) {
  auto t = make_multiboot_elf32(kCode);
  set32(t.bytes, t.phdr_offset + 16, static_cast<uint32_t>(t.bytes.size() + 1));  // p_filesz
  set32(t.bytes, t.phdr_offset + 20, static_cast<uint32_t>(t.bytes.size() + 1));  // p_memsz
  auto r = parse_multiboot_elf32(t.bytes);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("extends past the end"), std::string::npos) << r.error().message;
}

TEST(MultibootLoader, RejectsProgramHeadersPastEndOfFile) {
  auto t = make_multiboot_elf32(kCode);
  set32(t.bytes, 28, 0xfffffff0);  // e_phoff
  auto r = parse_multiboot_elf32(t.bytes);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("program headers"), std::string::npos) << r.error().message;
}

TEST(KernelImage, RejectsSegmentOutsideRam) {
  auto t = make_multiboot_elf32(kCode, 0x7ffffc0);  // crosses 128 MiB
  auto image = parse_multiboot_elf32(t.bytes);
  ASSERT_TRUE(image.ok());
  EXPECT_TRUE(check_image_fits(*image, 256 * kMiB).ok());
  auto r = check_image_fits(*image, 128 * kMiB);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("outside guest RAM"), std::string::npos) << r.error().message;
}

TEST(KernelImage, RejectsSegmentInTheHoleAndInBootArea) {
  auto hole = parse_multiboot_elf32(make_multiboot_elf32(kCode, 0xc0000000).bytes);
  ASSERT_TRUE(hole.ok());
  EXPECT_FALSE(check_image_fits(*hole, 8 * kGiB).ok());  // 3..4 GiB is not RAM
  auto boot = parse_multiboot_elf32(make_multiboot_elf32(kCode, kBootAreaStart).bytes);
  ASSERT_TRUE(boot.ok());
  auto r = check_image_fits(*boot, 64 * kMiB);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("reserved"), std::string::npos) << r.error().message;
}

TEST(KernelImage, RejectsEntryOutsideSegments) {
  auto t = make_multiboot_elf32(kCode);
  set32(t.bytes, 24, 0x500000);  // e_entry
  auto image = parse_multiboot_elf32(t.bytes);
  ASSERT_TRUE(image.ok());
  auto r = check_image_fits(*image, 64 * kMiB);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("entry point"), std::string::npos) << r.error().message;
}

TEST(Elf64Loader, ParsesValidAndRejectsBad) {
  auto t = make_elf64(kCode, 0x200000);
  auto image = parse_elf64(t.bytes);
  ASSERT_TRUE(image.ok()) << image.error().message;
  EXPECT_EQ(image->entry, t.entry);
  EXPECT_EQ(image->segments[0].gpa, 0x200000u);
  EXPECT_FALSE(parse_elf64(make_multiboot_elf32(kCode).bytes).ok());
  auto trunc = t;
  trunc.bytes.resize(40);
  EXPECT_FALSE(parse_elf64(trunc.bytes).ok());
  auto wrong = t;
  wrong.bytes[18] = 3;  // EM_386
  EXPECT_FALSE(parse_elf64(wrong.bytes).ok());
}

TEST(Elf64Loader, IdentityPageTablesCoverRamAndTheApicHole) {
  constexpr uint64_t base = kPageTables;
  auto small = build_identity_page_tables(base, kPageTablesEnd, 256 * kMiB);
  ASSERT_TRUE(small.ok());
  EXPECT_EQ(small->size(), (2 + 4) * kPageSize);  // always maps 4 GiB: the LAPIC at 0xfee00000
  auto big = build_identity_page_tables(base, kPageTablesEnd, 8 * kGiB);
  ASSERT_TRUE(big.ok());
  EXPECT_EQ(big->size(), (2 + 9) * kPageSize);  // 8 GiB RAM ends at 9 GiB
  auto entry = [&](size_t i) {
    uint64_t v;
    std::memcpy(&v, big->data() + i * 8, 8);
    return v;
  };
  EXPECT_EQ(entry(0), (base + kPageSize) | 3);        // PML4[0] -> PDPT
  EXPECT_EQ(entry(512 + 3), (base + 5 * kPageSize) | 3);  // PDPT[3] -> 4th directory
  // The 2 MiB page holding the xAPIC, in directory 3, entry (0xfee00000 - 3 GiB) / 2 MiB.
  size_t apic = 1024 + 3 * 512 + (0xfee00000 - 3 * kGiB) / kHugePageSize;
  EXPECT_EQ(entry(apic), 0xfee00000ull | 0x83);
  EXPECT_FALSE(build_identity_page_tables(base, kPageTablesEnd, 200 * kGiB).ok());
}

}  // namespace
}  // namespace kvmig::kvm
