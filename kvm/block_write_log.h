// Per-block write tracking of one disk, for live disk migration (issue 4 item 2, after
// US8560791): which blocks the guest wrote since the last harvest, and how often each was
// written since tracking started, so the mover can copy cold blocks first and defer hot ones.
//
// The block device calls mark() for every completed guest write, from its completion thread;
// the migration thread harvests concurrently. Marking is lock-free: one atomic dirty bit and
// one atomic write counter per block. harvest() clears each dirty bit with an atomic
// exchange, so a mark() racing with a harvest is either in this harvest or in the next one,
// never lost.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace kvmig::kvm {

class BlockWriteLog {
 public:
  // block_bytes: power of two, 4 KiB .. 2 MiB (default 64 KiB); disk_bytes need not be a multiple.
  // Throws std::invalid_argument for a block size outside that (callers validate user input
  // first, with parse_block_bytes-style checks, so this is a programming error).
  explicit BlockWriteLog(uint64_t disk_bytes, uint64_t block_bytes = 64 * 1024);
  BlockWriteLog(const BlockWriteLog&) = delete;
  BlockWriteLog& operator=(const BlockWriteLog&) = delete;

  uint64_t disk_bytes() const { return disk_bytes_; }
  uint64_t block_bytes() const { return block_bytes_; }
  uint64_t blocks() const { return blocks_; }

  void start();  // begin tracking: clears the dirty set and the write counts
  void stop();
  bool tracking() const { return tracking_.load(std::memory_order_acquire); }

  // Marks every block touched by [offset, offset + len), clipped to the disk. Thread-safe
  // (atomics), no-op when not tracking.
  void mark(uint64_t offset, uint64_t len);

  struct DirtyBlock {
    uint64_t index;
    uint32_t writes;  // count since start()
  };
  // Blocks written since the previous harvest (or start), ascending; clears the dirty set atomically
  // per block so a concurrent mark() is never lost (it shows up in the next harvest).
  std::vector<DirtyBlock> harvest();

 private:
  uint64_t disk_bytes_;
  uint64_t block_bytes_;
  unsigned block_shift_;
  uint64_t blocks_;
  std::atomic<bool> tracking_{false};
  std::unique_ptr<std::atomic<uint64_t>[]> dirty_;    // one bit per block
  std::unique_ptr<std::atomic<uint32_t>[]> writes_;   // one counter per block
};

}  // namespace kvmig::kvm
