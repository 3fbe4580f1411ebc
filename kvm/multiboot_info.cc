#include "kvm/multiboot_info.h"

#include <cstring>

#include "kvm/boot_layout.h"
#include "kvm/guest_memory.h"

namespace kvmig::kvm {

namespace {

// Flags of the information structure (Multiboot 0.6.96, section 3.3).
constexpr uint32_t kInfoMemory = 1u << 0;
constexpr uint32_t kInfoCmdline = 1u << 2;
constexpr uint32_t kInfoMmap = 1u << 6;
constexpr uint32_t kInfoLoaderName = 1u << 9;

constexpr size_t kInfoSize = 120;  // up to and including the framebuffer fields
constexpr size_t kMmapEntrySize = 24;  // u32 size (=20), u64 addr, u64 len, u32 type

void put32(std::vector<uint8_t>& b, size_t off, uint32_t v) { std::memcpy(b.data() + off, &v, 4); }
void put64(std::vector<uint8_t>& b, size_t off, uint64_t v) { std::memcpy(b.data() + off, &v, 8); }

}  // namespace

std::vector<E820Entry> e820_map(uint64_t ram) {
  std::vector<E820Entry> map;
  uint64_t low_end = ram < kLowRamEnd ? ram : kLowRamEnd;
  map.push_back({0, kEbdaStart, 1});
  map.push_back({kEbdaStart, kBootAreaEnd - kEbdaStart, 2});
  if (low_end > kBootAreaEnd) map.push_back({kBootAreaEnd, low_end - kBootAreaEnd, 1});
  map.push_back({kIdentityMapAddr, kKvmPrivateEnd - kIdentityMapAddr, 2});
  if (ram > low_end) map.push_back({kHighRamStart, ram - low_end, 1});
  return map;
}

std::string with_tsc_khz(const std::string& cmdline, uint32_t khz) {
  if (khz == 0) return cmdline;
  // A key counts only at the start of a space-separated word.
  for (size_t pos = cmdline.find("tsc_khz="); pos != std::string::npos; pos = cmdline.find("tsc_khz=", pos + 1)) {
    if (pos == 0 || cmdline[pos - 1] == ' ') return cmdline;
  }
  std::string out = cmdline;
  if (!out.empty() && out.back() != ' ') out += ' ';
  return out + "tsc_khz=" + std::to_string(khz);
}

Result<std::vector<uint8_t>> build_multiboot_info(uint64_t base, uint64_t limit, uint64_t ram,
                                                  const std::string& cmdline) {
  if (cmdline.find('\0') != std::string::npos) return Error{"kernel command line contains a NUL byte"};
  std::vector<E820Entry> map = e820_map(ram);
  static const char kLoaderName[] = "kvmig";
  size_t mmap_off = kInfoSize;
  size_t mmap_len = map.size() * kMmapEntrySize;
  size_t name_off = mmap_off + mmap_len;
  size_t cmdline_off = name_off + sizeof(kLoaderName);
  size_t total = cmdline_off + cmdline.size() + 1;
  if (base + total > limit)
    return Error{"kernel command line is too long (" + std::to_string(cmdline.size()) + " bytes, at most " +
                 std::to_string(limit - base - cmdline_off - 1) + ")"};

  std::vector<uint8_t> b(total, 0);
  uint64_t low_end = ram < kLowRamEnd ? ram : kLowRamEnd;
  put32(b, 0, kInfoMemory | kInfoCmdline | kInfoMmap | kInfoLoaderName);
  put32(b, 4, static_cast<uint32_t>(kEbdaStart / 1024));                  // mem_lower, KiB
  put32(b, 8, static_cast<uint32_t>((low_end - kBootAreaEnd) / 1024));    // mem_upper, KiB from 1 MiB
  put32(b, 16, static_cast<uint32_t>(base + cmdline_off));
  put32(b, 44, static_cast<uint32_t>(mmap_len));
  put32(b, 48, static_cast<uint32_t>(base + mmap_off));
  put32(b, 64, static_cast<uint32_t>(base + name_off));
  for (size_t i = 0; i < map.size(); ++i) {
    size_t off = mmap_off + i * kMmapEntrySize;
    put32(b, off, kMmapEntrySize - 4);
    put64(b, off + 4, map[i].addr);
    put64(b, off + 12, map[i].len);
    put32(b, off + 20, map[i].type);
  }
  std::memcpy(b.data() + name_off, kLoaderName, sizeof(kLoaderName));
  std::memcpy(b.data() + cmdline_off, cmdline.data(), cmdline.size());
  return b;
}

}  // namespace kvmig::kvm
