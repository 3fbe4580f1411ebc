// vCPU and VM state sections on real KVM, through raw fds: set distinctive state in one VM,
// save it, restore it into a fresh VM, and check the fresh VM has it (and runs on from it).
#include "kvm/kvm_uapi.h"  // first: fixes <linux/kvm.h> layouts for C++

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include "base/fd.h"
#include "kvm/vcpu_state.h"
#include "kvm/vm_state.h"

namespace kvmig::kvm {
namespace {

constexpr uint32_t kMsrTsc = 0x10;
constexpr uint32_t kMsrKernelGsBase = 0xc0000102;
constexpr uint32_t kMsrLstar = 0xc0000082;
constexpr uint32_t kMsrPat = 0x277;
constexpr size_t kMem = 2 << 20;

// A VM with one vCPU, an irqchip, a PIT and 2 MiB of RAM at 0, built with raw ioctls.
struct RawVm {
  Fd vm, vcpu;
  uint8_t* mem = nullptr;
  kvm_run* run = nullptr;
  int run_size = 0;

  ~RawVm() {
    if (mem) munmap(mem, kMem);
    if (run) munmap(run, run_size);
  }

  void build(int kvm_fd) {
    vm.reset(ioctl(kvm_fd, KVM_CREATE_VM, 0));
    ASSERT_TRUE(vm.valid()) << strerror(errno);
    ASSERT_EQ(ioctl(vm.get(), KVM_SET_TSS_ADDR, 0xfffbd000UL), 0) << strerror(errno);
    ASSERT_EQ(ioctl(vm.get(), KVM_CREATE_IRQCHIP, 0), 0) << strerror(errno);
    kvm_pit_config pit{};
    ASSERT_EQ(ioctl(vm.get(), KVM_CREATE_PIT2, &pit), 0) << strerror(errno);
    mem = static_cast<uint8_t*>(
        mmap(nullptr, kMem, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    ASSERT_NE(mem, MAP_FAILED);
    kvm_userspace_memory_region region{0, 0, 0, kMem, reinterpret_cast<uint64_t>(mem)};
    ASSERT_EQ(ioctl(vm.get(), KVM_SET_USER_MEMORY_REGION, &region), 0) << strerror(errno);
    vcpu.reset(ioctl(vm.get(), KVM_CREATE_VCPU, 0));
    ASSERT_TRUE(vcpu.valid()) << strerror(errno);
    // KVM's supported CPUID as is: enough for XSAVE and the MSRs this test uses.
    // struct kvm_cpuid2 with room for 256 entries.
    std::vector<uint64_t> cpuid(1 + 256 * sizeof(kvm_cpuid_entry2) / 8, 0);
    *reinterpret_cast<uint32_t*>(cpuid.data()) = 256;
    ASSERT_EQ(ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid.data()), 0) << strerror(errno);
    ASSERT_EQ(ioctl(vcpu.get(), KVM_SET_CPUID2, cpuid.data()), 0) << strerror(errno);
    run_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    run = static_cast<kvm_run*>(
        mmap(nullptr, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu.get(), 0));
    ASSERT_NE(run, MAP_FAILED);
  }

  std::map<uint32_t, uint64_t> msrs(const std::vector<uint32_t>& indices) {
    // struct kvm_msrs: count, pad, entries.
    std::vector<uint64_t> buf(1 + 2 * indices.size(), 0);
    buf[0] = indices.size();
    auto* e = reinterpret_cast<kvm_msr_entry*>(buf.data() + 1);
    for (size_t i = 0; i < indices.size(); ++i) e[i].index = indices[i];
    EXPECT_EQ(ioctl(vcpu.get(), KVM_GET_MSRS, buf.data()), static_cast<int>(indices.size()));
    std::map<uint32_t, uint64_t> out;
    for (size_t i = 0; i < indices.size(); ++i) out[indices[i]] = e[i].data;
    return out;
  }
  void set_msr(uint32_t index, uint64_t value) {
    std::vector<uint64_t> buf(3, 0);
    buf[0] = 1;
    auto* e = reinterpret_cast<kvm_msr_entry*>(buf.data() + 1);
    e->index = index;
    e->data = value;
    ASSERT_EQ(ioctl(vcpu.get(), KVM_SET_MSRS, buf.data()), 1) << std::hex << index;
  }
};

template <class T>
T get(int fd, unsigned long req) {
  T v{};
  EXPECT_EQ(ioctl(fd, req, &v), 0) << strerror(errno);
  return v;
}

class VcpuStateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (access("/dev/kvm", R_OK | W_OK) != 0) GTEST_SKIP() << "/dev/kvm not available";
    kvm_.reset(open("/dev/kvm", O_RDWR | O_CLOEXEC));
    ASSERT_TRUE(kvm_.valid()) << strerror(errno);
    a_.build(kvm_.get());
    b_.build(kvm_.get());
    auto caps = probe_vcpu_state_caps(a_.vm.get());
    ASSERT_TRUE(caps.ok()) << caps.error().message;
    caps_ = *caps;
    auto msrs = migratable_msrs(kvm_.get(), a_.vcpu.get());
    ASSERT_TRUE(msrs.ok()) << msrs.error().message;
    msrs_ = *msrs;
  }

  Fd kvm_;
  RawVm a_, b_;
  VcpuStateCaps caps_;
  std::vector<uint32_t> msrs_;
};

TEST_F(VcpuStateTest, MsrListHasTheTscAndSyscallMsrs) {
  auto has = [&](uint32_t i) { return std::find(msrs_.begin(), msrs_.end(), i) != msrs_.end(); };
  EXPECT_TRUE(has(kMsrTsc));
  EXPECT_TRUE(has(kMsrKernelGsBase));
  EXPECT_TRUE(has(kMsrLstar));
  EXPECT_TRUE(has(kMsrPat));
}

TEST_F(VcpuStateTest, RoundTripCarriesEveryPartAndTheVcpuRunsOn) {
  // Distinctive state in A: real mode at 0x1000 running "inc ax; out 0x10, al; hlt".
  const uint8_t code[] = {0x40, 0xe6, 0x10, 0xf4};
  std::memcpy(a_.mem + 0x1000, code, sizeof(code));
  std::memcpy(b_.mem + 0x1000, code, sizeof(code));
  auto sregs = get<kvm_sregs>(a_.vcpu.get(), KVM_GET_SREGS);
  sregs.cs.base = 0;
  sregs.cs.selector = 0;
  ASSERT_EQ(ioctl(a_.vcpu.get(), KVM_SET_SREGS, &sregs), 0);
  kvm_regs regs{};
  regs.rip = 0x1000;
  regs.rax = 0x41;
  regs.rbx = 0x1122334455667788;
  regs.rflags = 2;
  ASSERT_EQ(ioctl(a_.vcpu.get(), KVM_SET_REGS, &regs), 0);
  auto fpu = get<kvm_fpu>(a_.vcpu.get(), KVM_GET_FPU);
  for (int i = 0; i < 16; ++i) fpu.xmm[3][i] = static_cast<uint8_t>(0xa0 + i);
  ASSERT_EQ(ioctl(a_.vcpu.get(), KVM_SET_FPU, &fpu), 0);
  kvm_debugregs dbg = get<kvm_debugregs>(a_.vcpu.get(), KVM_GET_DEBUGREGS);
  dbg.db[1] = 0x4000;
  ASSERT_EQ(ioctl(a_.vcpu.get(), KVM_SET_DEBUGREGS, &dbg), 0);
  a_.set_msr(kMsrKernelGsBase, 0x12345678);
  a_.set_msr(kMsrLstar, 0xffffffff81000000);
  a_.set_msr(kMsrPat, 0x0007040600070406ull ^ 0x1);
  const uint64_t tsc = 1'000'000'000'000ull;
  a_.set_msr(kMsrTsc, tsc);

  const uint64_t tsc_before_save = a_.msrs({kMsrTsc})[kMsrTsc];
  auto section = save_vcpu(a_.vcpu.get(), 0, msrs_, caps_);
  ASSERT_TRUE(section.ok()) << section.error().message;
  EXPECT_EQ(section->id, "vcpu.0");
  auto restored = restore_vcpu(b_.vcpu.get(), *section, caps_);
  ASSERT_TRUE(restored.ok()) << restored.error().message;

  auto ra = get<kvm_regs>(a_.vcpu.get(), KVM_GET_REGS), rb = get<kvm_regs>(b_.vcpu.get(), KVM_GET_REGS);
  EXPECT_EQ(std::memcmp(&ra, &rb, sizeof(ra)), 0);
  auto sa = get<kvm_sregs>(a_.vcpu.get(), KVM_GET_SREGS), sb = get<kvm_sregs>(b_.vcpu.get(), KVM_GET_SREGS);
  EXPECT_EQ(std::memcmp(&sa, &sb, sizeof(sa)), 0);
  auto fb = get<kvm_fpu>(b_.vcpu.get(), KVM_GET_FPU);
  EXPECT_EQ(std::memcmp(fb.xmm[3], fpu.xmm[3], 16), 0);
  EXPECT_EQ(get<kvm_debugregs>(b_.vcpu.get(), KVM_GET_DEBUGREGS).db[1], 0x4000u);
  auto la = get<kvm_lapic_state>(a_.vcpu.get(), KVM_GET_LAPIC);
  auto lb = get<kvm_lapic_state>(b_.vcpu.get(), KVM_GET_LAPIC);
  EXPECT_EQ(std::memcmp(&la, &lb, sizeof(la)), 0);
  EXPECT_EQ(get<kvm_mp_state>(b_.vcpu.get(), KVM_GET_MP_STATE).mp_state,
            get<kvm_mp_state>(a_.vcpu.get(), KVM_GET_MP_STATE).mp_state);
  if (caps_.xcrs) {
    auto xa = get<kvm_xcrs>(a_.vcpu.get(), KVM_GET_XCRS), xb = get<kvm_xcrs>(b_.vcpu.get(), KVM_GET_XCRS);
    EXPECT_EQ(std::memcmp(&xa, &xb, sizeof(xa)), 0);
  }

  auto ma = a_.msrs(msrs_), mb = b_.msrs(msrs_);
  EXPECT_EQ(mb[kMsrKernelGsBase], 0x12345678u);
  EXPECT_EQ(mb[kMsrLstar], 0xffffffff81000000u);
  for (uint32_t index : msrs_) {
    if (index == kMsrTsc) continue;
    EXPECT_EQ(ma[index], mb[index]) << "MSR " << std::hex << index;
  }
  // The TSC carried over: not behind the saved value (a fresh vCPU's TSC starts near 0 on
  // hardware KVM), and not ahead of A's by more than the time since. (kvm-pvm ignores host
  // TSC writes and gives every guest the host TSC, which passes for the same reason.)
  uint64_t khz = ioctl(b_.vcpu.get(), KVM_GET_TSC_KHZ, 0);
  EXPECT_GE(mb[kMsrTsc], tsc_before_save);
  EXPECT_LT(mb[kMsrTsc], ma[kMsrTsc] + 5 * khz * 1000) << "more than 5 s of TSC gained";

  // And B runs on from A's registers: inc ax makes 0x42 and it leaves through port 0x10.
  ASSERT_EQ(ioctl(b_.vcpu.get(), KVM_RUN, 0), 0) << strerror(errno);
  ASSERT_EQ(b_.run->exit_reason, KVM_EXIT_IO);
  EXPECT_EQ(b_.run->io.port, 0x10);
  EXPECT_EQ(reinterpret_cast<uint8_t*>(b_.run)[b_.run->io.data_offset], 0x42);
}

TEST_F(VcpuStateTest, MalformedSectionsAreRefusedBeforeAnyChange) {
  auto section = save_vcpu(a_.vcpu.get(), 0, msrs_, caps_);
  ASSERT_TRUE(section.ok());
  auto before = get<kvm_regs>(b_.vcpu.get(), KVM_GET_REGS);

  auto expect_error = [&](StateSection s, const std::string& want) {
    auto r = restore_vcpu(b_.vcpu.get(), s, caps_);
    ASSERT_FALSE(r.ok()) << want;
    EXPECT_NE(r.error().message.find(want), std::string::npos) << r.error().message;
    auto after = get<kvm_regs>(b_.vcpu.get(), KVM_GET_REGS);
    EXPECT_EQ(std::memcmp(&before, &after, sizeof(before)), 0) << "state changed for: " << want;
  };
  StateSection s = *section;
  s.data.resize(s.data.size() - 1);
  expect_error(s, "too short");
  s = *section;
  s.version = 2;
  expect_error(s, "unsupported version 2");
  s = *section;
  s.data[0] = 99;  // first record's tag
  expect_error(s, "unknown record tag 99");
  s = *section;
  s.data[4] += 8;  // regs record claims 8 more bytes, so the records after it shift
  expect_error(s, "");
  // Drop the regs record (the first): required.
  s = *section;
  uint32_t len;
  std::memcpy(&len, &s.data[4], 4);
  s.data.erase(s.data.begin(), s.data.begin() + 8 + len);
  expect_error(s, "missing record regs");
  // Duplicate the regs record.
  s = *section;
  s.data.insert(s.data.end(), section->data.begin(), section->data.begin() + 8 + len);
  expect_error(s, "duplicate record regs");
}

TEST_F(VcpuStateTest, ClockIrqchipAndPitRoundTrip) {
  kvm_clock_data clock{};
  clock.clock = 5'000'000'000ull;
  ASSERT_EQ(ioctl(a_.vm.get(), KVM_SET_CLOCK, &clock), 0) << strerror(errno);
  kvm_irqchip ioapic{};
  ioapic.chip_id = KVM_IRQCHIP_IOAPIC;
  ASSERT_EQ(ioctl(a_.vm.get(), KVM_GET_IRQCHIP, &ioapic), 0);
  ioapic.chip.ioapic.redirtbl[3].bits = 0x10033;  // masked, vector 0x33
  ASSERT_EQ(ioctl(a_.vm.get(), KVM_SET_IRQCHIP, &ioapic), 0);
  kvm_pit_state2 pit{};
  ASSERT_EQ(ioctl(a_.vm.get(), KVM_GET_PIT2, &pit), 0);
  pit.channels[2].count = 0x1234;
  pit.channels[2].mode = 3;
  ASSERT_EQ(ioctl(a_.vm.get(), KVM_SET_PIT2, &pit), 0);

  auto c = save_clock(a_.vm.get());
  auto i = save_irqchip(a_.vm.get());
  auto p = save_pit(a_.vm.get());
  ASSERT_TRUE(c.ok() && i.ok() && p.ok());
  ASSERT_TRUE(restore_clock(b_.vm.get(), *c).ok());
  ASSERT_TRUE(restore_irqchip(b_.vm.get(), *i).ok());
  ASSERT_TRUE(restore_pit(b_.vm.get(), *p).ok());

  auto cb = get<kvm_clock_data>(b_.vm.get(), KVM_GET_CLOCK);
  EXPECT_GE(cb.clock, 5'000'000'000ull);
  EXPECT_LT(cb.clock, 6'000'000'000ull);
  kvm_irqchip got{};
  got.chip_id = KVM_IRQCHIP_IOAPIC;
  ASSERT_EQ(ioctl(b_.vm.get(), KVM_GET_IRQCHIP, &got), 0);
  EXPECT_EQ(got.chip.ioapic.redirtbl[3].bits, 0x10033u);
  auto pb = get<kvm_pit_state2>(b_.vm.get(), KVM_GET_PIT2);
  EXPECT_EQ(pb.channels[2].count, 0x1234u);
  EXPECT_EQ(pb.channels[2].mode, 3);

  StateSection bad = *i;
  bad.data.pop_back();
  auto r = restore_irqchip(b_.vm.get(), bad);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("section 'irqchip': 1559 bytes, expected 1560"), std::string::npos)
      << r.error().message;
  bad = *i;
  bad.data[0] = 2;  // the first entry claims to be the IOAPIC
  EXPECT_FALSE(restore_irqchip(b_.vm.get(), bad).ok());
}

}  // namespace
}  // namespace kvmig::kvm
