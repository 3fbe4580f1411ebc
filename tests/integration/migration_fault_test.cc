// Live migration when things go wrong, on real KVM: either peer killed, a destination that
// vanishes at switch-over or after COMMIT, and hostile bytes in both directions (crafted
// with the wire codecs). The invariant under test: before COMMIT the source VM runs on,
// after COMMIT it never resumes on its own; a destination discards and says why.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <nlohmann/json.hpp>

#include "helper/messages.h"
#include "helper/migration_destination.h"
#include "helper/transport_pages.h"
#include "helper/wire_pages.h"
#include "tests/integration/fake_destination.h"
#include "tests/integration/migration_harness.h"

namespace kvmig::testing {
namespace {

using namespace std::chrono_literals;
using namespace kvmig::helper;

#define REQUIRE_GUEST()                                                                     \
  if (!have_kvm()) GTEST_SKIP() << "/dev/kvm is not available";                             \
  if (::access(guest64_path().c_str(), R_OK) != 0) GTEST_SKIP() << "test guest not built"

constexpr uint64_t kMem = 256ull << 20;

class MigrationFault : public ::testing::Test {
 protected:
  std::string path(const std::string& name) const { return scratch_.path(name); }
  std::string sock() const { return "unix:" + path("mig.sock"); }

  // A guest that never converges under a 1 us budget and never ends by itself.
  Child source() {
    SourceSpec spec;
    spec.memory = kMem;
    spec.cmdline = "ws=64M pattern=random passes=0 report_ms=50";
    spec.console = path("src.console");
    spec.control = path("src.ctl");
    Child c = start_source(spec);
    EXPECT_TRUE(wait_until([&] { return !guest_report(spec.console).passes.empty() || c.poll(); }, 30s));
    return c;
  }
  Child receiver() {
    Child c = spawn({KVMIG_BINARY, "receive", "--listen", sock(), "--console", path("dst.console"),
                     "--no-control"},
                    path("recv.out"), path("recv.err"));
    EXPECT_TRUE(wait_until([&] { return read_text(path("recv.err")).find("listening on") != std::string::npos; }, 10s));
    return c;
  }
  Child migrate(std::vector<std::string> extra = {}) {
    std::vector<std::string> args{KVMIG_BINARY, "migrate", path("src.ctl"), "--to", sock(), "--json"};
    args.insert(args.end(), extra.begin(), extra.end());
    return spawn(args, path("mig.out"), path("mig.err"));
  }
  nlohmann::json report() { return nlohmann::json::parse(read_text(path("mig.out")), nullptr, false); }
  // Round 1 moves all 256 MiB, so it lasts long enough for a 20 ms poll to catch it.
  bool in_precopy() {
    auto p = host::control_request(path("src.ctl"), {{"cmd", "migrate-progress"}});
    return p.ok() && p->value("phase", std::string()) == "precopy";
  }
  // The source guest still runs and verifies: a new pass line, no corruption, not paused.
  void expect_source_runs_on() {
    auto stats = host::control_request(path("src.ctl"), {{"cmd", "stats"}});
    ASSERT_TRUE(stats.ok()) << stats.error().message;
    EXPECT_FALSE(stats->value("paused", true));
    uint64_t n = guest_report(path("src.console")).last_pass()[0].n;
    EXPECT_TRUE(wait_until([&] { return guest_report(path("src.console")).last_pass()[0].n > n; }, 10s))
        << "source guest stopped making progress";
    auto r = guest_report(path("src.console"));
    EXPECT_TRUE(r.corrupt.empty());
    EXPECT_TRUE(r.errors.empty());
  }

  ScratchDir scratch_{"/tmp/kvmig-migfault"};
};

TEST_F(MigrationFault, DestinationKilledDuringPrecopySourceRunsOn) {
  REQUIRE_GUEST();
  Child src = source();
  Child dst = receiver();
  Child mig = migrate();
  ASSERT_TRUE(wait_until([&] { return in_precopy(); }, 20s));
  dst.kill9();
  EXPECT_EQ(mig.wait(30s), 1) << read_text(path("mig.err"));
  EXPECT_EQ(report().value("result", ""), "failed");
  EXPECT_NE(read_text(path("mig.err")).find("failed"), std::string::npos);
  expect_source_runs_on();
}

TEST_F(MigrationFault, SourceKilledDuringPrecopyDestinationDiscards) {
  REQUIRE_GUEST();
  Child src = source();
  Child dst = receiver();
  Child mig = migrate();
  ASSERT_TRUE(wait_until([&] { return in_precopy(); }, 20s));
  src.kill9();
  EXPECT_EQ(dst.wait(20s), 1);
  std::string err = read_text(path("recv.err"));
  EXPECT_NE(err.find("migration failed, nothing kept"), std::string::npos) << err;
  EXPECT_NE(mig.wait(20s).value_or(0), 0);
  EXPECT_EQ(read_text(path("dst.console")), "") << "the destination must never have run the guest";
}

// A budget smaller than the state transfer alone: convergence gives up after round 1.
TEST_F(MigrationFault, GivingUpAbortsAndTheSourceRunsOn) {
  REQUIRE_GUEST();
  Child src = source();
  Child dst = receiver();
  Child mig = migrate({"--max-downtime", "0.001"});
  EXPECT_EQ(mig.wait(30s), 1);
  EXPECT_NE(report().value("error", "").find("gave up"), std::string::npos) << report().dump();
  EXPECT_EQ(dst.wait(20s), 1);
  EXPECT_NE(read_text(path("recv.err")).find("gave up"), std::string::npos) << read_text(path("recv.err"));
  expect_source_runs_on();
}

TEST_F(MigrationFault, DestinationDiesAtSwitchoverSourceResumes) {
  REQUIRE_GUEST();
  Child src = source();
  FakeDestination fake(sock(), FakeDestination::Fail::close_at_state, kMem);
  Child mig = migrate({"--max-downtime", "1000"});
  EXPECT_EQ(mig.wait(30s), 1) << read_text(path("mig.err"));
  EXPECT_EQ(report().value("result", ""), "failed");
  expect_source_runs_on();
}

TEST_F(MigrationFault, NoDoneAfterCommitLeavesTheSourcePausedInDoubt) {
  REQUIRE_GUEST();
  Child src = source();
  FakeDestination fake(sock(), FakeDestination::Fail::close_after_commit, kMem);
  Child mig = migrate({"--max-downtime", "1000"});
  EXPECT_EQ(mig.wait(30s), 3) << read_text(path("mig.err"));
  EXPECT_EQ(report().value("result", ""), "in-doubt");
  auto stats = host::control_request(path("src.ctl"), {{"cmd", "stats"}});
  ASSERT_TRUE(stats.ok());
  EXPECT_TRUE(stats->value("paused", false)) << "after COMMIT the source must not resume on its own";
  uint64_t n = guest_report(path("src.console")).last_pass()[0].n;
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(guest_report(path("src.console")).last_pass()[0].n, n);
  // And it will not migrate again by itself: a second attempt is refused.
  auto again = host::control_request(path("src.ctl"), {{"cmd", "migrate"}, {"to", sock()}});
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->value("ok", true));
}

TEST_F(MigrationFault, GarbageAnswerToHelloIsAClearErrorSourceUnharmed) {
  REQUIRE_GUEST();
  Child src = source();
  FakeDestination fake(sock(), FakeDestination::Fail::garbage_ack, kMem);
  Child mig = migrate();
  EXPECT_EQ(mig.wait(30s), 1);
  EXPECT_NE(report().value("error", "").find("[bad_magic]"), std::string::npos) << report().dump();
  expect_source_runs_on();
}

TEST_F(MigrationFault, WrongVersionFromDestinationIsAClearError) {
  REQUIRE_GUEST();
  Child src = source();
  FakeDestination fake(sock(), FakeDestination::Fail::wrong_version_ack, kMem);
  Child mig = migrate();
  EXPECT_EQ(mig.wait(30s), 1);
  EXPECT_NE(report().value("error", "").find("[bad_version]"), std::string::npos) << report().dump();
  expect_source_runs_on();
}

// A destination that acknowledges a round it was not sent, more pages than it was sent, or
// with bytes after the message: a clear error, and the source runs on (docs/protocol.md,
// "Round acknowledgement").
TEST_F(MigrationFault, HostileRoundAcksAreClearErrorsSourceRunsOn) {
  REQUIRE_GUEST();
  Child src = source();
  const std::pair<FakeDestination::Fail, std::string> cases[] = {
      {FakeDestination::Fail::ack_wrong_round, "[unexpected] ROUND_ACK of round 2 where round 1 was due"},
      {FakeDestination::Fail::ack_extra_pages, "[malformed] ROUND_ACK of round 1: destination applied"},
      {FakeDestination::Fail::ack_garbage, "[malformed] ROUND_ACK"},
  };
  for (const auto& [fail, want] : cases) {
    SCOPED_TRACE(want);
    ::unlink(path("mig.sock").c_str());  // the last case's listener left its socket file
    FakeDestination fake(sock(), fail, kMem);
    Child mig = migrate({"--max-downtime", "1000"});
    EXPECT_EQ(mig.wait(30s), 1) << read_text(path("mig.err"));
    EXPECT_EQ(report().value("result", ""), "failed");
    EXPECT_NE(report().value("error", "").find(want), std::string::npos) << report().dump();
    EXPECT_EQ(report().value("iterations", 0), 1) << "the first round's ack ends it";
    expect_source_runs_on();
  }
}

// A version-2 destination (no ROUND_ACK): the source agrees on version 2, times its rounds
// to the drained send queues as before, does not compress under `auto`, and completes.
TEST_F(MigrationFault, DestinationWithoutRoundAcksStillCompletes) {
  REQUIRE_GUEST();
  Child src = source();
  FakeDestination fake(sock(), FakeDestination::Fail::version2, kMem);
  Child mig = migrate({"--max-downtime", "1000", "--compress", "auto"});
  EXPECT_EQ(mig.wait(30s), 0) << read_text(path("mig.err"));
  EXPECT_EQ(report().value("result", ""), "completed") << report().dump();
  EXPECT_GE(report().value("iterations", 0), 2) << "pre-copy and the final round";
  // --compress auto sends raw pages to a peer whose rounds cannot be timed to an ack.
  EXPECT_FALSE(report().value("compress", true)) << report().dump();
  EXPECT_EQ(report().value("compressed_batches", -1), 0) << report().dump();
}

// A destination that stops answering but keeps its sockets open (a hung process: the kernel
// still acknowledges every byte, so the link timeout never fires, and over a unix socket
// there is none): the source gives up after its reply deadline (helper/round_timing.h,
// reply_deadline: 2 s for rounds this small), before COMMIT, and runs on.
TEST_F(MigrationFault, DestinationThatStopsAnsweringIsADeadlineErrorSourceRunsOn) {
  REQUIRE_GUEST();
  Child src = source();
  const struct {
    FakeDestination::Fail fail;
    std::vector<std::string> args;
    std::string want;
  } cases[] = {
      // 5 ms budget: round 2 is usually a live pre-copy round; if the guest dirtied little in
      // round 1 (a loaded host) it is the final one. Either way its ROUND_ACK never comes.
      {FakeDestination::Fail::silent_after_round1, {}, "sent no ROUND_ACK of round 2 within"},
      // The same with round 2 surely the final one (1 s budget).
      {FakeDestination::Fail::silent_after_round1, {"--max-downtime", "1000"}, "sent no ROUND_ACK of round 2 within"},
      // 1 s budget: round 2 is the final, paused round; its ack comes, READY never does.
      {FakeDestination::Fail::silent_at_ready, {"--max-downtime", "1000"}, "sent no READY within"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.want);
    ::unlink(path("mig.sock").c_str());
    FakeDestination fake(sock(), c.fail, kMem);
    auto begin = std::chrono::steady_clock::now();
    Child mig = migrate(c.args);
    EXPECT_EQ(mig.wait(30s), 1) << read_text(path("mig.err"));
    EXPECT_LT(std::chrono::steady_clock::now() - begin, 20s) << "the deadline, not a link timeout, ended it";
    EXPECT_EQ(report().value("result", ""), "failed");
    EXPECT_NE(report().value("error", "").find(c.want), std::string::npos) << report().dump();
    EXPECT_EQ(report().value("iterations", 0), 2) << report().dump();
    expect_source_runs_on();
  }
}

// The destination's record keeping (helper/session_events.h), with an in-process destination.
struct RecordingEvents : SessionEvents {
  std::mutex mu;
  std::vector<std::string> calls;
  bool fail_completed = false;
  Result<void> note(const std::string& what) {
    std::lock_guard lock(mu);
    calls.push_back(what);
    return ok();
  }
  Result<void> on_started(const SessionVm& vm) override { return note("started " + vm.migration_id); }
  Result<void> on_round(const SessionVm&) override { return ok(); }
  Result<void> on_completed(const SessionVm&) override {
    (void)note("completed");
    if (fail_completed) return Error{"disk full"};
    return ok();
  }
  Result<void> on_aborted(const SessionVm&, const std::string&) override { return note("aborted"); }
};

struct InProcessDestination {
  InProcessDestination(const std::string& listen, RecordingEvents& events) {
    auto l = Listener::listen(*parse_endpoint(listen), {});
    EXPECT_TRUE(l.ok());
    listener.emplace(std::move(*l));
    thread = std::thread([this, &events] {
      auto conn = listener->accept();
      if (!conn.ok()) return;
      DestinationOptions opt;
      opt.console_path = "/dev/null";
      opt.events = &events;
      auto got = receive_machine(*conn, opt);
      ok = got.ok();
      if (got.ok()) {
        got->machine->stop(0);
        (void)got->machine->wait();
      } else {
        error = got.error().message;
      }
    });
  }
  ~InProcessDestination() { thread.join(); }
  std::optional<Listener> listener;
  std::thread thread;
  bool ok = false;
  std::string error;
};

TEST_F(MigrationFault, DestinationRecordsStartedThenCompletedBeforeRunning) {
  REQUIRE_GUEST();
  Child src = source();
  RecordingEvents events;
  {
    InProcessDestination dst(sock(), events);
    Child mig = migrate({"--max-downtime", "1000", "--streams", "2"});
    EXPECT_EQ(mig.wait(30s), 0) << read_text(path("mig.err"));
  }
  ASSERT_EQ(events.calls.size(), 2u);
  EXPECT_EQ(events.calls[0].rfind("started mig-", 0), 0u) << events.calls[0];
  EXPECT_EQ(events.calls[1], "completed");
}

TEST_F(MigrationFault, CompletionNotRecordedMeansTheVmNeverRunsAndTheSourceIsInDoubt) {
  REQUIRE_GUEST();
  Child src = source();
  RecordingEvents events;
  events.fail_completed = true;
  std::string dst_error;
  {
    InProcessDestination dst(sock(), events);
    Child mig = migrate({"--max-downtime", "1000"});
    EXPECT_EQ(mig.wait(30s), 3) << read_text(path("mig.err"));
    dst.thread.join();
    dst.thread = std::thread([] {});
    EXPECT_FALSE(dst.ok);
    dst_error = dst.error;
  }
  EXPECT_NE(dst_error.find("disk full"), std::string::npos) << dst_error;
  EXPECT_EQ(events.calls.back(), "aborted");
  EXPECT_EQ(report().value("result", ""), "in-doubt");
  auto stats = host::control_request(path("src.ctl"), {{"cmd", "stats"}});
  ASSERT_TRUE(stats.ok());
  EXPECT_TRUE(stats->value("paused", false));
}

// --- hostile sources against the real `kvmig receive` ---

Hello good_hello() {
  Hello h;
  h.migration_id = "fault-test";
  h.vcpus = 1;
  h.memory.ranges.push_back({0, kMem});
  h.streams = 1;
  return h;
}

// Runs `act` against a fresh receiver; returns (exit status, stderr, the ERROR it sent).
struct Outcome {
  int status = -1;
  std::string err;
  std::optional<ErrorMsg> sent;
};

class ReceiverFault : public MigrationFault {
 protected:
  Outcome against_receiver(const std::function<void(Connection&)>& act) {
    Child dst = receiver();
    auto conn = connect(*parse_endpoint(sock()), {});
    EXPECT_TRUE(conn.ok()) << conn.error().message;
    Outcome o;
    if (conn.ok()) {
      act(*conn);
      // Whatever the receiver said before it closed.
      for (;;) {
        auto m = read_message(*conn->control, 0, {});
        if (!m.ok()) break;
        if (m->type() == MsgType::error) {
          auto e = decode_error(m->payload);
          if (e.ok()) o.sent = *e;
        }
      }
    }
    o.status = dst.wait(20s).value_or(-1);
    o.err = read_text(path("recv.err"));
    return o;
  }
};

TEST_F(ReceiverFault, GarbageBytesAreRefused) {
  REQUIRE_GUEST();
  Outcome o = against_receiver([](Connection& c) {
    std::string junk(100, '\x5a');
    ASSERT_TRUE(c.control->write(junk.data(), junk.size()).ok());
  });
  EXPECT_EQ(o.status, 1);
  EXPECT_NE(o.err.find("[bad_magic]"), std::string::npos) << o.err;
}

TEST_F(ReceiverFault, WrongVersionIsRefusedWithAnError) {
  REQUIRE_GUEST();
  Outcome o = against_receiver([](Connection& c) {
    ASSERT_TRUE(send_message(*c.control, kWireVersion + 7, MsgType::hello, encode(good_hello())).ok());
  });
  EXPECT_EQ(o.status, 1);
  EXPECT_NE(o.err.find("[bad_version]"), std::string::npos) << o.err;
  ASSERT_TRUE(o.sent);
  EXPECT_EQ(o.sent->code, WireCode::bad_version);
}

TEST_F(ReceiverFault, TruncatedStreamIsRefused) {
  REQUIRE_GUEST();
  Outcome o = against_receiver([](Connection& c) {
    std::vector<uint8_t> hello = encode(good_hello());
    WireHeader h = make_header(MsgType::hello, kWireVersion, hello, hello.size());
    uint8_t head[kHeaderSize];
    encode_header(h, head);
    ASSERT_TRUE(c.control->write(head, kHeaderSize).ok());
    ASSERT_TRUE(c.control->write(hello.data(), hello.size() / 2).ok());
    c.control->shutdown();
  });
  EXPECT_EQ(o.status, 1);
  EXPECT_NE(o.err.find("[truncated]"), std::string::npos) << o.err;
}

TEST_F(ReceiverFault, PagesOutsideGuestMemoryAreRefusedBeforeAnyWrite) {
  REQUIRE_GUEST();
  std::vector<uint8_t> page(kPageSize, 0xab);
  Outcome o = against_receiver([&](Connection& c) {
    ASSERT_TRUE(send_message(*c.control, kWireVersion, MsgType::hello, encode(good_hello())).ok());
    auto ack = read_message(*c.control, 0, {});
    ASSERT_TRUE(ack.ok() && ack->type() == MsgType::hello_ack);
    PageBatchSender out(*c.data[0], kWireVersion, [&](uint64_t, uint64_t) { return page.data(); });
    PageRun run{kMem, 1};  // the first page past guest RAM
    ASSERT_TRUE(out.send(1, {&run, 1}).ok());
  });
  EXPECT_EQ(o.status, 1);
  EXPECT_NE(o.err.find("[gpa_out_of_range]"), std::string::npos) << o.err;
  ASSERT_TRUE(o.sent);
  EXPECT_EQ(o.sent->code, WireCode::gpa_out_of_range);
}

// ROUND_ACK only ever flows from destination to source.
TEST_F(ReceiverFault, RoundAckFromTheSourceIsUnexpected) {
  REQUIRE_GUEST();
  Outcome o = against_receiver([](Connection& c) {
    ASSERT_TRUE(send_message(*c.control, kWireVersion, MsgType::hello, encode(good_hello())).ok());
    auto ack = read_message(*c.control, 0, {});
    ASSERT_TRUE(ack.ok() && ack->type() == MsgType::hello_ack);
    ASSERT_TRUE(send_message(*c.control, kWireVersion, MsgType::round_ack, encode(RoundAck{1, 0, 0})).ok());
  });
  EXPECT_EQ(o.status, 1);
  EXPECT_NE(o.err.find("[unexpected] ROUND_ACK"), std::string::npos) << o.err;
  ASSERT_TRUE(o.sent);
  EXPECT_EQ(o.sent->code, WireCode::unexpected);
}

TEST_F(ReceiverFault, LayoutThisVmmDoesNotBuildIsAConfigMismatch) {
  REQUIRE_GUEST();
  Outcome o = against_receiver([](Connection& c) {
    Hello h = good_hello();
    h.memory.ranges[0].gpa = 1ull << 30;  // RAM that does not start at 0
    ASSERT_TRUE(send_message(*c.control, kWireVersion, MsgType::hello, encode(h)).ok());
  });
  EXPECT_EQ(o.status, 1);
  EXPECT_NE(o.err.find("[config_mismatch]"), std::string::npos) << o.err;
  ASSERT_TRUE(o.sent);
  EXPECT_EQ(o.sent->code, WireCode::config_mismatch);
}

}  // namespace
}  // namespace kvmig::testing
