#include "helper/transport.h"

#include <limits.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <charconv>

#include "helper/wire.h"

namespace kvmig::helper {
namespace {

// Advances an iovec array past `done` bytes; returns the new first index.
size_t advance(std::vector<iovec>& v, size_t first, size_t done) {
  while (done > 0 && first < v.size()) {
    if (done >= v[first].iov_len) {
      done -= v[first].iov_len;
      ++first;
    } else {
      v[first].iov_base = static_cast<uint8_t*>(v[first].iov_base) + done;
      v[first].iov_len -= done;
      done = 0;
    }
  }
  while (first < v.size() && v[first].iov_len == 0) ++first;
  return first;
}

// Moves every byte of `iov` with `call` (a sendmsg or a recvmsg), resuming after short
// transfers and EINTR. `what` names the call in errors; a 0 return means the peer closed.
template <typename Call>
Result<void> transfer_all(std::span<const iovec> iov, const std::string& name, const char* what,
                          Call call) {
  std::vector<iovec> v(iov.begin(), iov.end());
  size_t first = advance(v, 0, 0);
  while (first < v.size()) {
    msghdr msg{};
    msg.msg_iov = v.data() + first;
    msg.msg_iovlen = std::min<size_t>(v.size() - first, IOV_MAX);
    ssize_t n = call(&msg);
    if (n < 0) {
      if (errno == EINTR) continue;
      Error e = Error::from_errno(name + ": " + what);
      return wire_error(WireCode::io, e.message);
    }
    if (n == 0) return wire_error(WireCode::truncated, name + ": peer closed the stream");
    first = advance(v, first, static_cast<size_t>(n));
  }
  return ok();
}

}  // namespace

Result<void> FdStream::write_all(std::span<const iovec> iov) {
  // sendmsg rather than writev: MSG_NOSIGNAL turns a vanished peer into EPIPE, not SIGPIPE.
  return transfer_all(iov, name_, "send",
                      [this](msghdr* msg) { return ::sendmsg(fd_.get(), msg, MSG_NOSIGNAL); });
}

Result<void> FdStream::read_all(std::span<const iovec> iov) {
  return transfer_all(iov, name_, "recv",
                      [this](msghdr* msg) { return ::recvmsg(fd_.get(), msg, MSG_WAITALL); });
}

void FdStream::shutdown() {
  if (fd_.valid()) ::shutdown(fd_.get(), SHUT_RDWR);
}

Result<Endpoint> parse_endpoint(const std::string& text) {
  Endpoint ep;
  if (text.rfind("unix:", 0) == 0) {
    ep.is_unix = true;
    ep.host = text.substr(5);
    if (ep.host.empty() || ep.host.size() >= 108)
      return Error{"endpoint '" + text + "': unix socket path empty or longer than 107 bytes"};
    return ep;
  }
  size_t colon = text.rfind(':');
  if (colon == std::string::npos || colon + 1 == text.size())
    return Error{"endpoint '" + text + "': want host:port or unix:/path"};
  ep.host = text.substr(0, colon);
  if (ep.host.size() >= 2 && ep.host.front() == '[' && ep.host.back() == ']')
    ep.host = ep.host.substr(1, ep.host.size() - 2);
  if (ep.host.empty()) return Error{"endpoint '" + text + "': empty host"};
  std::string port = text.substr(colon + 1);
  unsigned value = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (ec != std::errc() || end != port.data() + port.size() || value > 65535)
    return Error{"endpoint '" + text + "': port '" + port + "' is not 0..65535"};
  ep.port = static_cast<uint16_t>(value);
  return ep;
}

std::string to_string(const Endpoint& ep) {
  if (ep.is_unix) return "unix:" + ep.host;
  if (ep.host.find(':') != std::string::npos)
    return "[" + ep.host + "]:" + std::to_string(ep.port);
  return ep.host + ":" + std::to_string(ep.port);
}

}  // namespace kvmig::helper
