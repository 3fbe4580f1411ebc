// Pausing a vCPU in the middle of an instruction that exits to the VMM more than once, on
// real KVM. A pause re-enters KVM_RUN with immediate_exit so KVM completes the instruction
// the last exit belongs to; but a 4-byte MMIO write straddling a page boundary is two
// fragments, two exits, and completing the first one issues the second from that very
// re-entry. A vCPU that parks there drops it: the device never sees that part of the write
// (and a split MMIO read would complete with stale data). The guest makes a few thousand
// such writes while the host pauses and resumes it as fast as it can (a migration's vCPU
// throttle does the same, 50 times a second); every fragment must reach the VMM exactly once.
// The same for `rep outsb`, whose every byte is an exit: each must come out once, in order.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "kvm/machine.h"
#include "test_util.h"
#include "unit/elf_builder.h"

namespace kvmig::kvm {
namespace {

using namespace std::chrono_literals;

constexpr uint32_t kText = 0x300000;  // guest-physical address of the text
constexpr uint32_t kBytes = 6000;

// 32-bit flat code (Multiboot): rep outsb of [kText, +kBytes) to the console, then exit 0.
std::vector<uint8_t> code_rep_outsb() {
  std::vector<uint8_t> c;
  auto imm32 = [&](uint32_t v) {
    for (int i = 0; i < 4; ++i) c.push_back(static_cast<uint8_t>(v >> (8 * i)));
  };
  c.push_back(0xbe);  // mov esi, kText
  imm32(kText);
  c.push_back(0xb9);  // mov ecx, kBytes
  imm32(kBytes);
  c.insert(c.end(), {0x66, 0xba, 0xe9, 0x00});  // mov dx, 0xe9
  c.insert(c.end(), {0xfc, 0xf3, 0x6e});        // cld; rep outsb
  c.push_back(0xb8);                            // mov eax, 0
  imm32(0);
  c.insert(c.end(), {0xe7, 0xf4});              // out 0xf4, eax
  c.insert(c.end(), {0xf4, 0xeb, 0xfd});        // hlt; jmp hlt
  return c;
}

// Pauses and resumes `vm` as fast as a throttle would (irregular gaps, so pauses land on
// different exits) until done() or 60 s, or until the guest's exit ends the VM (pause then
// fails). Returns how many pauses landed.
template <class Done>
int pause_resume_until(Machine& vm, Done done) {
  int pauses = 0;
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (!done() && std::chrono::steady_clock::now() < deadline) {
    if (!vm.pause().ok()) break;
    ++pauses;
    std::this_thread::sleep_for(200us);
    if (!vm.resume().ok()) break;
    std::this_thread::sleep_for(std::chrono::microseconds(300 + pauses % 7 * 100));
  }
  return pauses;
}

TEST(VcpuPause, PausesInsideRepOutsbLoseNoByte) {
  if (::access("/dev/kvm", R_OK | W_OK) != 0) GTEST_SKIP() << "/dev/kvm is not available";
  const std::string dir = test::make_temp_dir("kvmig-pause-io");
  const std::string kernel = dir + "/k", console = dir + "/console";
  auto elf = test::make_multiboot_elf32(code_rep_outsb()).bytes;
  std::ofstream(kernel, std::ios::binary).write(reinterpret_cast<const char*>(elf.data()), elf.size());

  MachineConfig config;
  config.memory = 64ull << 20;
  config.console_path = console;
  auto m = Machine::create(config);
  ASSERT_TRUE(m.ok()) << m.error().message;
  Machine& vm = **m;
  ASSERT_TRUE(vm.load_kernel(kernel, "").ok());
  // No newline, so the console file gets the bytes as they come (every 4 KiB, and at exit).
  std::string text(kBytes, ' ');
  for (uint32_t i = 0; i < kBytes; ++i) text[i] = static_cast<char>('a' + (i * 7 + i / 26) % 26);
  uint8_t* host = vm.memory().host_ptr(kText, kBytes);
  ASSERT_NE(host, nullptr);
  std::copy(text.begin(), text.end(), host);

  ASSERT_TRUE(vm.start().ok());
  // Each pause lands on an exit of the rep outsb most of the time.
  const int pauses = pause_resume_until(vm, [&] { return vm.stats().console_bytes >= kBytes; });
  auto status = vm.wait();
  ASSERT_TRUE(status.ok()) << status.error().message;
  EXPECT_EQ(*status, 0);
  EXPECT_GT(pauses, 20) << "too few pauses landed during the instruction to prove anything";
  const std::string out = test::read_file(console);
  EXPECT_EQ(out.size(), text.size()) << "bytes lost or doubled across " << pauses << " pauses";
  EXPECT_TRUE(out == text) << "console differs from the text the guest wrote";
  std::filesystem::remove_all(dir);
}

// 32-bit flat code: `count` times a 4-byte write to MMIO that straddles a page boundary,
// which KVM splits in two fragments, each its own exit; then exit 0.
std::vector<uint8_t> code_split_mmio_writes(uint32_t count) {
  std::vector<uint8_t> c;
  auto imm32 = [&](uint32_t v) {
    for (int i = 0; i < 4; ++i) c.push_back(static_cast<uint8_t>(v >> (8 * i)));
  };
  c.push_back(0xb9);  // mov ecx, count
  imm32(count);
  c.push_back(0xb8);  // mov eax, 0x11223344
  imm32(0x11223344);
  c.push_back(0xa3);  // loop: mov [0x10000ffe], eax (no RAM there: MMIO)
  imm32(0x10000ffe);
  c.insert(c.end(), {0x49, 0x75, 0xf8});  // dec ecx; jnz loop
  c.push_back(0xb8);                      // mov eax, 0
  imm32(0);
  c.insert(c.end(), {0xe7, 0xf4});        // out 0xf4, eax
  c.insert(c.end(), {0xf4, 0xeb, 0xfd});  // hlt; jmp hlt
  return c;
}

// The second fragment's exit comes from the pause's completing re-entry: parked there, the
// write never reaches the device (and a split read would complete with stale data).
TEST(VcpuPause, PausesBetweenMmioFragmentsLoseNoFragment) {
  if (::access("/dev/kvm", R_OK | W_OK) != 0) GTEST_SKIP() << "/dev/kvm is not available";
  constexpr uint32_t kWrites = 3000;
  const std::string dir = test::make_temp_dir("kvmig-pause-mmio");
  const std::string kernel = dir + "/k";
  auto elf = test::make_multiboot_elf32(code_split_mmio_writes(kWrites)).bytes;
  std::ofstream(kernel, std::ios::binary).write(reinterpret_cast<const char*>(elf.data()), elf.size());
  MachineConfig config;
  config.memory = 64ull << 20;
  config.console_path = dir + "/console";
  auto m = Machine::create(config);
  ASSERT_TRUE(m.ok()) << m.error().message;
  Machine& vm = **m;
  ASSERT_TRUE(vm.load_kernel(kernel, "").ok());
  ASSERT_TRUE(vm.start().ok());
  const int pauses = pause_resume_until(vm, [&] { return vm.stats().unknown_mmio >= 2 * kWrites; });
  auto status = vm.wait();
  ASSERT_TRUE(status.ok()) << status.error().message;
  EXPECT_EQ(*status, 0);
  EXPECT_GT(pauses, 20) << "too few pauses landed during the writes to prove anything";
  EXPECT_EQ(vm.stats().unknown_mmio, 2 * kWrites) << "fragments lost or doubled across " << pauses << " pauses";
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace kvmig::kvm
