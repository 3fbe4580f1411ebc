#include "helper/transport_pages.h"

#include <atomic>
#include <mutex>
#include <optional>
#include <thread>

namespace kvmig::helper {
namespace {

// Runs fn(stream) on one thread per data stream; the first error shuts every stream down so
// the other threads fail fast instead of blocking on a peer that will never answer.
template <class Fn>
Result<RoundStats> for_each_stream(Connection& connection, Fn fn) {
  const size_t n = connection.data.size();
  if (n == 0) return wire_error(WireCode::internal, "connection has no data streams");
  std::mutex mu;
  std::optional<Error> first;
  RoundStats total;
  auto run = [&](size_t s) {
    RoundStats mine;
    auto r = fn(s, mine);
    std::lock_guard lock(mu);
    if (!r.ok()) {
      if (!first) {
        first = r.error();
        first->prefix(connection.data[s]->name());
        for (auto& stream : connection.data) stream->shutdown();
      }
      return;
    }
    total.pages += mine.pages;
    total.zero_pages += mine.zero_pages;
    total.wire_bytes += mine.wire_bytes;
    total.compressed_batches += mine.compressed_batches;
  };
  std::vector<std::thread> threads;
  for (size_t s = 1; s < n; ++s) threads.emplace_back(run, s);
  run(0);  // the calling thread takes stream 0
  for (auto& t : threads) t.join();
  if (first) return *first;
  return total;
}

}  // namespace

RoundSender::RoundSender(Connection& connection, uint16_t version, GpaResolver source,
                         bool compress)
    : connection_(connection), version_(version), source_(std::move(source)) {
  if (compress)
    for (size_t s = 0; s < connection.data.size(); ++s)
      compressors_.push_back(std::make_unique<PageCompressor>(CompressMode::on));
}

Result<RoundStats> RoundSender::send(uint32_t round,
                                     std::span<const std::vector<PageRun>> batches) {
  std::atomic<size_t> next{0};
  return for_each_stream(connection_, [&](size_t s, RoundStats& mine) -> Result<void> {
    Stream& stream = *connection_.data[s];
    PageBatchSender out(stream, version_, source_,
                        compressors_.empty() ? nullptr : compressors_[s].get());
    for (size_t b = next++; b < batches.size(); b = next++) {
      KVMIG_ASSIGN(BatchStats st, out.send(round, batches[b]));
      mine.pages += st.pages;
      mine.zero_pages += st.zero_pages;
      mine.wire_bytes += st.wire_bytes;
      mine.compressed_batches += st.compressed ? 1 : 0;
    }
    RoundEnd end;
    end.round = round;
    end.pages = mine.pages;
    end.zero_pages = mine.zero_pages;
    end.wire_bytes = mine.wire_bytes;
    return send_message(stream, version_, MsgType::round_end, encode(end));
  });
}

RoundReceiver::RoundReceiver(Connection& connection, uint16_t version, const MemoryLayout& layout,
                             GpaResolver target, const WireLimits& limits)
    : connection_(connection), version_(version), limits_(limits) {
  for (auto& stream : connection.data)
    receivers_.push_back(std::make_unique<PageBatchReceiver>(*stream, layout, target, limits));
}

Result<RoundStats> RoundReceiver::receive(uint32_t round) {
  return for_each_stream(connection_, [&](size_t s, RoundStats& mine) -> Result<void> {
    Stream& stream = *connection_.data[s];
    for (;;) {
      KVMIG_ASSIGN(Message msg, read_message(stream, version_, limits_));
      if (msg.type() == MsgType::round_end) {
        KVMIG_ASSIGN(RoundEnd end, decode_round_end(msg.payload));
        if (end.round != round)
          return wire_error(WireCode::unexpected, "ROUND_END of round " +
                                                      std::to_string(end.round) + " in round " +
                                                      std::to_string(round));
        if (end.pages != mine.pages)
          return wire_error(WireCode::malformed, "ROUND_END counts " + std::to_string(end.pages) +
                                                     " pages, stream carried " +
                                                     std::to_string(mine.pages));
        return ok();
      }
      if (msg.type() != MsgType::mem_pages)
        return wire_error(WireCode::unexpected,
                          std::string(msg_type_name(msg.type())) + " on a data stream");
      KVMIG_ASSIGN(BatchStats st, receivers_[s]->receive(msg.header, round));
      mine.pages += st.pages;
      mine.zero_pages += st.zero_pages;
      mine.wire_bytes += st.wire_bytes;
      mine.compressed_batches += st.compressed ? 1 : 0;
    }
  });
}

}  // namespace kvmig::helper
