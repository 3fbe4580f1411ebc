// One pre-copy round over all data streams of a connection: the sender spreads batches over
// the streams (one thread each, taking the next batch as it frees up, so a slow stream does
// not hold a share hostage) and ends the round with ROUND_END on every stream; the receiver
// reads every stream into guest memory until each has delivered that ROUND_END. This is the
// per-round barrier of docs/protocol.md: a page resent in round r+1 never lands before its
// round-r copy.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "base/result.h"
#include "helper/compress.h"
#include "helper/messages.h"
#include "helper/transport.h"
#include "helper/wire_pages.h"

namespace kvmig::helper {

struct RoundStats {
  uint64_t pages = 0;
  uint64_t zero_pages = 0;
  uint64_t wire_bytes = 0;
  uint64_t raw_bytes = 0;  // wire_bytes had nothing been compressed (sender only)
  uint64_t compressed_batches = 0;
};

class RoundSender {
 public:
  RoundSender(Connection& connection, uint16_t version, GpaResolver source, bool compress);
  // Sends every batch, then ROUND_END{round} on each data stream. On a stream error all
  // streams are shut down (so no thread stays blocked) and the first error is returned.
  Result<RoundStats> send(uint32_t round, std::span<const std::vector<PageRun>> batches);

 private:
  Connection& connection_;
  uint16_t version_;
  GpaResolver source_;
  std::vector<std::unique_ptr<PageCompressor>> compressors_;  // per stream; keeps backoff
};

class RoundReceiver {
 public:
  RoundReceiver(Connection& connection, uint16_t version, const MemoryLayout& layout,
                GpaResolver target, const WireLimits& limits = {});
  // Returns when every data stream has delivered ROUND_END{round}. A batch or ROUND_END of
  // another round, or any other message on a data stream, is [unexpected].
  Result<RoundStats> receive(uint32_t round);
  // See PageBatchReceiver::set_anonymous_target: guest RAM here is private anonymous.
  void set_anonymous_target(bool on) {
    for (auto& r : receivers_) r->set_anonymous_target(on);
  }
  // See PageBatchReceiver::set_round_log (--verify's report of where memory differs).
  void set_round_log(PageRoundLog* log) {
    for (auto& r : receivers_) r->set_round_log(log);
  }

 private:
  Connection& connection_;
  uint16_t version_;
  WireLimits limits_;
  std::vector<std::unique_ptr<PageBatchReceiver>> receivers_;  // per stream
};

}  // namespace kvmig::helper
