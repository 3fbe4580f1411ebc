#include "helper/page_sender.h"

#include <mutex>
#include <optional>
#include <thread>

#include "helper/messages.h"

namespace kvmig::helper {

void for_each_run(const uint64_t* bits, uint64_t begin, uint64_t end,
                  const std::function<void(uint64_t, uint64_t)>& fn) {
  uint64_t p = begin;
  while (p < end) {
    uint64_t word = bits[p / 64] >> (p % 64);
    if (word == 0) {
      p = (p / 64 + 1) * 64;
      continue;
    }
    p += __builtin_ctzll(word);
    if (p >= end) break;
    uint64_t start = p;
    while (p < end) {
      uint64_t w = ~(bits[p / 64] >> (p % 64));  // ones where the run stops
      uint64_t avail = 64 - p % 64;
      uint64_t n = w == 0 ? avail : std::min<uint64_t>(__builtin_ctzll(w), avail);
      p += n;
      if (n < avail) break;
    }
    if (p > end) p = end;
    fn(start, p - start);
  }
}

uint64_t count_bits(std::span<const uint64_t> bits) {
  uint64_t n = 0;
  for (uint64_t w : bits) n += __builtin_popcountll(w);
  return n;
}

PageSender::PageSender(Connection& connection, uint16_t version, GpaResolver source, bool compress)
    : connection_(connection), version_(version), source_(std::move(source)) {
  if (compress)
    for (size_t s = 0; s < connection.data.size(); ++s)
      compressors_.push_back(std::make_unique<PageCompressor>());
}

Result<void> PageSender::send_stream(size_t s, uint32_t round, kvm::DirtyTracked* tracker,
                                     std::span<const kvm::DirtyBitmap> rearm,
                                     std::span<const kvm::DirtyBitmap> send, RoundStats& mine) {
  const size_t nstreams = connection_.data.size();
  Stream& stream = *connection_.data[s];
  PageBatchSender out(stream, version_, source_,
                      compressors_.empty() ? nullptr : compressors_[s].get());
  std::vector<PageRun> batch;
  uint64_t batch_pages = 0;
  auto flush = [&]() -> Result<void> {
    if (batch.empty()) return ok();
    KVMIG_ASSIGN(BatchStats st, out.send(round, batch));
    mine.pages += st.pages;
    mine.zero_pages += st.zero_pages;
    mine.wire_bytes += st.wire_bytes;
    mine.compressed_batches += st.compressed ? 1 : 0;
    batch.clear();
    batch_pages = 0;
    return ok();
  };
  for (size_t i = 0; i < send.size(); ++i) {
    const kvm::DirtyBitmap& sb = send[i];
    const kvm::DirtyBitmap* rb = i < rearm.size() ? &rearm[i] : nullptr;
    for (uint64_t first = 0; first < sb.pages; first += kChunkPages) {
      const uint64_t chunk = (sb.gpa + first * kPageSize) / kChunkSize;
      if (chunk % nstreams != s) continue;
      const uint64_t end = std::min(first + kChunkPages, sb.pages);
      if (rb && tracker) {
        Result<void> r = ok();
        for_each_run(rb->bits.data(), first, end, [&](uint64_t p, uint64_t n) {
          if (r.ok()) r = tracker->rearm(rb->gpa + p * kPageSize, n * kPageSize);
        });
        KVMIG_TRY(r);
      }
      Result<void> r = ok();
      for_each_run(sb.bits.data(), first, end, [&](uint64_t p, uint64_t n) {
        while (n > 0 && r.ok()) {
          uint64_t take = std::min(n, kBatchPages - batch_pages);
          batch.push_back({sb.gpa + p * kPageSize, static_cast<uint32_t>(take)});
          batch_pages += take;
          p += take;
          n -= take;
          if (batch_pages == kBatchPages || batch.size() >= 16384) r = flush();
        }
      });
      KVMIG_TRY(r);
    }
  }
  KVMIG_TRY(flush());
  RoundEnd end;
  end.round = round;
  end.pages = mine.pages;
  end.zero_pages = mine.zero_pages;
  end.wire_bytes = mine.wire_bytes;
  return send_message(stream, version_, MsgType::round_end, encode(end));
}

Result<RoundStats> PageSender::send_round(uint32_t round, kvm::DirtyTracked* tracker,
                                          std::span<const kvm::DirtyBitmap> rearm,
                                          std::span<const kvm::DirtyBitmap> send) {
  const size_t n = connection_.data.size();
  if (n == 0) return wire_error(WireCode::internal, "connection has no data streams");
  std::mutex mu;
  std::optional<Error> first;
  RoundStats total;
  auto run = [&](size_t s) {
    RoundStats mine;
    auto r = send_stream(s, round, tracker, rearm, send, mine);
    std::lock_guard lock(mu);
    if (!r.ok()) {
      if (!first) {
        first = r.error();
        first->prefix(connection_.data[s]->name());
        // Unblock the other streams' threads: the session is over anyway.
        for (auto& stream : connection_.data) stream->shutdown();
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
  run(0);
  for (auto& t : threads) t.join();
  if (first) return *first;
  return total;
}

}  // namespace kvmig::helper
