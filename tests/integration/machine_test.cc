// The micro-VMM on real KVM: boot (ELF32 Multiboot and ELF64), console, exit status, SMP,
// pause/resume latency, and `kvmig vm run` errors. Tiny guests are assembled in the test;
// the project's test guest (KVMIG_GUEST) is used when it has been built.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "host/control_server.h"
#include "kvm/machine.h"
#include "test_util.h"
#include "unit/elf_builder.h"

namespace kvmig::kvm {
namespace {

using namespace std::chrono_literals;

bool have_kvm() { return ::access("/dev/kvm", R_OK | W_OK) == 0; }
#define REQUIRE_KVM() \
  if (!have_kvm()) GTEST_SKIP() << "/dev/kvm is not available"

// One directory per test process, removed when the process ends: the files are small guest
// images and console captures, read back by the test that wrote them.
struct TempDir {
  std::string path = kvmig::test::make_temp_dir("kvmig-machine-test");
  ~TempDir() {
    if (!path.empty()) std::filesystem::remove_all(path);
  }
};

std::string temp_path(const std::string& name) {
  static TempDir dir;
  return dir.path + "/" + name;
}

std::string write_temp(const std::string& name, const std::vector<uint8_t>& bytes) {
  std::string path = temp_path(name);
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  return path;
}

std::string guest64_path() {
  std::string p = KVMIG_GUEST;
  return p.substr(0, p.rfind("kvmig-guest.elf")) + "kvmig-guest64.elf";
}

std::unique_ptr<Machine> make_machine(uint64_t memory, int vcpus = 1, const std::string& console = "") {
  MachineConfig config;
  config.memory = memory;
  config.vcpus = vcpus;
  config.console_path = console.empty() ? temp_path("console") : console;
  auto m = Machine::create(config);
  EXPECT_TRUE(m.ok()) << m.error().message;
  return m.ok() ? std::move(*m) : nullptr;
}

// Collects console lines from a running machine.
struct Lines {
  std::mutex mu;
  std::vector<std::string> lines;
  void attach(Machine& m) {
    m.set_console_listener([this](std::string_view line) {
      std::lock_guard lock(mu);
      lines.emplace_back(line);
    });
  }
  int count(const std::string& needle) {
    std::lock_guard lock(mu);
    int n = 0;
    for (const auto& l : lines) n += l.find(needle) != std::string::npos;
    return n;
  }
  std::string all() {
    std::lock_guard lock(mu);
    std::string s;
    for (const auto& l : lines) s += l + "\n";
    return s;
  }
};

TEST(Machine, Elf32GuestPrintsAndExitsWithItsStatus) {
  REQUIRE_KVM();
  auto kernel = write_temp("k32", test::make_multiboot_elf32(test::code_print_and_exit("hello\n", 3)).bytes);
  std::string console = temp_path("c32");
  auto m = make_machine(64 * kMiB, 1, console);
  ASSERT_TRUE(m);
  ASSERT_TRUE(m->load_kernel(kernel, "a=b").ok());
  EXPECT_NE(m->cmdline().find("a=b tsc_khz="), std::string::npos) << m->cmdline();
  ASSERT_TRUE(m->start().ok());
  auto status = m->wait();
  ASSERT_TRUE(status.ok()) << status.error().message;
  EXPECT_EQ(*status, 3);
  EXPECT_EQ(test::read_file(console), "hello\n");
  auto s = m->stats();
  EXPECT_GE(s.exits_io, 7u);
  EXPECT_GE(s.first_console_byte_us, 0);
  EXPECT_EQ(s.unknown_io, 0u);
}

TEST(Machine, Elf64GuestEntersLongMode) {
  REQUIRE_KVM();
  auto kernel = write_temp("k64", test::make_elf64(test::code_print_and_exit("64\n", 5)).bytes);
  auto m = make_machine(64 * kMiB);
  ASSERT_TRUE(m);
  ASSERT_TRUE(m->load_kernel(kernel, "").ok());
  auto sregs = m->vcpus()[0]->get_sregs();
  ASSERT_TRUE(sregs.ok());
  EXPECT_TRUE(sregs->efer & 0x400) << "long mode active";
  EXPECT_TRUE(sregs->cr0 & 0x80000000u) << "paging on";
  ASSERT_TRUE(m->start().ok());
  auto status = m->wait();
  ASSERT_TRUE(status.ok()) << status.error().message;
  EXPECT_EQ(*status, 5);
}

TEST(Machine, TripleFaultIsAnErrorWithRegisters) {
  REQUIRE_KVM();
  // lidt with a zero limit, then int3: no IDT -> #GP -> #DF -> shutdown.
  std::vector<uint8_t> code = {0x0f, 0x01, 0x1d, 0x00, 0x00, 0x00, 0x00,  // lidt [0] (6 zero bytes at 0)
                               0xcc};
  auto kernel = write_temp("ktf", test::make_multiboot_elf32(code).bytes);
  auto m = make_machine(64 * kMiB);
  ASSERT_TRUE(m);
  ASSERT_TRUE(m->load_kernel(kernel, "").ok());
  ASSERT_TRUE(m->start().ok());
  auto status = m->wait();
  ASSERT_FALSE(status.ok());
  // Hardware KVM reports the triple fault as KVM_EXIT_SHUTDOWN; an emulating KVM (PVM runs
  // CPL0 code in its emulator) may stop first with an emulation failure. Either ends the VM
  // with an error that shows where the guest was.
  const std::string& msg = status.error().message;
  EXPECT_TRUE(msg.find("triple fault") != std::string::npos || msg.find("internal error") != std::string::npos) << msg;
  EXPECT_NE(status.error().message.find("rip="), std::string::npos);
}

TEST(Machine, PauseStopsTheGuestWithBoundedLatencyAndResumeContinues) {
  REQUIRE_KVM();
  constexpr uint32_t kCounter = 0x200000;
  auto kernel = write_temp("kcount", test::make_multiboot_elf32(test::code_print_then_count("go\n", kCounter)).bytes);
  auto m = make_machine(64 * kMiB);
  ASSERT_TRUE(m);
  ASSERT_TRUE(m->load_kernel(kernel, "").ok());
  auto* counter = reinterpret_cast<volatile uint32_t*>(m->memory().host_ptr(kCounter, 4));
  ASSERT_NE(counter, nullptr);
  ASSERT_TRUE(m->start().ok());
  for (int i = 0; i < 200 && *counter == 0; ++i) std::this_thread::sleep_for(5ms);
  ASSERT_GT(*counter, 0u) << "guest never ran";

  for (int round = 0; round < 10; ++round) {
    ASSERT_TRUE(m->pause().ok());
    EXPECT_TRUE(m->paused());
    uint32_t frozen = *counter;
    std::this_thread::sleep_for(20ms);
    EXPECT_EQ(*counter, frozen) << "guest ran while paused";
    ASSERT_TRUE(m->resume().ok());
    for (int i = 0; i < 200 && *counter == frozen; ++i) std::this_thread::sleep_for(1ms);
    EXPECT_NE(*counter, frozen) << "guest did not resume";
  }
  auto s = m->stats();
  EXPECT_EQ(s.pauses, 10u);
  EXPECT_GT(s.pause_max_us, 0);
  EXPECT_LT(s.pause_max_us, 100000) << "pause took more than 100 ms";
  EXPECT_LE(s.pause_min_us, s.pause_avg_us);
  m->stop(0);
  auto status = m->wait();
  ASSERT_TRUE(status.ok()) << status.error().message;
  EXPECT_EQ(*status, 0);
}

TEST(Machine, TooMuchMemoryIsAClearError) {
  REQUIRE_KVM();
  MachineConfig config;
  config.memory = 64ull * 1024 * kGiB;
  auto m = Machine::create(config);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.error().message.find("exceeds the host's available memory"), std::string::npos) << m.error().message;
}

TEST(TestGuest, BootsReportsAndPasses) {
  REQUIRE_KVM();
  if (::access(KVMIG_GUEST, R_OK) != 0) GTEST_SKIP() << "test guest not built: " << KVMIG_GUEST;
  auto m = make_machine(128 * kMiB);
  ASSERT_TRUE(m);
  Lines lines;
  lines.attach(*m);
  ASSERT_TRUE(m->load_kernel(KVMIG_GUEST, "ws=8M passes=2").ok());
  ASSERT_TRUE(m->start().ok());
  auto status = m->wait();
  ASSERT_TRUE(status.ok()) << status.error().message;
  EXPECT_EQ(*status, 0) << lines.all();
  EXPECT_EQ(lines.count("kvmig-guest: start vcpus=1 ws_pages=2048"), 1) << lines.all();
  EXPECT_EQ(lines.count("kvmig-guest: done result=pass passes=2 errors=0"), 1) << lines.all();
}

TEST(TestGuest, Elf64BuildBootsInLongMode) {
  REQUIRE_KVM();
  if (::access(guest64_path().c_str(), R_OK) != 0) GTEST_SKIP() << "64-bit test guest not built";
  auto m = make_machine(128 * kMiB);
  ASSERT_TRUE(m);
  Lines lines;
  lines.attach(*m);
  ASSERT_TRUE(m->load_kernel(guest64_path(), "ws=8M passes=1").ok());
  ASSERT_TRUE(m->start().ok());
  auto status = m->wait();
  ASSERT_TRUE(status.ok()) << status.error().message;
  EXPECT_EQ(*status, 0) << lines.all();
  EXPECT_EQ(lines.count("done result=pass"), 1) << lines.all();
}

TEST(TestGuest, TwoVcpusBothWorkAndSurvivePauses) {
  REQUIRE_KVM();
  if (::access(KVMIG_GUEST, R_OK) != 0) GTEST_SKIP() << "test guest not built: " << KVMIG_GUEST;
  auto m = make_machine(128 * kMiB, 2);
  ASSERT_TRUE(m);
  Lines lines;
  lines.attach(*m);
  ASSERT_TRUE(m->load_kernel(KVMIG_GUEST, "vcpus=2 ws=16M passes=60 report_ms=1").ok());
  ASSERT_TRUE(m->start().ok());
  // Pause while both vCPUs write: after resume, every page and the TSC must still verify.
  for (int i = 0; i < 200 && lines.count("kvmig-guest: pass vcpu=1") == 0; ++i) std::this_thread::sleep_for(10ms);
  for (int i = 0; i < 5; ++i) {
    auto paused = m->pause();
    ASSERT_TRUE(paused.ok()) << paused.error().message << "\n" << lines.all();
    std::this_thread::sleep_for(10ms);
    ASSERT_TRUE(m->resume().ok());
    std::this_thread::sleep_for(10ms);
  }
  auto status = m->wait();
  ASSERT_TRUE(status.ok()) << status.error().message;
  EXPECT_EQ(*status, 0) << lines.all();
  EXPECT_GE(lines.count("kvmig-guest: pass vcpu=0"), 1) << lines.all();
  EXPECT_GE(lines.count("kvmig-guest: pass vcpu=1"), 1) << lines.all();
  EXPECT_EQ(lines.count("kvmig-guest: start vcpus=2"), 1) << lines.all();
  EXPECT_EQ(lines.count("done result=pass"), 1) << lines.all();
  EXPECT_LT(m->stats().pause_max_us, 100000);
}

// --- the CLI ---

int count_lines(const std::string& s) { return static_cast<int>(std::count(s.begin(), s.end(), '\n')); }

TEST(VmRunCli, ExitStatusIsTheGuests) {
  REQUIRE_KVM();
  auto kernel = write_temp("cli-ok", test::make_multiboot_elf32(test::code_print_and_exit("x\n", 9)).bytes);
  auto r = test::run_kvmig("vm run --no-control --memory 64M --kernel " + kernel);
  EXPECT_EQ(r.status, 9) << r.err;
}

TEST(VmRunCli, BadKernelsGiveOneLineErrors) {
  REQUIRE_KVM();
  auto t = test::make_multiboot_elf32(test::code_print_and_exit("x", 0));
  auto truncated = t;
  truncated.bytes.resize(20);
  auto no_mb = t;
  no_mb.bytes[t.multiboot_offset] = 0;
  std::vector<std::pair<std::string, std::string>> cases = {
      {write_temp("bad-trunc", truncated.bytes), "truncated ELF header"},
      {write_temp("bad-text", std::vector<uint8_t>(100, 'a')), "not an ELF"},
      {write_temp("bad-nomb", no_mb.bytes), "no Multiboot header"},
      {write_temp("bad-high", test::make_multiboot_elf32(test::code_print_and_exit("x", 0), 0x20000000).bytes),
       "outside guest RAM"},
      {temp_path("does-not-exist"), "No such file"},
  };
  for (const auto& [path, want] : cases) {
    auto r = test::run_kvmig("vm run --no-control --memory 64M --kernel " + path);
    EXPECT_NE(r.status, 0) << path;
    EXPECT_EQ(count_lines(r.err), 1) << r.err;
    EXPECT_NE(r.err.find(want), std::string::npos) << "want '" << want << "' in: " << r.err;
  }
}

TEST(VmRunCli, BadMemoryGivesOneLineErrors) {
  REQUIRE_KVM();
  auto kernel = write_temp("cli-mem", test::make_multiboot_elf32(test::code_print_and_exit("x", 0)).bytes);
  for (const char* mem : {"100T", "12Q", "1M"}) {
    auto r = test::run_kvmig(std::string("vm run --no-control --memory ") + mem + " --kernel " + kernel);
    EXPECT_NE(r.status, 0) << mem;
    EXPECT_EQ(count_lines(r.err), 1) << r.err;
  }
}

TEST(VmRunCli, ControlSocketPausesResumesAndReportsStats) {
  REQUIRE_KVM();
  auto kernel = write_temp("cli-count", test::make_multiboot_elf32(test::code_print_then_count("go\n", 0x200000)).bytes);
  std::string sock = temp_path("ctl.sock");
  pid_t pid = fork();
  if (pid == 0) {
    execl(KVMIG_BINARY, KVMIG_BINARY, "vm", "run", "--memory", "64M", "--kernel", kernel.c_str(), "--control",
          sock.c_str(), "--console", "/dev/null", nullptr);
    _exit(127);
  }
  Result<nlohmann::json> stats = Error{"not tried"};
  for (int i = 0; i < 300; ++i) {
    stats = host::control_request(sock, {{"cmd", "stats"}});
    if (stats.ok()) break;
    std::this_thread::sleep_for(10ms);
  }
  ASSERT_TRUE(stats.ok()) << stats.error().message;
  EXPECT_EQ((*stats)["ok"], true);
  EXPECT_EQ((*stats)["vcpus"], 1);
  auto paused = host::control_request(sock, {{"cmd", "pause"}});
  ASSERT_TRUE(paused.ok());
  EXPECT_EQ((*paused)["ok"], true) << paused->dump();
  EXPECT_LT((*paused)["latency_us"].get<double>(), 100000);
  auto stats2 = host::control_request(sock, {{"cmd", "stats"}});
  ASSERT_TRUE(stats2.ok());
  EXPECT_EQ((*stats2)["paused"], true);
  EXPECT_EQ((*stats2)["pause"]["count"], 1);
  auto resumed = host::control_request(sock, {{"cmd", "resume"}});
  ASSERT_TRUE(resumed.ok());
  EXPECT_EQ((*resumed)["ok"], true);
  auto bad = host::control_request(sock, {{"cmd", "fly"}});
  ASSERT_TRUE(bad.ok());
  EXPECT_EQ((*bad)["ok"], false);

  kill(pid, SIGTERM);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 128 + SIGTERM);
  EXPECT_NE(::access(sock.c_str(), F_OK), 0) << "socket left behind";
}

}  // namespace
}  // namespace kvmig::kvm
