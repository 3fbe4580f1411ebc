#include "host/control_server.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace kvmig::host {

namespace {

constexpr size_t kMaxLine = 64 * 1024;  // a request longer than this is refused, not buffered

Result<sockaddr_un> make_address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path))
    return Error{"control socket path '" + path + "' is empty or longer than " + std::to_string(sizeof(addr.sun_path) - 1) +
                 " bytes"};
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  return addr;
}

Result<Fd> connect_to(const std::string& path) {
  KVMIG_ASSIGN(sockaddr_un addr, make_address(path));
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return Error::from_errno("socket");
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0)
    return Error::from_errno("connect to control socket " + path);
  return fd;
}

bool write_all(int fd, const std::string& s) {
  size_t done = 0;
  while (done < s.size()) {
    ssize_t n = ::send(fd, s.data() + done, s.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += n;
  }
  return true;
}

std::string error_reply(const std::string& message) {
  return nlohmann::json{{"ok", false}, {"error", message}}.dump();
}

}  // namespace

std::string ControlServer::default_path() { return "/run/kvmig/vm-" + std::to_string(::getpid()) + ".sock"; }

ControlServer::~ControlServer() { stop(); }

void ControlServer::register_command(const std::string& name, Handler handler) {
  std::lock_guard lock(mu_);
  handlers_[name] = std::move(handler);
}

std::string ControlServer::handle_line(const std::string& line) {
  nlohmann::json request = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (request.is_discarded()) return error_reply("request is not valid JSON");
  if (!request.is_object() || !request.contains("cmd") || !request["cmd"].is_string())
    return error_reply("request must be an object with a string \"cmd\"");
  std::string cmd = request["cmd"];
  Handler handler;
  {
    std::lock_guard lock(mu_);
    auto it = handlers_.find(cmd);
    if (it == handlers_.end()) {
      std::string known;
      for (const auto& [name, h] : handlers_) known += (known.empty() ? "" : ", ") + name;
      return error_reply("unknown command '" + cmd + "' (known: " + known + ")");
    }
    handler = it->second;
  }
  Result<nlohmann::json> result = Error{"handler did not run"};
  try {
    result = handler(request);
  } catch (const std::exception& e) {
    return error_reply(cmd + ": " + e.what());
  }
  if (!result.ok()) return error_reply(result.error().message);
  nlohmann::json reply = result.value().is_object() ? result.value() : nlohmann::json{{"result", result.value()}};
  reply["ok"] = true;
  return reply.dump();
}

Result<void> ControlServer::start(const std::string& path) {
  if (listen_fd_) return Error{"control server already started"};
  KVMIG_ASSIGN(sockaddr_un addr, make_address(path));
  auto slash = path.rfind('/');
  if (slash != std::string::npos && slash > 0) {
    std::string dir = path.substr(0, slash);
    // Only kvmig's own directory is created; the socket grants VM control, so owner-only.
    if (::mkdir(dir.c_str(), 0700) < 0 && errno != EEXIST) return Error::from_errno("create directory " + dir);
  }
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) return Error{"control socket path " + path + " exists and is not a socket"};
    if (connect_to(path).ok()) return Error{"control socket " + path + " is in use by another process"};
    ::unlink(path.c_str());  // stale: its owner is gone
  }
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return Error::from_errno("socket");
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) return Error::from_errno("bind " + path);
  ::chmod(path.c_str(), 0600);
  if (::listen(fd.get(), 16) < 0) return Error::from_errno("listen " + path);
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) < 0) return Error::from_errno("pipe");
  wake_read_.reset(pipe_fds[0]);
  wake_write_.reset(pipe_fds[1]);
  listen_fd_ = std::move(fd);
  path_ = path;
  stopping_ = false;
  acceptor_ = std::thread([this] { accept_loop(); });
  return ok();
}

void ControlServer::stop() {
  if (!listen_fd_) return;
  stopping_ = true;
  char b = 0;
  (void)!::write(wake_write_.get(), &b, 1);
  if (acceptor_.joinable()) acceptor_.join();
  {
    std::unique_lock lock(mu_);
    // Unblocks clients waiting in recv(); each thread closes its own fd and leaves the list.
    for (int fd : client_fds_) ::shutdown(fd, SHUT_RDWR);
    clients_done_.wait(lock, [&] { return client_fds_.empty(); });
  }
  ::unlink(path_.c_str());
  listen_fd_.reset();
  wake_read_.reset();
  wake_write_.reset();
}

void ControlServer::accept_loop() {
  while (!stopping_) {
    pollfd fds[2] = {{listen_fd_.get(), POLLIN, 0}, {wake_read_.get(), POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (fds[1].revents) return;
    if (!(fds[0].revents & POLLIN)) continue;
    int client = ::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC);
    if (client < 0) continue;
    std::lock_guard lock(mu_);
    client_fds_.push_back(client);
    // Detached so a long-lived VM polled for stats does not pile up finished threads.
    std::thread([this, client] { serve(client); }).detach();
  }
}

void ControlServer::serve(int fd) {
  std::string buffer;
  char chunk[4096];
  bool open = true;
  while (open && !stopping_) {
    ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    buffer.append(chunk, n);
    size_t nl;
    while ((nl = buffer.find('\n')) != std::string::npos) {
      std::string line = buffer.substr(0, nl);
      buffer.erase(0, nl + 1);
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty()) continue;
      if (!write_all(fd, handle_line(line) + "\n")) open = false;
    }
    if (buffer.size() > kMaxLine) {
      write_all(fd, error_reply("request longer than " + std::to_string(kMaxLine) + " bytes") + "\n");
      break;
    }
  }
  std::lock_guard lock(mu_);
  client_fds_.erase(std::remove(client_fds_.begin(), client_fds_.end(), fd), client_fds_.end());
  ::close(fd);
  clients_done_.notify_all();
}

Result<nlohmann::json> control_request(const std::string& path, const nlohmann::json& request) {
  KVMIG_ASSIGN(Fd fd, connect_to(path));
  if (!write_all(fd.get(), request.dump() + "\n")) return Error::from_errno("send to " + path);
  std::string reply;
  char c;
  while (true) {
    ssize_t n = ::recv(fd.get(), &c, 1, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error::from_errno("receive from " + path);
    if (n == 0) return Error{"control socket " + path + " closed without a reply"};
    if (c == '\n') break;
    if (reply.size() > kMaxLine) return Error{"reply from " + path + " too long"};
    reply.push_back(c);
  }
  nlohmann::json j = nlohmann::json::parse(reply, nullptr, false);
  if (j.is_discarded()) return Error{"reply from " + path + " is not valid JSON"};
  return j;
}

}  // namespace kvmig::host
