// Save/restore with the test guest, the cases vm_save_restore_test does not cover: a guest
// with 2 vCPUs (APs saved while running at CPL3 and restored), and proof that the guest's own
// verification catches a page that a restore gets wrong, so a clean "done result=pass" after a
// migration means something.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <mutex>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "kvm/machine.h"
#include "kvm/machine_snapshot.h"
#include "kvm/state_file.h"

namespace kvmig::kvm {
namespace {

constexpr uint64_t kPageTagBase = 0x6b76000000000000ull;  // tests/guests/guest.h PAGE_TAG

// Console lines of a running machine, collected by its listener.
struct Console {
  std::mutex mu;
  std::string text;
  void attach(Machine& vm) {
    vm.set_console_listener([this](std::string_view line) {
      std::lock_guard lock(mu);
      text.append(line).append("\n");
    });
  }
  std::string get() {
    std::lock_guard lock(mu);
    return text;
  }
};

// Highest pass number vCPU CPU has reported in TEXT (0: none).
uint64_t last_pass(const std::string& text, int cpu) {
  std::regex re("kvmig-guest: pass vcpu=" + std::to_string(cpu) + " n=(\\d+) ");
  uint64_t n = 0;
  for (auto it = std::sregex_iterator(text.begin(), text.end(), re); it != std::sregex_iterator(); ++it)
    n = std::max<uint64_t>(n, std::stoull((*it)[1]));
  return n;
}

class VmRestoreVerifyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (access("/dev/kvm", R_OK | W_OK) != 0) GTEST_SKIP() << "/dev/kvm not available";
    char tmpl[] = "/tmp/kvmig-vm-restore-verify-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    if (!dir_.empty()) std::system(("rm -rf " + dir_).c_str());
  }

  // Boots the guest, waits until every vCPU reported pass MIN_PASS, saves it to STATE and
  // ends it. Returns its console.
  std::string boot_and_save(const std::string& state, int vcpus, const std::string& cmdline, uint64_t min_pass) {
    MachineConfig config;
    config.memory = 256ull << 20;
    config.vcpus = vcpus;
    config.console_path = "/dev/null";
    auto m = Machine::create(config);
    EXPECT_TRUE(m.ok()) << m.error().message;
    if (!m.ok()) return {};
    Machine& vm = **m;
    Console console;
    console.attach(vm);
    auto loaded = vm.load_kernel(KVMIG_GUEST, cmdline);
    EXPECT_TRUE(loaded.ok()) << loaded.error().message;
    EXPECT_TRUE(vm.start().ok());
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    auto all_there = [&] {
      std::string t = console.get();
      for (int c = 0; c < vcpus; ++c)
        if (last_pass(t, c) < min_pass) return false;
      return true;
    };
    while (!all_there() && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    EXPECT_TRUE(vm.pause().ok());
    auto saved = save_machine(vm, state);
    EXPECT_TRUE(saved.ok()) << saved.error().message;
    vm.stop(0);
    (void)vm.wait();
    std::string text = console.get();
    EXPECT_TRUE(all_there()) << "the guest did not get far enough: " << text;
    EXPECT_EQ(text.find("kvmig-guest: done"), std::string::npos) << "finished before the save: " << text;
    return text;
  }

  // Restores STATE into a new machine and runs it to its end; returns the exit status.
  int restore_and_run(const std::string& state, std::string* console_text) {
    auto reader = StateFileReader::open(state);
    EXPECT_TRUE(reader.ok()) << reader.error().message;
    if (!reader.ok()) return -1;
    auto config = read_machine_config(*reader);
    EXPECT_TRUE(config.ok()) << config.error().message;
    if (!config.ok()) return -1;
    config->console_path = "/dev/null";
    auto m = Machine::create(*config);
    EXPECT_TRUE(m.ok()) << m.error().message;
    if (!m.ok()) return -1;
    Machine& vm = **m;
    auto restored = restore_machine(*reader, vm);
    EXPECT_TRUE(restored.ok()) << restored.error().message;
    if (!restored.ok()) return -1;
    Console console;
    console.attach(vm);
    EXPECT_TRUE(vm.start().ok());
    auto status = vm.wait();
    *console_text = console.get();
    EXPECT_TRUE(status.ok()) << status.error().message;
    return status.ok() ? *status : -1;
  }

  std::string dir_;
};

TEST_F(VmRestoreVerifyTest, TwoVcpusCarryOnAfterRestore) {
  std::string state = dir_ + "/state";
  std::string before = boot_and_save(state, 2, "ws=16M pattern=random rate=640 report_ms=10 passes=60 vcpus=2", 8);
  std::string after;
  EXPECT_EQ(restore_and_run(state, &after), 0) << after;
  EXPECT_EQ(after.find("kvmig-guest: start"), std::string::npos) << "rebooted: " << after;
  EXPECT_EQ(after.find("corrupt"), std::string::npos) << after;
  EXPECT_EQ(after.find("kvmig-guest: error"), std::string::npos) << after;  // e.g. TSC went backwards
  for (int cpu = 0; cpu < 2; ++cpu) {
    // Both vCPUs go on from where they were, and both reach the last pass.
    std::regex first("kvmig-guest: pass vcpu=" + std::to_string(cpu) + " n=(\\d+) ");
    std::smatch m;
    ASSERT_TRUE(std::regex_search(after, m, first)) << "vCPU " << cpu << " silent: " << after;
    EXPECT_GT(std::stoull(m[1]), last_pass(before, cpu)) << "vCPU " << cpu;
    EXPECT_EQ(last_pass(after, cpu), 60u) << "vCPU " << cpu << ": " << after;
  }
  EXPECT_NE(after.find("kvmig-guest: done result=pass passes=60 errors=0"), std::string::npos) << after;
}

// Rewrites state file IN to OUT with one bit of one working-set page's version flipped, all
// checksums recomputed so the file is accepted. Returns the page index and its version.
std::pair<uint64_t, uint64_t> copy_with_flipped_page(const std::string& in, const std::string& out, uint64_t ws_pages) {
  auto r = StateFileReader::open(in);
  EXPECT_TRUE(r.ok()) << r.error().message;
  auto w = StateFileWriter::create(out);
  EXPECT_TRUE(w.ok()) << w.error().message;
  std::pair<uint64_t, uint64_t> flipped{~0ull, 0};
  if (!r.ok() || !w.ok()) return flipped;
  for (;;) {
    auto info = r->next();
    EXPECT_TRUE(info.ok()) << info.error().message;
    if (!info.ok() || info->id == kEndSectionId) break;
    std::vector<uint8_t> payload(info->length);
    EXPECT_TRUE(r->read_payload(payload.data(), payload.size()).ok());
    EXPECT_TRUE(r->finish_payload().ok());
    if (info->id == kMemoryRunId && flipped.first == ~0ull) {
      // After the 8-byte gpa: whole pages. A working-set page starts and ends with {tag, version}.
      for (size_t off = 8; off + 4096 <= payload.size(); off += 4096) {
        uint64_t w64[512];
        std::memcpy(w64, payload.data() + off, sizeof(w64));
        uint64_t p = w64[0] - kPageTagBase;
        if ((w64[0] >> 48) != (kPageTagBase >> 48) || p >= ws_pages || w64[510] != w64[0] || w64[1] != w64[511] ||
            w64[1] == 0)
          continue;
        flipped = {p, w64[1]};
        payload[off + 8] ^= 0x01;  // the header copy of the version
        break;
      }
    }
    iovec part{payload.data(), payload.size()};
    EXPECT_TRUE(w->write_section(info->id, info->version, std::span<const iovec>(&part, 1)).ok());
  }
  EXPECT_TRUE(w->finish().ok());
  return flipped;
}

TEST_F(VmRestoreVerifyTest, GuestCatchesAPageTheRestoreGotWrong) {
  // idle=1: after pass 1 the guest only verifies, so no write can repair the damaged page
  // before a verify pass reads it.
  const std::string cmdline = "ws=16M idle=1 report_ms=0 passes=40";
  std::string state = dir_ + "/state", bad = dir_ + "/bad";
  boot_and_save(state, 1, cmdline, 3);
  auto [page, version] = copy_with_flipped_page(state, bad, 4096);
  ASSERT_NE(page, ~0ull) << "no working-set page found in the state file";

  // Control: the untouched file restores to a clean finish, so the failure below is the flip.
  std::string clean;
  EXPECT_EQ(restore_and_run(state, &clean), 0) << clean;
  EXPECT_NE(clean.find("kvmig-guest: done result=pass passes=40 errors=0"), std::string::npos) << clean;

  std::string text;
  EXPECT_EQ(restore_and_run(bad, &text), 1) << "exit status 1 = the guest saw errors: " << text;
  std::string want = "kvmig-guest: corrupt vcpu=0 page=" + std::to_string(page) + " want=" + std::to_string(version) +
                     " got=" + std::to_string(version ^ 1) + "\n";
  EXPECT_NE(text.find(want), std::string::npos) << "want '" << want << "' in:\n" << text.substr(0, 2000);
  EXPECT_NE(text.find("kvmig-guest: done result=fail passes=40"), std::string::npos) << text.substr(text.size() > 500 ? text.size() - 500 : 0);
  // Only the flipped page is wrong.
  EXPECT_EQ(text.find("corrupt vcpu=0 page=" + std::to_string(page ^ 1)), std::string::npos);
}

}  // namespace
}  // namespace kvmig::kvm
