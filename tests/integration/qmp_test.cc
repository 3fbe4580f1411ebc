// QmpClient against a scripted fake QMP server (protocol edge cases: events between a command
// and its reply, error replies, malformed JSON, a closed socket) and against real QEMU
// running the test guest under TCG: live migration over loopback, cancel, stop/cont.
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "guests/guest_report.h"
#include "host/qemu_process.h"
#include "host/qmp_client.h"
#include "test_util.h"

namespace kvmig::host {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// ---- a scripted QMP peer on a socketpair ----------------------------------------------

// Each step either writes raw text, or reads one request line and answers with the text the
// function returns (so that replies can carry the request's id).
struct Step {
  std::string send;
  std::function<std::string(const json& request)> reply;
};

class FakeQmp {
 public:
  explicit FakeQmp(std::vector<Step> steps) {
    int sv[2];
    EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    client_fd_ = Fd(sv[0]);
    server_fd_ = Fd(sv[1]);
    thread_ = std::thread([this, steps = std::move(steps)] { run(steps); });
  }
  ~FakeQmp() {
    shutdown(server_fd_.get(), SHUT_RDWR);  // unblocks a read in run()
    if (thread_.joinable()) thread_.join();
  }
  Fd take_client() { return std::move(client_fd_); }
  std::vector<json> requests;  // what the client sent, read after the client is done

 private:
  void run(const std::vector<Step>& steps) {
    std::string buf;
    for (const Step& s : steps) {
      if (s.reply) {
        size_t nl;
        while ((nl = buf.find('\n')) == std::string::npos) {
          char c[4096];
          ssize_t n = read(server_fd_.get(), c, sizeof c);
          if (n <= 0) return;
          buf.append(c, static_cast<size_t>(n));
        }
        json req = json::parse(buf.substr(0, nl), nullptr, false);
        buf.erase(0, nl + 1);
        requests.push_back(req);
        write_all(s.reply(req));
      } else {
        write_all(s.send);
      }
    }
    shutdown(server_fd_.get(), SHUT_RDWR);  // the script is over: QEMU "exits"
  }
  void write_all(const std::string& s) {
    if (send(server_fd_.get(), s.data(), s.size(), MSG_NOSIGNAL) < 0) return;
  }
  Fd client_fd_, server_fd_;
  std::thread thread_;
};

const std::string kGreeting =
    R"({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}})"
    "\r\n";

std::string ret_for(const json& req, const json& value) {
  return json{{"return", value}, {"id", req["id"]}}.dump() + "\r\n";
}

Step accept_capabilities() {
  return {"", [](const json& r) { return ret_for(r, json::object()); }};
}

TEST(QmpProtocolTest, EventsBetweenCommandAndReplyAreQueued) {
  FakeQmp server({{kGreeting, nullptr}, accept_capabilities(),
                  {"", [](const json& r) {
                     return std::string(R"({"event": "STOP", "timestamp": {"seconds": 5, "microseconds": 7}})") +
                            "\r\n" + ret_for(r, {{"status", "paused"}, {"running", false}});
                   }}});
  auto client = QmpClient::from_fd(server.take_client(), 2000ms);
  ASSERT_TRUE(client) << client.error().message;
  auto status = client->query_status();
  ASSERT_TRUE(status) << status.error().message;
  EXPECT_EQ(status->status, "paused");
  EXPECT_FALSE(status->running);
  auto ev = client->wait_event("STOP", nullptr, 100ms);
  ASSERT_TRUE(ev) << ev.error().message;
  EXPECT_EQ(ev->seconds, 5);
  EXPECT_EQ(ev->microseconds, 7);
  EXPECT_TRUE(client->take_events().empty()) << "wait_event removes what it returns";
  ASSERT_EQ(server.requests.size(), 2u);
  EXPECT_EQ(server.requests[0]["execute"], "qmp_capabilities");
  EXPECT_EQ(server.requests[1]["execute"], "query-status");
  EXPECT_NE(server.requests[0]["id"], server.requests[1]["id"]);
}

TEST(QmpProtocolTest, ErrorReplyCarriesClassAndDescription) {
  FakeQmp server({{kGreeting, nullptr}, accept_capabilities(),
                  {"", [](const json& r) {
                     return json{{"error", {{"class", "GenericError"}, {"desc", "no way"}}},
                                 {"id", r["id"]}}.dump() + "\n";
                   }},
                  {"", [](const json& r) { return ret_for(r, json::object()); }}});
  auto client = QmpClient::from_fd(server.take_client(), 2000ms);
  ASSERT_TRUE(client) << client.error().message;
  auto r = client->migrate("tcp:127.0.0.1:1");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().message, "QMP migrate: GenericError: no way");
  EXPECT_EQ(client->error_class(), "GenericError");
  EXPECT_TRUE(client->stop()) << "the connection stays usable after an error reply";
  EXPECT_EQ(client->error_class(), "");
  EXPECT_EQ(server.requests[1]["arguments"]["uri"], "tcp:127.0.0.1:1");
}

TEST(QmpProtocolTest, LateReplyAfterTimeoutIsSkipped) {
  FakeQmp server({{kGreeting, nullptr}, accept_capabilities(),
                  {"", [](const json&) { return std::string(); }},  // never answers in time
                  {"", [](const json& r) {
                     json late = {{"id", r["id"].get<uint64_t>() - 1}};
                     return ret_for(late, "stale") + ret_for(r, "fresh");
                   }}});
  auto client = QmpClient::from_fd(server.take_client(), 2000ms);
  ASSERT_TRUE(client) << client.error().message;
  client->set_command_timeout(100ms);
  auto slow = client->execute("query-version");
  ASSERT_FALSE(slow);
  EXPECT_EQ(slow.error().sys_errno, ETIMEDOUT) << slow.error().message;
  client->set_command_timeout(2000ms);
  auto next = client->execute("query-name");
  ASSERT_TRUE(next) << next.error().message;
  EXPECT_EQ(*next, "fresh");
}

TEST(QmpProtocolTest, MalformedJsonIsAnErrorNotACrash) {
  FakeQmp server({{kGreeting, nullptr}, {"", [](const json&) { return "{\"return\": {,,\n"; }}});
  auto client = QmpClient::from_fd(server.take_client(), 2000ms);
  ASSERT_FALSE(client);
  EXPECT_NE(client.error().message.find("malformed JSON"), std::string::npos)
      << client.error().message;
  EXPECT_EQ(client.error().message.find('\n'), std::string::npos) << "one line";
}

TEST(QmpProtocolTest, WrongShapesAreErrors) {
  FakeQmp server({{kGreeting, nullptr}, accept_capabilities(),
                  {"", [](const json&) { return R"({"return": {}, "id": 999})" "\n"; }}});
  auto client = QmpClient::from_fd(server.take_client(), 2000ms);
  ASSERT_TRUE(client) << client.error().message;
  auto r = client->execute("query-status");
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("another request"), std::string::npos) << r.error().message;

  FakeQmp no_greeting({{R"({"hello": 1})" "\n", nullptr}});
  auto c2 = QmpClient::from_fd(no_greeting.take_client(), 2000ms);
  ASSERT_FALSE(c2);
  EXPECT_NE(c2.error().message.find("greeting"), std::string::npos) << c2.error().message;
}

TEST(QmpProtocolTest, ClosedSocketAndSilenceAreErrors) {
  FakeQmp server({{kGreeting, nullptr}, accept_capabilities()});  // then closes
  auto client = QmpClient::from_fd(server.take_client(), 2000ms);
  ASSERT_TRUE(client) << client.error().message;
  auto r = client->query_migrate();
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("connection closed"), std::string::npos) << r.error().message;

  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  Fd silent(sv[1]);  // never says anything
  auto start = Clock::now();
  auto c2 = QmpClient::from_fd(Fd(sv[0]), 200ms);
  ASSERT_FALSE(c2);
  EXPECT_EQ(c2.error().sys_errno, ETIMEDOUT) << c2.error().message;
  EXPECT_LT(Clock::now() - start, 2s);
}

TEST(QmpProtocolTest, ParsesQueryMigrate) {
  json ret = json::parse(R"({"status": "completed", "total-time": 1234, "downtime": 12,
      "setup-time": 3, "expected-downtime": 300,
      "ram": {"transferred": 1000000, "total": 268435456, "remaining": 0, "duplicate": 60000,
              "normal": 2000, "normal-bytes": 8192000, "dirty-sync-count": 4, "mbps": 812.5,
              "dirty-pages-rate": 1500, "page-size": 4096}})");
  auto info = parse_migration_info(ret);
  ASSERT_TRUE(info) << info.error().message;
  EXPECT_EQ(info->status, "completed");
  EXPECT_TRUE(info->finished());
  EXPECT_EQ(info->total_time_ms, 1234u);
  EXPECT_EQ(info->downtime_ms, 12u) << "measured downtime wins over expected";
  EXPECT_EQ(info->setup_time_ms, 3u);
  EXPECT_EQ(info->ram_transferred, 1000000u);
  EXPECT_EQ(info->ram_total, 268435456u);
  EXPECT_EQ(info->duplicate_pages, 60000u);
  EXPECT_EQ(info->normal_pages, 2000u);
  EXPECT_EQ(info->dirty_sync_count, 4u);
  EXPECT_DOUBLE_EQ(info->mbps, 812.5);
  EXPECT_EQ(info->dirty_pages_rate, 1500u);
  EXPECT_EQ(info->page_size, 4096u);
  EXPECT_FALSE(parse_migration_info(json::parse(R"({"ram": {"page-size": 0}})")));

  auto empty = parse_migration_info(json::object());
  ASSERT_TRUE(empty);
  EXPECT_EQ(empty->status, "none");
  EXPECT_FALSE(empty->finished());

  auto incoming = parse_migration_info(
      json::parse(R"({"socket-address": [{"port": "45173", "host": "127.0.0.1"}]})"));
  ASSERT_TRUE(incoming);
  EXPECT_EQ(incoming->incoming_port, 45173);

  EXPECT_FALSE(parse_migration_info(json::parse(R"({"ram": {"transferred": "lots"}})")));
  EXPECT_FALSE(parse_migration_info(json::parse(R"({"ram": {"normal": -1}})")));
  EXPECT_FALSE(parse_migration_info(json::parse(R"({"socket-address": [{"port": "99999"}]})")));
  EXPECT_FALSE(parse_migration_info(json::parse("[1,2]")));
}

// ---- real QEMU (TCG: same behaviour on every host, no 7 s firmware on kvm-pvm) ----------

// One QEMU running the test guest, with its QMP client and the guest's console report.
struct QemuGuest {
  QemuProcess process;
  std::optional<QmpClient> qmp;
  std::optional<FileTail> console;
  guest::Report report;

  void poll_console() {
    auto bytes = console->read_new();
    ASSERT_TRUE(bytes) << bytes.error().message;
    report.feed(*bytes);
  }
  // Polls the console until `pred` holds or `timeout`.
  bool wait_for(const std::function<bool(const guest::Report&)>& pred, std::chrono::seconds timeout) {
    auto deadline = Clock::now() + timeout;
    for (;;) {
      poll_console();
      if (pred(report)) return true;
      if (Clock::now() >= deadline) return false;
      std::this_thread::sleep_for(20ms);
    }
  }
  uint64_t last_pass_n() const {
    auto last = report.last_pass();
    return last.empty() ? 0 : last.begin()->second.n;
  }
};

class QmpQemuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    qemu_ = find_in_path("qemu-system-x86_64");
    if (qemu_.empty()) GTEST_SKIP() << "qemu-system-x86_64 not found in PATH";
    if (!std::filesystem::exists(KVMIG_GUEST)) GTEST_SKIP() << "guest not built: " << KVMIG_GUEST;
    dir_ = test::make_temp_dir("kvmig-qmp");
    ASSERT_FALSE(dir_.empty());
  }
  void TearDown() override {
    guests_.clear();  // kills the QEMUs this test started, by pid
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  // Starts a guest paced at `rate` MiB/s so that a migration converges at TCG speed.
  QemuGuest& start(const std::string& name, bool incoming) {
    QemuGuestOptions o;
    o.qemu = qemu_;
    o.accel = "tcg";
    o.memory = "256M";
    o.kernel = KVMIG_GUEST;
    o.append = "ws=16M pattern=random rate=32 report_ms=50";
    o.qmp_socket = dir_ + "/" + name + ".qmp";
    o.console_path = dir_ + "/" + name + ".console";
    if (incoming) o.incoming = "defer";
    auto& g = *guests_.emplace_back(std::make_unique<QemuGuest>());
    g.console.emplace(o.console_path);
    auto args = qemu_guest_args(o);
    if (!args) {
      ADD_FAILURE() << args.error().message;
      return g;  // without qmp: the caller's ASSERT on qmp stops the test
    }
    auto proc = QemuProcess::start(*args, dir_ + "/" + name + ".log");
    if (!proc) {
      ADD_FAILURE() << proc.error().message;
      return g;
    }
    g.process = std::move(*proc);
    auto client = QmpClient::connect(o.qmp_socket, 10s);
    EXPECT_TRUE(client) << client.error().message << " / " << g.process.log_tail();
    if (client) g.qmp.emplace(std::move(*client));
    return g;
  }

  // Destination listening on an ephemeral port QEMU picked; returns the URI for migrate.
  std::string listen(QemuGuest& dst) {
    auto r = dst.qmp->migrate_incoming("tcp:127.0.0.1:0");
    EXPECT_TRUE(r) << r.error().message;
    auto info = dst.qmp->query_migrate();
    EXPECT_TRUE(info) << info.error().message;
    EXPECT_TRUE(info && info->incoming_port) << "destination reports its listening port";
    return info && info->incoming_port ? "tcp:127.0.0.1:" + std::to_string(*info->incoming_port) : "";
  }

  std::string qemu_, dir_;
  std::vector<std::unique_ptr<QemuGuest>> guests_;
};

bool passing(const guest::Report& r, uint64_t min_n) {
  auto last = r.last_pass();
  return !last.empty() && last.begin()->second.n >= min_n;
}

TEST_F(QmpQemuTest, LiveMigrationCompletesAndGuestKeepsPassing) {
  QemuGuest& src = start("src", false);
  QemuGuest& dst = start("dst", true);
  ASSERT_TRUE(src.qmp && dst.qmp);
  ASSERT_TRUE(src.wait_for([](auto& r) { return passing(r, 3); }, 30s)) << src.process.log_tail();
  std::string uri = listen(dst);
  ASSERT_FALSE(uri.empty());

  ASSERT_TRUE(src.qmp->migrate_set_capabilities({{"events", true}}));
  auto set = src.qmp->migrate_set_parameters({{"downtime-limit", 100}, {"max-bandwidth", 1LL << 30}});
  ASSERT_TRUE(set) << set.error().message;
  auto params = src.qmp->query_migrate_parameters();
  ASSERT_TRUE(params) << params.error().message;
  EXPECT_EQ((*params)["downtime-limit"], 100);
  ASSERT_TRUE(src.qmp->migrate(uri));
  auto done = src.qmp->wait_event(
      "MIGRATION",
      [](const QmpEvent& e) {
        auto s = e.data.is_object() ? e.data.find("status") : e.data.end();
        return s != e.data.end() && (*s == "completed" || *s == "failed" || *s == "cancelled");
      },
      60000ms);
  ASSERT_TRUE(done) << done.error().message;
  EXPECT_EQ(done->data["status"], "completed");

  auto info = src.qmp->wait_migration(10000ms);
  ASSERT_TRUE(info) << info.error().message;
  EXPECT_EQ(info->status, "completed");
  // Guest RAM plus QEMU's ROM and video RAM regions.
  EXPECT_GE(info->ram_total, 256u << 20);
  EXPECT_LT(info->ram_total, 320u << 20);
  EXPECT_GE(info->normal_pages, 4096u) << "at least the 16 MiB working set went in full";
  EXPECT_GE(info->ram_transferred, 16u << 20);
  EXPECT_GT(info->duplicate_pages, 0u) << "untouched RAM goes as zero pages";
  EXPECT_GE(info->dirty_sync_count, 2u) << "pre-copy ran at least one dirty round";
  EXPECT_GT(info->total_time_ms, 0u);
  EXPECT_GT(info->mbps, 0);

  auto src_status = src.qmp->query_status();
  ASSERT_TRUE(src_status);
  EXPECT_EQ(src_status->status, "postmigrate");
  EXPECT_FALSE(src_status->running);

  src.poll_console();
  uint64_t n_at_switch = src.last_pass_n();
  // The destination's console holds only what the guest printed after it arrived.
  ASSERT_TRUE(dst.wait_for([&](auto& r) { return passing(r, n_at_switch + 3); }, 30s))
      << "destination guest does not keep passing; last n=" << dst.last_pass_n();
  auto dst_status = dst.qmp->query_status();
  ASSERT_TRUE(dst_status);
  EXPECT_TRUE(dst_status->running);
  EXPECT_TRUE(dst.report.corrupt.empty()) << "page " << dst.report.corrupt[0].page;
  EXPECT_TRUE(dst.report.errors.empty()) << dst.report.errors[0];
  EXPECT_TRUE(src.report.corrupt.empty());
  EXPECT_EQ(dst.report.last_pass().begin()->second.errors, 0u);

  EXPECT_TRUE(dst.qmp->quit());
  auto code = dst.process.wait(5000ms);
  EXPECT_TRUE(code) << "QEMU exits after quit";
}

TEST_F(QmpQemuTest, CancelledMigrationLeavesSourceRunning) {
  QemuGuest& src = start("src", false);
  QemuGuest& dst = start("dst", true);
  ASSERT_TRUE(src.qmp && dst.qmp);
  ASSERT_TRUE(src.wait_for([](auto& r) { return passing(r, 2); }, 30s));
  std::string uri = listen(dst);
  // 1 MiB/s: 16 MiB of working set cannot finish before we cancel.
  ASSERT_TRUE(src.qmp->migrate_set_parameters({{"max-bandwidth", 1 << 20}}));
  ASSERT_TRUE(src.qmp->migrate(uri));
  auto active = src.qmp->query_migrate();
  ASSERT_TRUE(active);
  EXPECT_TRUE(active->status == "setup" || active->status == "active") << active->status;
  ASSERT_TRUE(src.qmp->migrate_cancel());
  auto end = src.qmp->wait_migration(20000ms);
  ASSERT_TRUE(end) << end.error().message;
  EXPECT_EQ(end->status, "cancelled");
  EXPECT_LT(end->ram_transferred, 16u << 20);

  auto status = src.qmp->query_status();
  ASSERT_TRUE(status);
  EXPECT_TRUE(status->running);
  src.poll_console();
  uint64_t n = src.last_pass_n();
  EXPECT_TRUE(src.wait_for([&](auto& r) { return passing(r, n + 2); }, 30s))
      << "source guest keeps running after the cancel";
  EXPECT_TRUE(src.report.corrupt.empty());
}

TEST_F(QmpQemuTest, BadCommandsAreErrorsAndStopContWork) {
  QemuGuest& vm = start("vm", false);
  ASSERT_TRUE(vm.qmp);
  auto r = vm.qmp->execute("no-such-command");
  ASSERT_FALSE(r);
  EXPECT_EQ(vm.qmp->error_class(), "CommandNotFound");
  EXPECT_NE(r.error().message.find("no-such-command"), std::string::npos) << r.error().message;
  auto bad_param = vm.qmp->migrate_set_parameters({{"downtime-limit", "soon"}});
  ASSERT_FALSE(bad_param);
  EXPECT_EQ(vm.qmp->error_class(), "GenericError") << bad_param.error().message;
  auto bad_uri = vm.qmp->migrate("nonsense:uri");
  ASSERT_FALSE(bad_uri);
  EXPECT_NE(bad_uri.error().message.find("QMP migrate: "), std::string::npos);

  ASSERT_TRUE(vm.qmp->stop());
  auto stopped = vm.qmp->wait_event("STOP", nullptr, 5000ms);
  EXPECT_TRUE(stopped) << stopped.error().message;
  auto status = vm.qmp->query_status();
  ASSERT_TRUE(status);
  EXPECT_EQ(status->status, "paused");
  EXPECT_FALSE(status->running);
  ASSERT_TRUE(vm.qmp->cont());
  EXPECT_TRUE(vm.qmp->wait_event("RESUME", nullptr, 5000ms));
  status = vm.qmp->query_status();
  ASSERT_TRUE(status);
  EXPECT_TRUE(status->running);

  vm.process.kill();
  auto after = vm.qmp->query_status();
  ASSERT_FALSE(after) << "a dead QEMU is an error, not a hang";
  EXPECT_EQ(after.error().message.find('\n'), std::string::npos);
}

}  // namespace
}  // namespace kvmig::host
