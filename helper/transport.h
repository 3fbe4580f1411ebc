// Byte streams the migration protocol runs over: a socket (TCP or unix) or, in tests, an
// in-memory pair. Gather writes and scatter reads, so page data goes from guest memory to
// the socket and from the socket into guest memory without a copy in between.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/fd.h"
#include "base/result.h"

namespace kvmig::helper {

class Stream {
 public:
  virtual ~Stream() = default;
  // Writes every byte of every iovec, or fails ([io]).
  virtual Result<void> write_all(std::span<const iovec> iov) = 0;
  // Fills every iovec, or fails: [truncated] when the peer closes first, [io] otherwise.
  virtual Result<void> read_all(std::span<const iovec> iov) = 0;
  // Stops both directions so a thread blocked in read/write returns (session abort).
  virtual void shutdown() = 0;
  virtual std::string name() const = 0;

  Result<void> write(const void* data, size_t len) {
    iovec v{const_cast<void*>(data), len};
    return write_all({&v, 1});
  }
  Result<void> read(void* data, size_t len) {
    iovec v{data, len};
    return read_all({&v, 1});
  }
};

// A connected socket of either family.
class FdStream final : public Stream {
 public:
  FdStream(Fd fd, std::string name) : fd_(std::move(fd)), name_(std::move(name)) {}
  Result<void> write_all(std::span<const iovec> iov) override;
  Result<void> read_all(std::span<const iovec> iov) override;
  void shutdown() override;
  std::string name() const override { return name_; }
  int fd() const { return fd_.get(); }
  Fd take_fd() { return std::move(fd_); }

 private:
  Fd fd_;
  std::string name_;
};

// Waits until `stream` has something to read (data, end of stream or an error: the next
// read tells which), at most `seconds`. Returns false when the time ran out. A stream without
// a descriptor (the in-memory pairs of tests) counts as readable: it is read without a deadline.
Result<bool> wait_readable(Stream& stream, double seconds);

// One migration connection: a control stream (small messages, TCP_NODELAY) and N data
// streams for MEM_PAGES, each its own socket so N cores and N TCP windows move pages at once.
struct Connection {
  std::unique_ptr<Stream> control;
  std::vector<std::unique_ptr<Stream>> data;
};

struct TransportOptions {
  int streams = 1;                    // data streams, 1..kMaxStreams
  int socket_buffer = 16 << 20;       // SO_SNDBUF/SO_RCVBUF request (the kernel may cap it)
  int accept_timeout_ms = 10000;      // how long a listener waits for the rest of a group
  // TCP only: a peer that neither acknowledges sent data nor answers keepalive probes for this
  // long is gone (TCP_USER_TIMEOUT, keepalive after a third of it), so a cut link ends a
  // session on both sides instead of leaving them blocked for TCP's ~15 minutes of retries.
  // The environment's KVMIG_LINK_TIMEOUT_MS, when set (1000..600000), overrides it.
  int link_timeout_ms = 20000;
};
inline constexpr int kMaxStreams = 16;

// "host:port" for TCP ("[::1]:port" for IPv6) or "unix:/path".
struct Endpoint {
  bool is_unix = false;
  std::string host;  // or the socket path
  uint16_t port = 0;
};
Result<Endpoint> parse_endpoint(const std::string& text);
std::string to_string(const Endpoint& endpoint);

// Opens control + data streams to a listener. Each socket starts with a 16-byte preamble
// (magic, connection nonce, stream index, stream count) so the listener can group them.
Result<Connection> connect(const Endpoint& endpoint, const TransportOptions& options);

class Listener {
 public:
  static Result<Listener> listen(const Endpoint& endpoint, const TransportOptions& options);
  // Waits for one whole connection (control then its data streams, any order after control).
  Result<Connection> accept();
  // The bound endpoint (with the real port when port 0 was asked for).
  const Endpoint& endpoint() const { return endpoint_; }
  int fd() const { return fd_.get(); }

 private:
  Listener(Fd fd, Endpoint endpoint, TransportOptions options)
      : fd_(std::move(fd)), endpoint_(std::move(endpoint)), options_(options) {}
  Fd fd_;
  Endpoint endpoint_;
  TransportOptions options_;
};

}  // namespace kvmig::helper
