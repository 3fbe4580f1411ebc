// --verify on real KVM when memory really differs: a write into the source VM's guest RAM
// that KVM's dirty log cannot see (made through /proc/PID/mem while the source is stopped
// after pre-copy round 1, the kind of write a VMM that forgets to mark its own writes makes)
// must stop the migration before COMMIT, name the very page that differs, and leave the
// source VM running, its guest still verifying its memory.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "tests/integration/fault_harness.h"
#include "tests/integration/migration_harness.h"

namespace kvmig::testing {
namespace {

using namespace std::chrono_literals;

// Host address of guest RAM in process `pid`: its one private anonymous mapping of `bytes`.
uint64_t guest_ram_address(pid_t pid, uint64_t bytes) {
  std::istringstream maps(read_text("/proc/" + std::to_string(pid) + "/maps"));
  std::string line;
  while (std::getline(maps, line)) {
    unsigned long long lo = 0, hi = 0;
    char perms[8] = {};
    if (std::sscanf(line.c_str(), "%llx-%llx %7s", &lo, &hi, perms) != 3) continue;
    if (hi - lo == bytes && std::string(perms) == "rw-p") return lo;
  }
  return 0;
}

class VerifyMismatch : public ::testing::Test {
 protected:
  std::string path(const std::string& name) const { return scratch_.path(name); }
  ScratchDir scratch_{"/tmp/kvmig-verify"};
};

TEST_F(VerifyMismatch, AWriteTheDirtyLogMissedIsNamedAndTheSourceRunsOn) {
  if (!have_kvm()) GTEST_SKIP() << "/dev/kvm is not available";
  if (::access(guest64_path().c_str(), R_OK) != 0) GTEST_SKIP() << "test guest not built";
  SourceSpec spec;
  spec.vcpus = 1;
  spec.cmdline = "ws=16M pattern=seq rate=32 vcpus=1";
  spec.console = path("src.console");
  spec.control = path("src.ctl");
  // The source's session stops itself right after pre-copy round 1 (helper/fault_point.h).
  ::setenv("KVMIG_FAULT", "source:precopy:stop", 1);
  Child src = start_source(spec);
  ::unsetenv("KVMIG_FAULT");
  ASSERT_TRUE(wait_until([&] { return guest_report(spec.console).last_pass().size() == 1 || src.poll(); }, 30s))
      << read_text(spec.console);
  ASSERT_FALSE(src.status) << read_text(spec.console);
  Child dst = spawn({KVMIG_BINARY, "receive", "--listen", "unix:" + path("mig.sock"), "--console",
                     path("dst.console"), "--control", path("dst.ctl")},
                    path("recv.out"), path("recv.err"));
  ASSERT_TRUE(wait_until([&] { return read_text(path("recv.err")).find("listening on") != std::string::npos || dst.poll(); }, 10s));
  Child mig = spawn({KVMIG_BINARY, "migrate", spec.control, "--to", "unix:" + path("mig.sock"), "--verify",
                     "--json"},
                    path("mig.out"), path("mig.err"));
  ASSERT_TRUE(wait_until([&] { return is_stopped(src.pid) || src.poll() || mig.poll(); }, 60s))
      << read_text(path("mig.err"));
  ASSERT_TRUE(is_stopped(src.pid)) << read_text(path("mig.err"));

  // 200 MiB into guest RAM: far above the guest's image and 16 MiB working set, so the
  // guest never writes it and round 1 skipped it as zero. Written behind KVM's back.
  constexpr uint64_t kGpa = 200ull << 20;
  const uint64_t ram = guest_ram_address(src.pid, spec.memory);
  ASSERT_NE(ram, 0u) << read_text("/proc/" + std::to_string(src.pid) + "/maps");
  int mem = ::open(("/proc/" + std::to_string(src.pid) + "/mem").c_str(), O_RDWR | O_CLOEXEC);
  if (mem < 0 && (errno == EACCES || errno == EPERM)) {
    ::kill(src.pid, SIGCONT);
    GTEST_SKIP() << "cannot write the source's /proc/PID/mem here (ptrace restricted): " << strerror(errno);
  }
  ASSERT_GE(mem, 0) << strerror(errno);
  const uint64_t value = 0x5eed0fbadc0ffeeull;
  EXPECT_EQ(::pwrite(mem, &value, sizeof value, static_cast<off_t>(ram + kGpa + 64)), ssize_t(sizeof value));
  ::close(mem);
  ::kill(src.pid, SIGCONT);

  auto status = mig.wait(120s);
  ASSERT_TRUE(status.has_value());
  EXPECT_NE(*status, 0) << "a migration whose memory differs must fail";
  const std::string err = read_text(path("mig.err"));
  EXPECT_NE(err.find("guest memory differs from the source's in 1 of 65536 pieces of 4 KiB"), std::string::npos) << err;
  EXPECT_NE(err.find("[0xc800000, +4 KiB) last written here: never; all zero here"), std::string::npos) << err;
  EXPECT_NE(dst.wait(30s).value_or(-1), 0);
  EXPECT_NE(read_text(path("recv.err")).find("verify: differs [0xc800000"), std::string::npos)
      << read_text(path("recv.err"));

  // The source was never committed: it runs on, its guest still passing its own checks.
  EXPECT_FALSE(src.poll()) << "source VM ended: " << read_text(spec.console);
  const uint64_t before = guest_report(spec.console).last_pass()[0].n;
  EXPECT_TRUE(wait_until([&] { return guest_report(spec.console).last_pass()[0].n > before; }, 20s))
      << read_text(spec.console);
  EXPECT_TRUE(guest_report(spec.console).corrupt.empty());
}

}  // namespace
}  // namespace kvmig::testing
