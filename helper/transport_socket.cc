// TCP and unix-socket connections: connect a group of streams, listen, accept a group.
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "helper/transport.h"
#include "helper/wire.h"

namespace kvmig::helper {
namespace {

constexpr uint32_t kPreambleMagic = 0x5453474b;  // "KGST"
constexpr size_t kPreambleSize = 16;

struct Preamble {
  uint16_t index = 0;  // 0 = control
  uint16_t count = 0;  // sockets in the group, control included
  uint64_t nonce = 0;  // the same on every socket of one connection
};

void encode_preamble(const Preamble& p, uint8_t out[kPreambleSize]) {
  ByteWriter w;
  w.u32(kPreambleMagic);
  w.u16(p.index);
  w.u16(p.count);
  w.u64(p.nonce);
  std::memcpy(out, w.buffer().data(), kPreambleSize);
}

Result<Preamble> decode_preamble(const uint8_t in[kPreambleSize]) {
  ByteReader r({in, kPreambleSize}, "stream preamble");
  KVMIG_ASSIGN(uint32_t magic, r.u32());
  if (magic != kPreambleMagic)
    return wire_error(WireCode::bad_magic, "stream preamble magic mismatch (not a kvmig peer?)");
  Preamble p;
  KVMIG_ASSIGN(p.index, r.u16());
  KVMIG_ASSIGN(p.count, r.u16());
  KVMIG_ASSIGN(p.nonce, r.u64());
  if (p.count < 2 || p.count > kMaxStreams + 1 || p.index >= p.count)
    return wire_error(WireCode::malformed, "stream preamble: stream " + std::to_string(p.index) +
                                               " of " + std::to_string(p.count));
  return p;
}

// Big buffers let one stream keep a long, fast pipe full; the kernel clamps to its rmem/wmem
// max, which is fine. NODELAY everywhere: data writes are large anyway, and the small message
// that ends a round (or a COMMIT) must not wait for an ACK behind Nagle.
void tune(int fd, const TransportOptions& options, bool tcp) {
  int size = options.socket_buffer;
  ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
  ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
  if (tcp) {
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    // A silent peer (cut link, dead host) is detected on both sides within link_timeout_ms:
    // the user timeout bounds unacknowledged data, keepalive probes a side that only reads.
    int timeout_ms = options.link_timeout_ms;
    if (const char* env = std::getenv("KVMIG_LINK_TIMEOUT_MS")) {
      int v = std::atoi(env);
      if (v >= 1000 && v <= 600000) timeout_ms = v;
    }
    if (timeout_ms > 0) {
      unsigned user_timeout = static_cast<unsigned>(timeout_ms);
      int idle = std::max(1, timeout_ms / 3000), interval = std::max(1, timeout_ms / 6000), count = 3;
      ::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
      ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
      ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval);
      ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof count);
      ::setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout, sizeof user_timeout);
    }
  }
}

Result<Fd> connect_one(const Endpoint& ep, const TransportOptions& options) {
  if (ep.is_unix) {
    Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) return Error::from_errno("socket(AF_UNIX)");
    tune(fd.get(), options, false);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, ep.host.c_str(), sizeof addr.sun_path - 1);
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
      return Error::from_errno("connect " + to_string(ep));
    return fd;
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* list = nullptr;
  std::string port = std::to_string(ep.port);
  if (int rc = ::getaddrinfo(ep.host.c_str(), port.c_str(), &hints, &list); rc != 0)
    return Error{"resolve " + ep.host + ": " + ::gai_strerror(rc)};
  Error last{"connect " + to_string(ep) + ": no address"};
  for (addrinfo* ai = list; ai; ai = ai->ai_next) {
    Fd fd(::socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) {
      last = Error::from_errno("socket");
      continue;
    }
    tune(fd.get(), options, true);
    if (::connect(fd.get(), ai->ai_addr, ai->ai_addrlen) == 0) {
      ::freeaddrinfo(list);
      return fd;
    }
    last = Error::from_errno("connect " + to_string(ep));
  }
  ::freeaddrinfo(list);
  return last;
}

std::string stream_name(const Endpoint& ep, int index) {
  return to_string(ep) + (index == 0 ? " control" : " data " + std::to_string(index - 1));
}

}  // namespace

Result<Connection> connect(const Endpoint& ep, const TransportOptions& options) {
  if (options.streams < 1 || options.streams > kMaxStreams)
    return Error{"--streams " + std::to_string(options.streams) + ": want 1.." +
                 std::to_string(kMaxStreams)};
  Preamble pre;
  pre.count = static_cast<uint16_t>(options.streams + 1);
  if (::getrandom(&pre.nonce, sizeof pre.nonce, 0) != sizeof pre.nonce)
    return Error::from_errno("getrandom");
  Connection conn;
  for (int i = 0; i <= options.streams; ++i) {
    KVMIG_ASSIGN(Fd fd, connect_one(ep, options));
    pre.index = static_cast<uint16_t>(i);
    uint8_t bytes[kPreambleSize];
    encode_preamble(pre, bytes);
    auto stream = std::make_unique<FdStream>(std::move(fd), stream_name(ep, i));
    KVMIG_TRY(stream->write(bytes, sizeof bytes));
    if (i == 0)
      conn.control = std::move(stream);
    else
      conn.data.push_back(std::move(stream));
  }
  return conn;
}

Result<Listener> Listener::listen(const Endpoint& ep, const TransportOptions& options) {
  Endpoint bound = ep;
  Fd fd;
  if (ep.is_unix) {
    fd.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) return Error::from_errno("socket(AF_UNIX)");
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, ep.host.c_str(), sizeof addr.sun_path - 1);
    if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
      return Error::from_errno("bind " + to_string(ep));
  } else {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    addrinfo* list = nullptr;
    std::string port = std::to_string(ep.port);
    const char* host = ep.host == "*" ? nullptr : ep.host.c_str();
    if (int rc = ::getaddrinfo(host, port.c_str(), &hints, &list); rc != 0)
      return Error{"resolve " + ep.host + ": " + ::gai_strerror(rc)};
    fd.reset(::socket(list->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) {
      ::freeaddrinfo(list);
      return Error::from_errno("socket");
    }
    int one = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    // Accepted sockets inherit the buffer size; it must be set before listen() to size the
    // TCP window scale.
    tune(fd.get(), options, true);
    int rc = ::bind(fd.get(), list->ai_addr, list->ai_addrlen);
    ::freeaddrinfo(list);
    if (rc != 0) return Error::from_errno("bind " + to_string(ep));
    sockaddr_storage addr{};
    socklen_t len = sizeof addr;
    ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len);
    bound.port = ntohs(addr.ss_family == AF_INET6
                           ? reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port
                           : reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  }
  if (::listen(fd.get(), kMaxStreams * 2) != 0) return Error::from_errno("listen " + to_string(ep));
  return Listener(std::move(fd), bound, options);
}

Result<Connection> Listener::accept() {
  Connection conn;
  std::vector<std::unique_ptr<Stream>> slots;
  Preamble group{};
  size_t filled = 0;
  while (group.count == 0 || filled < group.count) {
    pollfd p{fd_.get(), POLLIN, 0};
    // The control socket may wait as long as the caller likes; the rest of a group must follow.
    int timeout = group.count == 0 ? -1 : options_.accept_timeout_ms;
    int rc = ::poll(&p, 1, timeout);
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) return Error::from_errno("poll " + to_string(endpoint_));
    if (rc == 0)
      return wire_error(WireCode::truncated, to_string(endpoint_) + ": only " +
                                                 std::to_string(filled) + " of " +
                                                 std::to_string(group.count) +
                                                 " streams arrived");
    Fd fd(::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!fd) return Error::from_errno("accept " + to_string(endpoint_));
    tune(fd.get(), options_, !endpoint_.is_unix);
    timeval tv{options_.accept_timeout_ms / 1000, (options_.accept_timeout_ms % 1000) * 1000};
    ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    uint8_t bytes[kPreambleSize];
    FdStream probe(std::move(fd), to_string(endpoint_) + " new stream");
    if (!probe.read(bytes, sizeof bytes).ok()) continue;  // a scanner or dead peer: ignore it
    auto pre = decode_preamble(bytes);
    if (!pre.ok()) continue;
    if (group.count == 0) {
      if (pre->index != 0) continue;  // a straggler from an earlier, failed connection
      group = *pre;
      slots.resize(group.count);
    } else if (pre->nonce != group.nonce || pre->count != group.count || slots[pre->index]) {
      continue;
    }
    Fd owned = probe.take_fd();
    timeval none{0, 0};
    ::setsockopt(owned.get(), SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
    slots[pre->index] = std::make_unique<FdStream>(std::move(owned),
                                                   stream_name(endpoint_, pre->index));
    ++filled;
  }
  conn.control = std::move(slots[0]);
  for (size_t i = 1; i < slots.size(); ++i) conn.data.push_back(std::move(slots[i]));
  return conn;
}

Result<bool> wait_readable(Stream& stream, double seconds) {
  auto* fd_stream = dynamic_cast<FdStream*>(&stream);
  if (!fd_stream) return true;
  using Clock = std::chrono::steady_clock;
  const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  for (;;) {
    const double left_ms = std::chrono::duration<double, std::milli>(until - Clock::now()).count();
    if (left_ms <= 0) return false;
    pollfd p{fd_stream->fd(), POLLIN, 0};
    int rc = ::poll(&p, 1, static_cast<int>(std::min(left_ms + 1, 60000.0)));
    if (rc > 0) return true;  // readable, closed or failed: the read tells which
    if (rc < 0 && errno != EINTR) return Error::from_errno("poll on " + stream.name());
  }
}

}  // namespace kvmig::helper
