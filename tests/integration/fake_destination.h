// A migration destination written with the wire codecs, to fail on purpose at a chosen point
// (tests/integration/migration_fault_test.cc): it speaks just enough of docs/protocol.md to
// take a real source through pre-copy, switch-over and COMMIT.
#pragma once

#include <gtest/gtest.h>
#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "helper/messages.h"
#include "helper/transport.h"
#include "helper/transport_pages.h"

namespace kvmig::testing {

// A destination written with the wire codecs, to fail on purpose at a chosen point.
class FakeDestination {
 public:
  // ack_*: a hostile ROUND_ACK of round 1; version2: an older destination that never
  // acknowledges rounds but otherwise completes the migration (DONE after COMMIT);
  // silent_after_round1 / silent_at_ready: a destination that stops answering (no ROUND_ACK
  // after round 1 / no READY) but keeps reading, its sockets open.
  enum class Fail {
    garbage_ack,
    wrong_version_ack,
    close_at_state,
    close_after_commit,
    ack_wrong_round,
    ack_extra_pages,
    ack_garbage,
    version2,
    silent_after_round1,
    silent_at_ready,
  };

  FakeDestination(const std::string& listen, Fail fail, uint64_t memory) : fail_(fail), mem_size_(memory) {
    auto ep = helper::parse_endpoint(listen);
    auto l = helper::Listener::listen(*ep, {});
    EXPECT_TRUE(l.ok());
    listener_.emplace(std::move(*l));
    mem_ = static_cast<uint8_t*>(::mmap(nullptr, mem_size_, PROT_READ | PROT_WRITE,
                                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    thread_ = std::thread([this] { run(); });
  }
  ~FakeDestination() {
    thread_.join();
    ::munmap(mem_, mem_size_);
  }

 private:
  void run() {
    auto conn = listener_->accept();
    if (!conn.ok()) return;
    helper::Stream& ctl = *conn->control;
    auto hello = helper::read_message(ctl, 0, {});
    if (!hello.ok()) return;
    if (fail_ == Fail::garbage_ack) {
      std::string junk(64, 'x');
      (void)ctl.write(junk.data(), junk.size());
      return;
    }
    helper::HelloAck ack;
    if (fail_ == Fail::wrong_version_ack) {
      ack.version = helper::kWireVersion + 5;
      (void)helper::send_message(ctl, helper::kWireVersion + 5, helper::MsgType::hello_ack, helper::encode(ack));
      return;
    }
    const uint16_t version = fail_ == Fail::version2 ? 2 : helper::kWireVersion;
    ack.version = version;
    (void)helper::send_message(ctl, version, helper::MsgType::hello_ack, helper::encode(ack));
    helper::MemoryLayout layout;
    layout.ranges.push_back({0, mem_size_});
    std::atomic<bool> stop{false};
    std::thread pages([&] {
      helper::RoundReceiver rr(*conn, version, layout,
                       [this](uint64_t gpa, uint64_t len) { return gpa + len <= mem_size_ ? mem_ + gpa : nullptr; });
      for (uint32_t r = 1; !stop && rr.receive(r).ok(); ++r) {
      }
    });
    for (;;) {
      auto m = helper::read_message(ctl, version, {});
      if (!m.ok()) break;
      if (m->type() == helper::MsgType::round_end && version >= helper::kRoundAckVersion) {
        // Acknowledged from the control ROUND_END's own counts: what the source expects back.
        auto end = helper::decode_round_end(m->payload);
        if (!end.ok()) break;
        if (fail_ == Fail::silent_after_round1 && end->round > 1) continue;
        helper::RoundAck a{end->round, end->pages, end->wire_bytes};
        if (fail_ == Fail::ack_wrong_round) a.round += 1;
        if (fail_ == Fail::ack_extra_pages) a.pages += 1;
        std::vector<uint8_t> payload = helper::encode(a);
        if (fail_ == Fail::ack_garbage) payload.push_back(0x5a);  // a trailing byte
        (void)helper::send_message(ctl, version, helper::MsgType::round_ack, payload);
      }
      if (m->type() == helper::MsgType::state && fail_ == Fail::close_at_state) break;
      // Silent means silent: a round 2 that turned out to be the final one (the guest happened
      // to converge) must not be answered with READY either.
      if (m->type() == helper::MsgType::state && ++sections_ == 4 && fail_ != Fail::silent_at_ready &&
          fail_ != Fail::silent_after_round1)
        (void)helper::send_message(ctl, version, helper::MsgType::ready);
      if (m->type() == helper::MsgType::commit) {
        // close_after_commit: vanish without DONE; an old destination that completes: DONE.
        if (fail_ == Fail::version2) (void)helper::send_message(ctl, version, helper::MsgType::done);
        break;
      }
    }
    stop = true;
    ctl.shutdown();
    for (auto& d : conn->data) d->shutdown();
    pages.join();
  }

  Fail fail_;
  std::optional<helper::Listener> listener_;
  uint64_t mem_size_;
  uint8_t* mem_ = nullptr;
  int sections_ = 0;
  std::thread thread_;
};

}  // namespace kvmig::testing
