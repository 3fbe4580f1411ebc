#include "kvm/block_write_log.h"

#include <bit>
#include <stdexcept>
#include <string>

namespace kvmig::kvm {

namespace {
constexpr uint64_t kMinBlock = 4 * 1024;
constexpr uint64_t kMaxBlock = 2 * 1024 * 1024;
}  // namespace

BlockWriteLog::BlockWriteLog(uint64_t disk_bytes, uint64_t block_bytes)
    : disk_bytes_(disk_bytes), block_bytes_(block_bytes) {
  if (block_bytes < kMinBlock || block_bytes > kMaxBlock || !std::has_single_bit(block_bytes))
    throw std::invalid_argument("block size " + std::to_string(block_bytes) +
                                " is not a power of two in 4 KiB .. 2 MiB");
  block_shift_ = static_cast<unsigned>(std::countr_zero(block_bytes));
  blocks_ = (disk_bytes + block_bytes - 1) >> block_shift_;
  uint64_t words = (blocks_ + 63) / 64;
  // make_unique<T[]> value-initialises: every bit and counter starts at zero.
  dirty_ = std::make_unique<std::atomic<uint64_t>[]>(words);
  writes_ = std::make_unique<std::atomic<uint32_t>[]>(blocks_);
}

void BlockWriteLog::start() {
  // Clear first, then publish tracking: a mark() that sees tracking_ set lands after the
  // clear and is kept. Marks of a previous tracking period racing with this are dropped,
  // which is what "start clears" means.
  uint64_t words = (blocks_ + 63) / 64;
  for (uint64_t w = 0; w < words; ++w) dirty_[w].store(0, std::memory_order_relaxed);
  for (uint64_t b = 0; b < blocks_; ++b) writes_[b].store(0, std::memory_order_relaxed);
  tracking_.store(true, std::memory_order_release);
}

void BlockWriteLog::stop() { tracking_.store(false, std::memory_order_release); }

void BlockWriteLog::mark(uint64_t offset, uint64_t len) {
  if (len == 0 || offset >= disk_bytes_ || !tracking()) return;
  uint64_t end = offset + len;
  if (end > disk_bytes_ || end < offset) end = disk_bytes_;
  uint64_t first = offset >> block_shift_;
  uint64_t last = (end - 1) >> block_shift_;
  for (uint64_t b = first; b <= last; ++b) {
    // Count before setting the bit: a harvest that clears the bit then reads the counter
    // sees at least this write.
    uint32_t old = writes_[b].load(std::memory_order_relaxed);
    while (old != UINT32_MAX && !writes_[b].compare_exchange_weak(old, old + 1, std::memory_order_relaxed)) {
    }
    dirty_[b / 64].fetch_or(uint64_t{1} << (b % 64), std::memory_order_acq_rel);
  }
}

std::vector<BlockWriteLog::DirtyBlock> BlockWriteLog::harvest() {
  std::vector<DirtyBlock> out;
  uint64_t words = (blocks_ + 63) / 64;
  for (uint64_t w = 0; w < words; ++w) {
    if (dirty_[w].load(std::memory_order_relaxed) == 0) continue;
    // exchange() takes exactly the bits set so far; a bit set after it stays for the next
    // harvest, so no mark is lost between the read and the clear.
    uint64_t bits = dirty_[w].exchange(0, std::memory_order_acq_rel);
    while (bits) {
      unsigned bit = static_cast<unsigned>(std::countr_zero(bits));
      bits &= bits - 1;
      uint64_t index = w * 64 + bit;
      out.push_back({index, writes_[index].load(std::memory_order_relaxed)});
    }
  }
  return out;
}

}  // namespace kvmig::kvm
