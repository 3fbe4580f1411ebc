// Live migration end to end on real KVM over loopback: a source VM process, `kvmig receive`
// and `kvmig migrate`. The test guest verifies every page it wrote, on both sides of the
// move, and exits 0 only if nothing was lost or torn; its pass counters must go on.
#include <gtest/gtest.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "tests/integration/migration_harness.h"

namespace kvmig::testing {
namespace {

using namespace std::chrono_literals;

#define REQUIRE_GUEST()                                                                     \
  if (!have_kvm()) GTEST_SKIP() << "/dev/kvm is not available";                             \
  if (::access(guest64_path().c_str(), R_OK) != 0) GTEST_SKIP() << "test guest not built"

class Migration : public ::testing::Test {
 protected:
  std::string path(const std::string& name) const { return scratch_.path(name); }

  // Starts the source and waits until every vCPU reported a pass (first touch is over).
  Child source(SourceSpec spec) {
    spec.console = path("src.console");
    spec.control = path("src.ctl");
    Child c = start_source(spec);
    bool up = wait_until([&] { return guest_report(spec.console).last_pass().size() == size_t(spec.vcpus) || c.poll(); }, 30s);
    EXPECT_TRUE(up && !c.status) << read_text(spec.console);
    return c;
  }
  Child receiver(const std::string& listen) {
    Child c = spawn({KVMIG_BINARY, "receive", "--listen", listen, "--console", path("dst.console"),
                     "--control", path("dst.ctl")},
                    path("recv.out"), path("recv.err"));
    bool up = wait_until([&] { return read_text(path("recv.err")).find("listening on") != std::string::npos || c.poll(); }, 10s);
    EXPECT_TRUE(up && !c.status) << read_text(path("recv.err"));
    return c;
  }
  // Runs `kvmig migrate` to completion; returns its exit status and the JSON report.
  std::pair<int, nlohmann::json> migrate(const std::string& to, std::vector<std::string> extra = {}) {
    std::vector<std::string> args{KVMIG_BINARY, "migrate", path("src.ctl"), "--to", to, "--json"};
    args.insert(args.end(), extra.begin(), extra.end());
    Child m = spawn(args, path("mig.out"), path("mig.err"));
    auto st = m.wait(120s);
    nlohmann::json j = nlohmann::json::parse(read_text(path("mig.out")), nullptr, false);
    return {st.value_or(-1), j};
  }

  ScratchDir scratch_{"/tmp/kvmig-migration"};
};

// Pages verified on the destination, counters on from where the source left them.
void expect_guest_went_on(const guest::Report& src, const guest::Report& dst, uint64_t passes) {
  EXPECT_TRUE(src.corrupt.empty());
  EXPECT_TRUE(dst.corrupt.empty()) << "vcpu " << dst.corrupt[0].vcpu << " page " << dst.corrupt[0].page;
  EXPECT_TRUE(dst.errors.empty()) << dst.errors[0];
  ASSERT_TRUE(dst.done) << "destination guest did not finish";
  EXPECT_TRUE(dst.done->pass);
  EXPECT_EQ(dst.done->errors, 0u);
  EXPECT_EQ(dst.done->passes, passes);
  EXPECT_FALSE(dst.start) << "the destination must not boot the guest again";
  auto before = src.last_pass(), after = dst.last_pass();
  for (const auto& [vcpu, p] : before) {
    if (p.n >= passes) continue;  // this vCPU finished before the move
    ASSERT_TRUE(after.count(vcpu)) << "vcpu " << vcpu << " silent after the move";
    EXPECT_GT(after[vcpu].n, p.n);
    EXPECT_GT(after[vcpu].writes, p.writes);
    EXPECT_GE(after[vcpu].tsc, p.tsc);
  }
}

struct Case {
  std::string name;
  int vcpus = 1;
  std::string cmdline;
  uint64_t passes = 0;
  std::vector<std::string> migrate_args;
  uint32_t ring = 0;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class MigrationCases : public Migration, public ::testing::WithParamInterface<Case> {};

TEST_P(MigrationCases, GuestKeepsVerifyingAfterTheMove) {
  REQUIRE_GUEST();
  const Case& c = GetParam();
  SourceSpec spec;
  spec.vcpus = c.vcpus;
  spec.cmdline = c.cmdline + " vcpus=" + std::to_string(c.vcpus) + " passes=" + std::to_string(c.passes);
  spec.dirty_ring = c.ring;
  Child src = source(spec);
  Child dst = receiver("unix:" + path("mig.sock"));
  auto [status, report] = migrate("unix:" + path("mig.sock"), c.migrate_args);
  ASSERT_EQ(status, 0) << read_text(path("mig.err")) << read_text(path("recv.err"))
                       << "source exit: " << src.wait(1s).value_or(-1);
  ASSERT_FALSE(report.is_discarded());
  EXPECT_EQ(report["result"], "completed");
  EXPECT_GE(report["iterations"].get<int>(), 2);
  EXPECT_GT(report["bytes"].get<uint64_t>(), 0u);
  EXPECT_GT(report["downtime_ms"].get<double>(), 0);
  // The test guest writes 32 bytes per page: zstd shrinks its pages ~100x, so compression
  // (on, or auto, the default) must kick in and the data pages cost under half their size;
  // with --compress off every data page goes out whole.
  const uint64_t data_bytes = (report["pages"].get<uint64_t>() - report["zero_pages"].get<uint64_t>()) * 4096;
  auto has = [&](const char* a) { return std::find(c.migrate_args.begin(), c.migrate_args.end(), a) != c.migrate_args.end(); };
  if (has("off")) {
    EXPECT_EQ(report["compressed_batches"].get<uint64_t>(), 0u);
    EXPECT_GT(report["bytes"].get<uint64_t>(), data_bytes);
  } else {
    EXPECT_GT(report["compressed_batches"].get<uint64_t>(), 0u);
    EXPECT_LT(report["bytes"].get<uint64_t>(), data_bytes / 2);
  }
  EXPECT_EQ(src.wait(10s), 0) << "the source VM ends once the destination runs it";
  EXPECT_EQ(dst.wait(60s), 0) << read_text(path("recv.err"));
  expect_guest_went_on(guest_report(path("src.console")), guest_report(path("dst.console")), c.passes);
  std::fprintf(stderr, "%s: %s\n", c.name.c_str(), report.dump().substr(0, 400).c_str());
}

INSTANTIATE_TEST_SUITE_P(
    Loopback, MigrationCases,
    ::testing::Values(
        Case{"SeqPacedBitmap4K", 1, "ws=64M pattern=seq rate=128", 4, {}},
        Case{"NearIdle", 1, "ws=16M pattern=seq rate=8", 2, {}},
        Case{"RandomMaxTwoVcpus", 2, "ws=64M pattern=random", 6000, {"--max-downtime", "50"}},
        Case{"HotColdMax2MGranules", 1, "ws=64M pattern=hotcold", 6000,
             {"--trace-granularity", "2M", "--max-downtime", "50"}},
        Case{"RandomMaxRing", 1, "ws=64M pattern=random", 6000,
             {"--dirty-tracking", "ring", "--max-downtime", "50", "--compress", "off"}, 4096},
        Case{"SeqRingTwoVcpus2M", 2, "ws=64M pattern=seq rate=64", 3,
             {"--dirty-tracking", "ring", "--trace-granularity", "2M"}, 4096},
        Case{"FourStreamsCompressVerify", 2, "ws=64M pattern=hotcold", 6000,
             {"--streams", "4", "--compress", "on", "--verify", "--max-downtime", "50"}},
        Case{"SeqMaxCompressAuto", 1, "ws=64M pattern=seq", 6000, {"--compress", "auto", "--max-downtime", "50"}}),
    [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace kvmig::testing
