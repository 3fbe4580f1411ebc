// The three benchmark scenarios for kvmig alone (1280 MiB guest over loopback TCP),
// as DISABLED tests so CI does not pay for them:
//   build-x/tests/migration_bench_test --gtest_also_run_disabled_tests
// Each prints the JSON report; bench/migrate_vs_qemu.sh runs the same scenarios side by
// side with QEMU through `kvmig vm run`.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <regex>

#include "tests/integration/migration_harness.h"

namespace kvmig::testing {
namespace {

using namespace std::chrono_literals;

void run_scenario(const std::string& name, const std::string& cmdline, std::vector<std::string> extra) {
  if (!have_kvm()) GTEST_SKIP() << "/dev/kvm is not available";
  char tmpl[] = "/tmp/kvmig-migbench-XXXXXX";
  std::string dir = ::mkdtemp(tmpl);
  SourceSpec spec;
  spec.memory = 1280ull << 20;
  spec.cmdline = cmdline + " passes=0";
  spec.console = dir + "/src.console";
  spec.control = dir + "/src.ctl";
  Child src = start_source(spec);
  // Past the first touch of the working set, as the QEMU rows are.
  ASSERT_TRUE(wait_until([&] { return guest_report(spec.console).passes.size() >= 2 || src.poll(); }, 120s));
  Child dst = spawn({KVMIG_BINARY, "receive", "--listen", "127.0.0.1:0", "--console", dir + "/dst.console",
                     "--no-control"},
                    dir + "/recv.out", dir + "/recv.err");
  std::smatch m;
  std::string err;
  std::regex port_re("listening on 127.0.0.1:([0-9]+)");
  ASSERT_TRUE(wait_until([&] { err = read_text(dir + "/recv.err"); return std::regex_search(err, m, port_re); }, 10s));
  std::vector<std::string> args{KVMIG_BINARY, "migrate", spec.control, "--to", "127.0.0.1:" + m[1].str(), "--json"};
  args.insert(args.end(), extra.begin(), extra.end());
  Child mig = spawn(args, dir + "/mig.out", dir + "/mig.err");
  ASSERT_EQ(mig.wait(300s), 0) << read_text(dir + "/mig.err");
  nlohmann::json j = nlohmann::json::parse(read_text(dir + "/mig.out"));
  if (!std::getenv("KVMIG_ROUNDS")) j.erase("rounds");
  std::printf("%s %s\n", name.c_str(), j.dump().c_str());
  uint64_t n = guest_report(spec.console).last_pass()[0].n;
  EXPECT_TRUE(wait_until([&] { return guest_report(dir + "/dst.console").last_pass()[0].n > n + 2; }, 60s));
  auto after = guest_report(dir + "/dst.console");
  EXPECT_TRUE(after.corrupt.empty());
  EXPECT_TRUE(after.errors.empty());
  dst.kill9();
  if (!::testing::Test::HasFailure()) std::system(("rm -rf " + dir).c_str());
  else std::fprintf(stderr, "kept %s\n", dir.c_str());
}

TEST(MigrationBench, DISABLED_Idle) { run_scenario("idle", "idle=1", {}); }
TEST(MigrationBench, DISABLED_Hot256) { run_scenario("hot256", "ws=256M pattern=seq", {}); }
TEST(MigrationBench, DISABLED_Hot256Verify) { run_scenario("hot256-verify", "ws=256M pattern=seq", {"--verify"}); }
TEST(MigrationBench, DISABLED_Hot1G) { run_scenario("hot1g", "ws=1G pattern=seq", {}); }

}  // namespace
}  // namespace kvmig::testing
