// MEM_PAGES: batches of guest pages, sent from guest memory with one gather write and
// received straight into guest memory with scatter reads, after every descriptor has been
// checked against the memory layout agreed in HELLO.
//
// Payload: u32 round, u32 run_count, u64 data_pages, run_count x {u64 gpa, u32 pages,
// u32 kind (0 data, 1 zero)}, then the data pages of the data runs in order, raw or (header
// flag COMPRESSED) as one zstd frame. The header checksum covers the descriptors, and the
// frame when compressed, but not raw page data: the source VM runs during pre-copy, so a page
// may change between checksum and send; it is then dirty and sent again, and VERIFY at the
// end compares all of guest memory.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "base/result.h"
#include "helper/compress.h"
#include "helper/messages.h"
#include "helper/transport.h"
#include "helper/wire.h"
#include "kvm/migratable.h"

namespace kvmig::helper {

class PageRoundLog;  // helper/verify_memory.h

// Host address of [gpa, gpa+len) or nullptr when it is not inside guest RAM (exactly what
// kvm::GuestMemory::host_ptr does).
using GpaResolver = std::function<uint8_t*(uint64_t gpa, uint64_t len)>;

struct PageRun {
  uint64_t gpa = 0;
  uint32_t pages = 0;
};

struct BatchStats {
  uint64_t pages = 0;       // data + zero
  uint64_t zero_pages = 0;
  uint64_t wire_bytes = 0;  // header + payload as sent
  uint64_t raw_bytes = 0;   // what wire_bytes would be uncompressed (sender only)
  bool compressed = false;
};

// Dirty bits to page runs (maximal runs of set bits).
std::vector<PageRun> runs_from_bitmap(const kvm::DirtyBitmap& bitmap);
// Splits runs into batches of at most max_pages pages and max_runs runs.
std::vector<std::vector<PageRun>> split_batches(std::span<const PageRun> runs,
                                                uint64_t max_pages, uint32_t max_runs);

class PageBatchSender {
 public:
  // compressor may be null (no compression).
  PageBatchSender(Stream& stream, uint16_t version, GpaResolver source,
                  PageCompressor* compressor = nullptr)
      : stream_(stream), version_(version), source_(std::move(source)), compressor_(compressor) {}
  // Sends the pages of `runs` as one MEM_PAGES; pages that read as all-zero go as markers.
  Result<BatchStats> send(uint32_t round, std::span<const PageRun> runs);

 private:
  Stream& stream_;
  uint16_t version_;
  GpaResolver source_;
  PageCompressor* compressor_;
  std::vector<uint8_t> meta_;
  std::vector<uint8_t> frame_;
  std::vector<iovec> iov_;
};

class PageBatchReceiver {
 public:
  PageBatchReceiver(Stream& stream, const MemoryLayout& layout, GpaResolver target,
                    const WireLimits& limits = {})
      : stream_(stream), layout_(layout), target_(std::move(target)), limits_(limits) {}
  // Reads the payload of a MEM_PAGES whose header was just read, writing its pages into guest
  // memory. Nothing is written before every descriptor is checked; on error the stream is
  // unusable (the session ends).
  // With expect_round, a batch of another round is [unexpected], before anything is written.
  Result<BatchStats> receive(const WireHeader& header,
                             std::optional<uint32_t> expect_round = std::nullopt);
  uint32_t last_round() const { return round_; }
  // The target is private anonymous memory (as guest RAM is): a zero run is dropped with
  // MADV_DONTNEED, after which it reads back as zeros, instead of written. Writing zeros
  // would fault in (and zero) fresh memory the guest may never touch, seconds per GiB on
  // some hosts. Without it, or where the kernel refuses (a huge page only partly covered),
  // only pages that are not already zero are written.
  void set_anonymous_target(bool on) { anonymous_target_ = on; }
  // --verify: record which round last wrote each page (may be null: off).
  void set_round_log(PageRoundLog* log) { round_log_ = log; }

 private:
  Stream& stream_;
  const MemoryLayout& layout_;
  GpaResolver target_;
  WireLimits limits_;
  PageDecompressor decompressor_;
  std::vector<uint8_t> meta_;
  std::vector<uint8_t> frame_;
  uint32_t round_ = 0;
  bool anonymous_target_ = false;
  PageRoundLog* round_log_ = nullptr;
};

}  // namespace kvmig::helper
