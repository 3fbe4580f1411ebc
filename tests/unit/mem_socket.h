// An in-memory socket pair for protocol tests, with error injection on the bytes in flight:
// truncation (the writer's side closes after N bytes), bit flips at absolute offsets, and raw
// garbage. Thread-safe, so a sender and a receiver thread can run against each other.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <utility>

#include "helper/transport.h"
#include "helper/wire.h"

namespace kvmig::helper::testing {

// One direction of the pair.
class MemPipe {
 public:
  // Bytes after the first n are dropped and the pipe closes: the reader sees a truncation.
  void truncate_after(uint64_t n) {
    std::lock_guard lock(mu_);
    truncate_at_ = n;
  }
  // XORs the byte at absolute stream offset `offset` with `mask` when it is written.
  void flip(uint64_t offset, uint8_t mask) {
    std::lock_guard lock(mu_);
    flips_[offset] ^= mask;
  }
  // Writes raw bytes as if the peer had sent them.
  void inject(std::span<const uint8_t> bytes) { push(bytes.data(), bytes.size()); }
  void close() {
    std::lock_guard lock(mu_);
    closed_ = true;
    cv_.notify_all();
  }
  uint64_t written() const {
    std::lock_guard lock(mu_);
    return offset_;
  }

  bool push(const uint8_t* data, size_t len) {
    std::lock_guard lock(mu_);
    if (closed_) return false;
    for (size_t i = 0; i < len; ++i, ++offset_) {
      if (offset_ >= truncate_at_) {
        closed_ = true;
        break;
      }
      uint8_t b = data[i];
      if (auto it = flips_.find(offset_); it != flips_.end()) b ^= it->second;
      buf_.push_back(b);
    }
    cv_.notify_all();
    return true;
  }
  // False when the pipe closed before len bytes arrived.
  bool pop(uint8_t* out, size_t len) {
    std::unique_lock lock(mu_);
    while (len > 0) {
      cv_.wait(lock, [&] { return !buf_.empty() || closed_; });
      if (buf_.empty()) return false;
      size_t n = std::min(len, buf_.size());
      std::copy_n(buf_.begin(), n, out);
      buf_.erase(buf_.begin(), buf_.begin() + static_cast<std::ptrdiff_t>(n));
      out += n;
      len -= n;
    }
    return true;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<uint8_t> buf_;
  std::map<uint64_t, uint8_t> flips_;
  uint64_t offset_ = 0;
  uint64_t truncate_at_ = UINT64_MAX;
  bool closed_ = false;
};

class MemStream final : public Stream {
 public:
  MemStream(std::shared_ptr<MemPipe> in, std::shared_ptr<MemPipe> out, std::string name)
      : in_(std::move(in)), out_(std::move(out)), name_(std::move(name)) {}
  ~MemStream() override { out_->close(); }

  Result<void> write_all(std::span<const iovec> iov) override {
    for (const iovec& v : iov)
      if (!out_->push(static_cast<const uint8_t*>(v.iov_base), v.iov_len))
        return wire_error(WireCode::io, name_ + ": peer closed");
    return ok();
  }
  Result<void> read_all(std::span<const iovec> iov) override {
    for (const iovec& v : iov)
      if (!in_->pop(static_cast<uint8_t*>(v.iov_base), v.iov_len))
        return wire_error(WireCode::truncated, name_ + ": peer closed the stream");
    return ok();
  }
  void shutdown() override {
    in_->close();
    out_->close();
  }
  std::string name() const override { return name_; }

  MemPipe& outgoing() { return *out_; }  // what this end sends: inject faults here

 private:
  std::shared_ptr<MemPipe> in_, out_;
  std::string name_;
};

inline std::pair<std::unique_ptr<MemStream>, std::unique_ptr<MemStream>> mem_socket_pair() {
  auto a_to_b = std::make_shared<MemPipe>();
  auto b_to_a = std::make_shared<MemPipe>();
  return {std::make_unique<MemStream>(b_to_a, a_to_b, "mem-a"),
          std::make_unique<MemStream>(a_to_b, b_to_a, "mem-b")};
}

}  // namespace kvmig::helper::testing
