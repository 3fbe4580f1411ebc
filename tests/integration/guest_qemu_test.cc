// Boots the test guest under QEMU (TCG, so it behaves the same on any host) and checks what it
// reports: the guest contract of docs/guest.md, and the parser in tests/guests/guest_report.h.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "guests/guest_report.h"
#include "host/qemu_process.h"

namespace kvmig::guest {
namespace {

using Clock = std::chrono::steady_clock;

using host::find_in_path;

struct QemuRun {
  Report report;
  int exit_code = -1;        // QEMU's exit code: (guest status << 1) | 1 via isa-debug-exit
  bool timed_out = false;
  double start_to_end = 0;   // seconds from the start line to the end of output
};

// Runs QEMU with the guest and collects its console until QEMU exits or `timeout` passes;
// on timeout kills only the QEMU it started.
QemuRun run_qemu(const std::string& qemu, int smp, const std::string& append,
             std::chrono::seconds timeout = std::chrono::seconds(60)) {
  QemuRun run;
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    ADD_FAILURE() << "pipe2: " << std::strerror(errno);
    return run;
  }
  std::vector<std::string> args = {
      qemu, "-accel", "tcg", "-m", "256", "-smp", std::to_string(smp), "-nographic",
      "-serial", "none", "-monitor", "none", "-no-reboot",
      "-kernel", KVMIG_GUEST, "-append", append,
      "-device", "isa-debugcon,iobase=0xe9,chardev=c", "-chardev", "stdio,id=c",
      "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"};
  pid_t pid = fork();
  if (pid == 0) {
    int devnull = open("/dev/null", O_RDONLY);
    dup2(devnull, 0);
    dup2(fds[1], 1);
    dup2(fds[1], 2);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(fds[1]);
  if (pid < 0) {
    close(fds[0]);
    ADD_FAILURE() << "fork: " << std::strerror(errno);
    return run;
  }
  auto deadline = Clock::now() + timeout;
  std::optional<Clock::time_point> started;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      run.timed_out = true;
      kill(pid, SIGKILL);
      break;
    }
    pollfd p{fds[0], POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
    char buf[4096];
    ssize_t n = read(fds[0], buf, sizeof buf);
    if (n <= 0) break;  // QEMU closed its output: it is exiting
    run.report.feed(std::string_view(buf, static_cast<size_t>(n)));
    if (!started && run.report.start) started = Clock::now();
  }
  close(fds[0]);
  if (started) run.start_to_end = std::chrono::duration<double>(Clock::now() - *started).count();
  int status = 0;
  waitpid(pid, &status, 0);
  if (WIFEXITED(status)) run.exit_code = WEXITSTATUS(status);
  return run;
}

class GuestQemuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    qemu_ = find_in_path("qemu-system-x86_64");
    if (qemu_.empty()) GTEST_SKIP() << "qemu-system-x86_64 not found in PATH";
    if (!std::filesystem::exists(KVMIG_GUEST)) GTEST_SKIP() << "guest not built: " << KVMIG_GUEST;
  }
  std::string qemu_;
};

std::string describe(const QemuRun& r) {
  std::string s = "exit=" + std::to_string(r.exit_code) + (r.timed_out ? " (timed out)" : "");
  for (auto& e : r.report.errors) s += "\n  " + e;
  for (auto& o : r.report.other) s += "\n  other: " + o;
  return s;
}

// Asserts a clean run of `passes` passes by `vcpus` vCPUs over `ws_pages` pages.
void expect_clean(const QemuRun& r, uint32_t vcpus, uint64_t ws_pages, uint64_t passes, bool idle) {
  ASSERT_FALSE(r.timed_out) << describe(r);
  ASSERT_TRUE(r.report.start) << describe(r);
  EXPECT_EQ(r.report.start->vcpus, vcpus);
  EXPECT_EQ(r.report.start->ws_pages, ws_pages);
  EXPECT_TRUE(r.report.corrupt.empty()) << "first: page " << r.report.corrupt[0].page;
  EXPECT_TRUE(r.report.errors.empty()) << describe(r);
  ASSERT_TRUE(r.report.done) << describe(r);
  EXPECT_TRUE(r.report.done->pass);
  EXPECT_EQ(r.report.done->passes, passes);
  EXPECT_EQ(r.report.done->errors, 0u);
  auto last = r.report.last_pass();
  ASSERT_EQ(last.size(), vcpus) << "every vCPU reports its final pass";
  uint64_t writes = 0;
  for (auto& [cpu, p] : last) {
    EXPECT_EQ(p.n, passes) << "vcpu " << cpu;
    EXPECT_EQ(p.errors, 0u) << "vcpu " << cpu;
    writes += p.writes;
  }
  // Pass 1 writes every page once; later passes write a slice's worth each, unless idle.
  EXPECT_EQ(writes, idle ? ws_pages : ws_pages * passes);
  EXPECT_EQ(r.exit_code, 1) << "isa-debug-exit reports guest status 0 as 1";
}

TEST_F(GuestQemuTest, OneVcpuSequentialPasses) {
  QemuRun r = run_qemu(qemu_, 1, "ws=16M passes=3");
  expect_clean(r, 1, 4096, 3, false);
}

TEST_F(GuestQemuTest, TwoVcpusRandomPattern) {
  QemuRun r = run_qemu(qemu_, 2, "ws=32M passes=3 vcpus=2 pattern=random");
  expect_clean(r, 2, 8192, 3, false);
  EXPECT_EQ(r.report.start->pattern, "random");
}

TEST_F(GuestQemuTest, ThreeVcpusHotcoldUnevenSlices) {
  // 1001 pages do not split evenly: slices of 333, 333 and 335 must still cover all pages.
  QemuRun r = run_qemu(qemu_, 3, "ws=4004K passes=4 vcpus=3 pattern=hotcold hot=10 hotp=95");
  expect_clean(r, 3, 1001, 4, false);
}

TEST_F(GuestQemuTest, IdleWritesOnlyTheFirstPass) {
  QemuRun r = run_qemu(qemu_, 2, "ws=8M passes=6 vcpus=2 idle=1");
  expect_clean(r, 2, 2048, 6, true);
}

TEST_F(GuestQemuTest, RateLimitPacesWrites) {
  // 4 passes of 8 MiB at 64 MiB/s take at least 0.5 s; unpaced, TCG does it in a few ms.
  QemuRun r = run_qemu(qemu_, 1, "ws=8M passes=4 rate=64 report_ms=0");
  expect_clean(r, 1, 2048, 4, false);
  ASSERT_TRUE(r.report.start->rate_mibps);
  EXPECT_EQ(*r.report.start->rate_mibps, 64u);
  EXPECT_GE(r.start_to_end, 0.4);
  EXPECT_EQ(r.report.passes.size(), 4u) << "report_ms=0 reports every pass";
}

TEST_F(GuestQemuTest, BadCommandLineIsRejected) {
  QemuRun r = run_qemu(qemu_, 1, "ws=12Q passes=1");
  ASSERT_FALSE(r.timed_out);
  ASSERT_EQ(r.report.errors.size(), 1u) << describe(r);
  EXPECT_NE(r.report.errors[0].find("ws="), std::string::npos) << r.report.errors[0];
  EXPECT_FALSE(r.report.done);
  EXPECT_EQ(r.exit_code, (2 << 1) | 1) << "boot errors leave with status 2";
}

TEST_F(GuestQemuTest, MissingVcpuIsReportedNotHung) {
  QemuRun r = run_qemu(qemu_, 1, "ws=8M passes=1 vcpus=2");
  ASSERT_FALSE(r.timed_out);
  ASSERT_EQ(r.report.errors.size(), 1u) << describe(r);
  EXPECT_NE(r.report.errors[0].find("INIT/SIPI"), std::string::npos) << r.report.errors[0];
  EXPECT_EQ(r.exit_code, (2 << 1) | 1);
}

TEST(GuestReportTest, ParsesContractLinesInAnyChunking) {
  std::string text =
      "SeaBIOS noise\r\n"
      "kvmig-guest: start vcpus=2 ws_pages=16384 pattern=hotcold rate=100\n"
      "kvmig-guest: pass vcpu=1 n=7 writes=57344 errors=0 tsc=123456789\n"
      "kvmig-guest: corrupt vcpu=0 page=42 want=3 got=2\n"
      "kvmig-guest: pass vcpu=1 n=8 writes=65536 errors=0 tsc=223456789\n"
      "kvmig-guest: done result=fail passes=8 errors=1\n";
  Report r;
  for (char c : text) r.feed(std::string_view(&c, 1));
  ASSERT_TRUE(r.start);
  EXPECT_EQ(r.start->vcpus, 2u);
  EXPECT_EQ(r.start->ws_pages, 16384u);
  EXPECT_EQ(r.start->pattern, "hotcold");
  EXPECT_EQ(r.start->rate_mibps, std::optional<uint64_t>(100));
  ASSERT_EQ(r.passes.size(), 2u);
  EXPECT_EQ(r.last_pass().at(1).n, 8u);
  EXPECT_EQ(r.last_pass().at(1).tsc, 223456789u);
  ASSERT_EQ(r.corrupt.size(), 1u);
  EXPECT_EQ(r.corrupt[0].page, 42u);
  EXPECT_EQ(r.corrupt[0].want, 3u);
  EXPECT_EQ(r.corrupt[0].got, 2u);
  ASSERT_TRUE(r.done);
  EXPECT_FALSE(r.done->pass);
  EXPECT_EQ(r.done->errors, 1u);
  EXPECT_EQ(r.other, std::vector<std::string>{"SeaBIOS noise"});
}

TEST(GuestReportTest, RejectsMalformedLines) {
  EXPECT_FALSE(parse_pass("kvmig-guest: pass vcpu=1 n=7 writes=5 errors=0"));           // no tsc
  EXPECT_FALSE(parse_pass("kvmig-guest: pass vcpu=1 n=7 writes=5 errors=0 tsc=1 x=2"));  // extra
  EXPECT_FALSE(parse_pass("kvmig-guest: pass vcpu=-1 n=7 writes=5 errors=0 tsc=1"));
  EXPECT_FALSE(parse_pass("kvmig-guest: pass n=7 vcpu=1 writes=5 errors=0 tsc=1"));     // order
  EXPECT_FALSE(parse_start("kvmig-guest: start vcpus=1 ws_pages=1 pattern=seq rate=fast"));
  EXPECT_FALSE(parse_done("kvmig-guest: done result=maybe passes=1 errors=0"));
  EXPECT_FALSE(parse_corrupt("kvmig-guest: corrupt vcpu=0 page=1x want=1 got=0"));
  EXPECT_TRUE(parse_start("kvmig-guest: start vcpus=1 ws_pages=1 pattern=seq rate=max"));
  EXPECT_FALSE(parse_start("kvmig-guest: start vcpus=1 ws_pages=1 pattern=seq rate=max")->rate_mibps);
}

// The disk workload's lines go through the same field and rate rules as the memory ones.
TEST(GuestReportTest, ParsesDiskLinesWithTheSameRules) {
  auto s = parse_disk_start("kvmig-guest: disk start blocks=64 block=4096 pattern=random rate=8");
  ASSERT_TRUE(s);
  EXPECT_EQ(s->blocks, 64u);
  EXPECT_EQ(s->block_bytes, 4096u);
  EXPECT_EQ(s->pattern, "random");
  EXPECT_EQ(s->rate_mibps, std::optional<uint64_t>(8));
  auto m = parse_disk_start("kvmig-guest: disk start blocks=64 block=4096 pattern=seq rate=max");
  ASSERT_TRUE(m);
  EXPECT_FALSE(m->rate_mibps);
  EXPECT_FALSE(parse_disk_start("kvmig-guest: disk start blocks=64 block=4096 pattern=seq rate=fast"));
  EXPECT_FALSE(parse_disk_start("kvmig-guest: disk start blocks=64 block=4096 pattern= rate=max"));
  EXPECT_FALSE(parse_disk_start("kvmig-guest: start blocks=64 block=4096 pattern=seq rate=max"));  // prefix
  auto p = parse_disk_pass("kvmig-guest: disk pass n=3 writes=10 reads=7 errors=0");
  ASSERT_TRUE(p);
  EXPECT_EQ(p->reads, 7u);
  EXPECT_FALSE(parse_disk_pass("kvmig-guest: disk pass n=3 reads=7 writes=10 errors=0"));  // order
  auto c = parse_disk_corrupt("kvmig-guest: disk corrupt block=5 want=1 got=2 why=checksum");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->why, "checksum");
  EXPECT_FALSE(parse_disk_corrupt("kvmig-guest: disk corrupt block=5 want=1 got=2 why="));
  auto b = parse_disk_bad_requests("kvmig-guest: disk bad-requests rejected=4 of=4");
  ASSERT_TRUE(b);
  EXPECT_EQ(b->rejected, 4u);
  EXPECT_FALSE(parse_disk_bad_requests("kvmig-guest: disk bad-requests rejected=4"));
}

}  // namespace
}  // namespace kvmig::guest
