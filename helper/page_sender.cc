#include "helper/page_sender.h"

#include <linux/sockios.h>
#include <sys/ioctl.h>

#include <algorithm>
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

namespace {

bool page_is_zero(const uint8_t* p) {
  const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
  for (size_t i = 0; i < kPageSize / 8; i += 8) {
    if (w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7]) return false;
  }
  return true;
}

}  // namespace

uint64_t count_bits(std::span<const uint64_t> bits) {
  uint64_t n = 0;
  for (uint64_t w : bits) n += __builtin_popcountll(w);
  return n;
}

PageSender::PageSender(Connection& connection, uint16_t version, GpaResolver source,
                       CompressMode compress, bool skip_untouched)
    : connection_(connection), version_(version), source_(std::move(source)), skip_untouched_(skip_untouched) {
  if (compress == CompressMode::off) return;
  // The streams compress in parallel, as far as there are CPUs for them.
  const size_t n = connection.data.size();
  const double cpus = std::max(1u, std::thread::hardware_concurrency());
  const double share = n > 0 ? std::min(1.0, cpus / static_cast<double>(n)) : 1.0;
  for (size_t s = 0; s < n; ++s) compressors_.push_back(std::make_unique<PageCompressor>(compress, share));
}

Result<void> PageSender::send_stream(size_t s, uint32_t round, kvm::DirtyTracker* tracker,
                                     std::span<const kvm::DirtyBitmap> rearm,
                                     std::span<const kvm::DirtyBitmap> send, bool fresh,
                                     RoundStats& mine) {
  const size_t nstreams = connection_.data.size();
  Stream& stream = *connection_.data[s];
  PageBatchSender out(stream, version_, source_,
                      compressors_.empty() ? nullptr : compressors_[s].get());
  std::vector<PageRun> batch;
  uint64_t batch_pages = 0;
  uint64_t skipped = 0;  // zero pages of a fresh destination: counted, not sent
  std::vector<uint8_t> touched;  // per page of the current run: may hold data (fresh only)
  auto flush = [&]() -> Result<void> {
    if (batch.empty()) return ok();
    KVMIG_ASSIGN(BatchStats st, out.send(round, batch));
    mine.pages += st.pages;
    mine.zero_pages += st.zero_pages;
    mine.wire_bytes += st.wire_bytes;
    mine.raw_bytes += st.raw_bytes;
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
        // One KVM_CLEAR_DIRTY_LOG with the harvested bits of the chunk, however scattered:
        // exactly the pages harvested dirty, never one written since (that write would be
        // cleared without being sent).
        std::span<const uint64_t> words(rb->bits.data() + first / 64, (end - first + 63) / 64);
        bool any = false;
        for (uint64_t w : words) any |= w != 0;
        if (any) KVMIG_TRY(tracker->rearm_bits(rb->gpa + first * kPageSize, end - first, words));
      }
      Result<void> r = ok();
      auto add = [&](uint64_t p, uint64_t n) {
        while (n > 0 && r.ok()) {
          uint64_t take = std::min(n, kBatchPages - batch_pages);
          batch.push_back({sb.gpa + p * kPageSize, static_cast<uint32_t>(take)});
          batch_pages += take;
          p += take;
          n -= take;
          if (batch_pages == kBatchPages || batch.size() >= 16384) r = flush();
        }
      };
      for_each_run(sb.bits.data(), first, end, [&](uint64_t p, uint64_t n) {
        if (!fresh) return add(p, n);
        const uint8_t* host = source_(sb.gpa + p * kPageSize, n * kPageSize);
        if (!host) return add(p, n);  // let the batch sender report it
        // Never-touched pages are zero without reading them (and faulting each in): asked
        // after the chunk was rearmed above, so a write from now on is in the next harvest.
        if (!skip_untouched_ || !residency_.touched(host, n, touched)) touched.assign(n, 1);
        auto is_zero = [&](uint64_t k) { return !touched[k] || page_is_zero(host + k * kPageSize); };
        for (uint64_t i = 0; i < n;) {
          uint64_t j = i + 1;
          const bool zero = is_zero(i);
          while (j < n && is_zero(j) == zero) ++j;
          if (zero) {
            mine.pages += j - i;
            mine.zero_pages += j - i;
            skipped += j - i;
          } else {
            add(p + i, j - i);
          }
          i = j;
        }
      });
      KVMIG_TRY(r);
    }
  }
  KVMIG_TRY(flush());
  skipped_ += skipped;
  RoundEnd end;
  end.round = round;
  end.pages = mine.pages - skipped;  // what this stream carried
  end.zero_pages = mine.zero_pages - skipped;
  end.wire_bytes = mine.wire_bytes;
  return send_message(stream, version_, MsgType::round_end, encode(end));
}

bool PageSender::wait_drained(std::chrono::milliseconds limit) const {
  const auto end = std::chrono::steady_clock::now() + limit;
  for (;;) {
    bool empty = true;
    for (const auto& stream : connection_.data) {
      auto* fs = dynamic_cast<const FdStream*>(stream.get());
      int queued = 0;
      if (fs && ::ioctl(fs->fd(), SIOCOUTQ, &queued) == 0 && queued > 0) empty = false;
    }
    if (empty) return true;
    if (std::chrono::steady_clock::now() >= end) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

Result<RoundStats> PageSender::send_round(uint32_t round, kvm::DirtyTracker* tracker,
                                          std::span<const kvm::DirtyBitmap> rearm,
                                          std::span<const kvm::DirtyBitmap> send,
                                          bool fresh_destination) {
  const size_t n = connection_.data.size();
  if (n == 0) return wire_error(WireCode::internal, "connection has no data streams");
  std::mutex mu;
  std::optional<Error> first;
  RoundStats total;
  skipped_ = 0;
  auto run = [&](size_t s) {
    RoundStats mine;
    auto r = send_stream(s, round, tracker, rearm, send, fresh_destination, mine);
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
    total.raw_bytes += mine.raw_bytes;
    total.compressed_batches += mine.compressed_batches;
  };
  // A small round (the paused one, typically) goes out from this thread, stream after
  // stream: a thread per stream would be started and scheduled for microseconds of work,
  // and on a busy host each wake-up can cost a scheduler slice of downtime.
  uint64_t pages = 0;
  for (const auto& b : send) pages += count_bits(b.bits);
  if (pages <= kSerialRoundPages) {
    for (size_t s = 0; s < n && !first; ++s) run(s);
    if (first) return *first;
    return total;
  }
  std::vector<std::thread> threads;
  for (size_t s = 1; s < n; ++s) threads.emplace_back(run, s);
  run(0);
  for (auto& t : threads) t.join();
  if (first) return *first;
  return total;
}

}  // namespace kvmig::helper
