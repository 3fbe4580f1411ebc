// Whole-machine save and restore with the test guest: the guest runs a while, is saved,
// and a new kvmig process restores it; the guest must carry on as if nothing happened
// (pass counter continues, no corrupt page, TSC not backwards), and a damaged state file
// must be refused with a one-line error.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kvm/machine.h"
#include "kvm/machine_snapshot.h"
#include "test_util.h"

namespace kvmig::kvm {
namespace {

// At rate=640 MiB/s a pass over 16 MiB takes ~25 ms: 60 passes leave time to save well
// before the end, and the whole test stays short.
constexpr uint64_t kPasses = 60;
const std::string kCmdline = "ws=16M pattern=random rate=640 report_ms=10 passes=" + std::to_string(kPasses);

struct Pass {
  uint64_t n = 0;
  uint64_t tsc = 0;
};

using test::read_file;

std::vector<Pass> passes_in(const std::string& text) {
  std::vector<Pass> out;
  static const std::regex re(R"(kvmig-guest: pass vcpu=0 n=(\d+) writes=\d+ errors=0 tsc=(\d+))");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), re); it != std::sregex_iterator(); ++it)
    out.push_back({std::stoull((*it)[1]), std::stoull((*it)[2])});
  return out;
}

// Runs kvmig with ARGS; returns its exit status, stderr in ERR.
int run_kvmig(const std::string& args, std::string* err) {
  test::CliRun r = test::run_kvmig(args);
  if (err) *err = r.err;
  return r.status;
}

class VmSaveRestoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (access("/dev/kvm", R_OK | W_OK) != 0) GTEST_SKIP() << "/dev/kvm not available";
    dir_ = test::make_temp_dir("kvmig-vm-save-restore");
    ASSERT_FALSE(dir_.empty());
  }
  void TearDown() override {
    if (!dir_.empty()) std::system(("rm -rf " + dir_).c_str());
  }

  // Boots the guest in this process, lets it complete at least MIN_PASSES passes, saves it
  // to STATE and ends it. Returns the last pass it reported before the save.
  Pass boot_and_save(const std::string& state, const std::string& cmdline, uint64_t min_passes) {
    MachineConfig config;
    config.memory = 256ull << 20;
    config.vcpus = 1;
    config.console_path = dir_ + "/console-before";
    auto m = Machine::create(config);
    EXPECT_TRUE(m.ok()) << m.error().message;
    if (!m.ok()) return {};
    Machine& vm = **m;
    std::mutex mu;
    std::string lines;
    vm.set_console_listener([&](std::string_view line) {
      std::lock_guard lock(mu);
      lines.append(line).append("\n");
    });
    auto loaded = vm.load_kernel(KVMIG_GUEST, cmdline);
    EXPECT_TRUE(loaded.ok()) << loaded.error().message;
    EXPECT_TRUE(vm.start().ok());
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (std::chrono::steady_clock::now() < deadline) {
      {
        std::lock_guard lock(mu);
        auto p = passes_in(lines);
        if (!p.empty() && p.back().n >= min_passes) break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    EXPECT_TRUE(vm.pause().ok());
    auto saved = save_machine(vm, state);
    EXPECT_TRUE(saved.ok()) << saved.error().message;
    vm.stop(0);
    (void)vm.wait();
    std::lock_guard lock(mu);
    EXPECT_EQ(lines.find("corrupt"), std::string::npos) << lines;
    auto p = passes_in(lines);
    EXPECT_FALSE(p.empty()) << "no pass before the save: " << lines;
    EXPECT_LT(p.empty() ? 0 : p.back().n, kPasses) << "the guest finished before it was saved";
    return p.empty() ? Pass{} : p.back();
  }

  // The restored guest's console: passes continue from BEFORE and the run ends in a pass.
  void expect_continues(const std::string& console, const Pass& before, uint64_t total) {
    std::string text = read_file(console);
    EXPECT_EQ(text.find("corrupt"), std::string::npos) << text;
    EXPECT_EQ(text.find("kvmig-guest: start"), std::string::npos) << "the guest rebooted: " << text;
    auto p = passes_in(text);
    ASSERT_FALSE(p.empty()) << text;
    EXPECT_GT(p.front().n, before.n);
    EXPECT_GT(p.front().tsc, before.tsc) << "TSC went backwards across save/restore";
    for (size_t i = 1; i < p.size(); ++i) EXPECT_GT(p[i].n, p[i - 1].n);
    EXPECT_NE(text.find("kvmig-guest: done result=pass passes=" + std::to_string(total) + " errors=0"),
              std::string::npos)
        << text;
  }

  std::string dir_;
};

TEST_F(VmSaveRestoreTest, RestoredGuestCarriesOnInANewProcess) {
  std::string state = dir_ + "/state";
  Pass before = boot_and_save(state, kCmdline, 20);
  std::string err;
  int rc = run_kvmig("vm restore " + state + " --console " + dir_ + "/console-after --no-control", &err);
  EXPECT_EQ(rc, 0) << err;
  expect_continues(dir_ + "/console-after", before, kPasses);
}

// The CLI path: a restored VM is saved again through its control socket by `kvmig vm save`,
// which ends it, and restored once more.
TEST_F(VmSaveRestoreTest, SaveThroughTheControlSocketAndRestoreAgain) {
  std::string state = dir_ + "/state", state2 = dir_ + "/state2", sock = dir_ + "/control.sock";
  Pass before = boot_and_save(state, kCmdline, 10);

  std::string first_err;
  std::thread first([&] {
    run_kvmig("vm restore " + state + " --console " + dir_ + "/console-mid --control " + sock, &first_err);
  });
  for (int i = 0; i < 200 && access(sock.c_str(), F_OK) != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  std::string err;
  int rc = run_kvmig("vm save --control " + sock + " --output " + state2, &err);
  first.join();
  ASSERT_EQ(rc, 0) << err;
  EXPECT_NE(err.find("kvmig: saved"), std::string::npos) << err;
  auto mid = passes_in(read_file(dir_ + "/console-mid"));
  ASSERT_FALSE(mid.empty()) << first_err;
  EXPECT_GT(mid.front().n, before.n);

  rc = run_kvmig("vm restore " + state2 + " --console " + dir_ + "/console-after --no-control", &err);
  EXPECT_EQ(rc, 0) << err;
  expect_continues(dir_ + "/console-after", mid.back(), kPasses);
}

TEST_F(VmSaveRestoreTest, DamagedStateFilesAreRefusedWithOneLine) {
  std::string state = dir_ + "/state";
  boot_and_save(state, kCmdline, 1);
  std::string bytes = read_file(state);
  ASSERT_GT(bytes.size(), 4096u);

  struct Case {
    const char* name;
    std::string content;
    const char* want;
  };
  std::string flipped = bytes;
  flipped[bytes.size() / 2] ^= 0x01;
  std::string bad_magic = bytes;
  bad_magic[1] = 'X';
  const Case cases[] = {
      {"truncated", bytes.substr(0, bytes.size() - 100), "truncated"},
      {"cut", bytes.substr(0, bytes.size() / 3), "truncated"},
      {"flipped", flipped, "checksum mismatch"},
      {"magic", bad_magic, "not a kvmig state file"},
  };
  for (const Case& c : cases) {
    std::string path = dir_ + "/" + c.name;
    std::ofstream(path, std::ios::binary) << c.content;
    std::string err;
    int rc = run_kvmig("vm restore " + path + " --console " + dir_ + "/console-bad --no-control", &err);
    EXPECT_NE(rc, 0) << c.name;
    EXPECT_NE(err.find(c.want), std::string::npos) << c.name << ": " << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << c.name << ": " << err;
    std::string console = read_file(dir_ + "/console-bad");
    EXPECT_EQ(console.find("kvmig-guest"), std::string::npos) << c.name << ": guest ran: " << console;
  }
  std::string err;
  EXPECT_NE(run_kvmig("vm restore " + dir_ + "/missing --no-control", &err), 0);
  EXPECT_NE(err.find("open state file"), std::string::npos) << err;
}

}  // namespace
}  // namespace kvmig::kvm
