// The "migrate" control request's checks and the page sender's run finder: pure logic.
#include <gtest/gtest.h>

#include "helper/migration_report.h"
#include "helper/page_sender.h"
#include "host/migrate_command.h"

namespace kvmig {
namespace {

TEST(MigrateRequest, DefaultsAndFields) {
  auto o = host::parse_migrate_request({{"to", "127.0.0.1:4000"}});
  ASSERT_TRUE(o.ok()) << o.error().message;
  EXPECT_EQ(o->to.port, 4000);
  EXPECT_EQ(o->streams, 1);
  EXPECT_FALSE(o->ring);
  EXPECT_EQ(o->granularity, 4096u);
  EXPECT_DOUBLE_EQ(o->max_downtime, 0.005);
  EXPECT_EQ(o->compress, helper::CompressMode::automatic);
  auto p = host::parse_migrate_request({{"to", "unix:/tmp/x"}, {"streams", 4}, {"dirty_tracking", "ring"},
                                        {"granularity", 2 << 20}, {"max_downtime_ms", 10}, {"verify", true},
                                        {"compress", "auto"}});
  ASSERT_TRUE(p.ok()) << p.error().message;
  EXPECT_TRUE(p->to.is_unix);
  EXPECT_EQ(p->streams, 4);
  EXPECT_TRUE(p->ring);
  EXPECT_TRUE(p->verify);
  EXPECT_EQ(p->granularity, 2u << 20);
  EXPECT_DOUBLE_EQ(p->max_downtime, 0.010);
  EXPECT_EQ(p->compress, helper::CompressMode::automatic);
  // Older callers sent a boolean.
  auto on = host::parse_migrate_request({{"to", "h:1"}, {"compress", true}});
  ASSERT_TRUE(on.ok()) << on.error().message;
  EXPECT_EQ(on->compress, helper::CompressMode::on);
  auto off = host::parse_migrate_request({{"to", "h:1"}, {"compress", false}});
  ASSERT_TRUE(off.ok()) << off.error().message;
  EXPECT_EQ(off->compress, helper::CompressMode::off);
}

TEST(MigrateRequest, BadFieldsNameTheField) {
  struct Bad {
    nlohmann::json req;
    const char* field;
  } bad[] = {
      {{{"cmd", "migrate"}}, "\"to\""},
      {{{"to", 5}}, "\"to\""},
      {{{"to", "nohostport"}}, "\"to\""},
      {{{"to", "h:1"}, {"streams", 0}}, "\"streams\""},
      {{{"to", "h:1"}, {"streams", 17}}, "\"streams\""},
      {{{"to", "h:1"}, {"streams", -2}}, "\"streams\""},
      {{{"to", "h:1"}, {"dirty_tracking", "magic"}}, "\"dirty_tracking\""},
      {{{"to", "h:1"}, {"granularity", 12288}}, "\"granularity\""},
      {{{"to", "h:1"}, {"granularity", 4 << 20}}, "\"granularity\""},
      {{{"to", "h:1"}, {"max_downtime_ms", 0}}, "\"max_downtime_ms\""},
      {{{"to", "h:1"}, {"max_downtime_ms", "5"}}, "\"max_downtime_ms\""},
      {{{"to", "h:1"}, {"timeout_s", -1}}, "\"timeout_s\""},
      {{{"to", "h:1"}, {"compress", 1}}, "\"compress\""},
      {{{"to", "h:1"}, {"compress", "fast"}}, "\"compress\""},
  };
  for (const Bad& b : bad) {
    auto r = host::parse_migrate_request(b.req);
    ASSERT_FALSE(r.ok()) << b.req.dump();
    EXPECT_NE(r.error().message.find(b.field), std::string::npos) << r.error().message;
  }
}

std::vector<std::pair<uint64_t, uint64_t>> runs(const std::vector<uint64_t>& bits, uint64_t begin, uint64_t end) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  helper::for_each_run(bits.data(), begin, end, [&](uint64_t p, uint64_t n) { out.push_back({p, n}); });
  return out;
}

TEST(PageSenderRuns, MaximalRunsWithinBounds) {
  std::vector<uint64_t> bits(4, 0);
  bits[0] = 0b1110'0001;          // pages 0, 5..7
  bits[1] = 1ull << 63;           // page 127 ...
  bits[2] = ~0ull;                // ... through 191
  bits[3] = 1;                    // and 192
  using R = std::vector<std::pair<uint64_t, uint64_t>>;
  EXPECT_EQ(runs(bits, 0, 256), (R{{0, 1}, {5, 3}, {127, 66}}));
  EXPECT_EQ(runs(bits, 6, 150), (R{{6, 2}, {127, 23}}));  // clipped at both ends
  EXPECT_EQ(runs(bits, 8, 127), R{});
  EXPECT_EQ(helper::count_bits(bits), 1u + 3 + 1 + 64 + 1);
}

TEST(MigrationReport, JsonCarriesTheBenchmarkFields) {
  helper::MigrationReport r;
  r.result = "completed";
  r.total_ms = 12.5;
  r.downtime_ms = 3.25;
  r.bytes = 1000;
  r.iterations = 4;
  nlohmann::json j = r.to_json();
  for (const char* f : {"total_ms", "downtime_ms", "setup_ms", "bytes", "iterations", "zero_pages", "pages",
                        "dirty_rate", "bandwidth_mbps", "result"})
    EXPECT_TRUE(j.contains(f)) << f;
  helper::MigrationReport back = helper::MigrationReport::from_json(j);
  EXPECT_EQ(back.result, "completed");
  EXPECT_DOUBLE_EQ(back.downtime_ms, 3.25);
  EXPECT_EQ(back.iterations, 4u);
  EXPECT_NE(helper::progress_line({{"phase", "precopy"}, {"transferred", 50e6}, {"remaining", 50e6}}).find("##########"),
            std::string::npos);
}

}  // namespace
}  // namespace kvmig
