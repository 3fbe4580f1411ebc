#include "host/qmp_client.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <thread>

namespace kvmig::host {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

// A message from QEMU is one line; a line this long means we are not talking to QMP.
constexpr size_t kMaxLine = 16 << 20;

Error qmp_error(const std::string& what) { return Error{"QMP: " + what}; }

// A JSON value for an error message: short, one line, and never throwing (dump() throws on
// invalid UTF-8 unless told to replace it).
std::string brief(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace).substr(0, 200);
}

// Reads an unsigned integer field if present; a wrong type is an error, not a silent 0.
Result<void> get_u64(const json& obj, const char* key, uint64_t& out) {
  auto it = obj.find(key);
  if (it == obj.end()) return ok();
  if (!it->is_number_integer() || it->get<int64_t>() < 0)
    return qmp_error(std::string("query-migrate: field '") + key + "' is not a count: " +
                     brief(*it));
  out = it->get<uint64_t>();
  return ok();
}

// json::value() throws on a type mismatch; QEMU's input must never make us throw.
std::string string_field(const json& obj, const char* key, const char* fallback) {
  auto it = obj.find(key);
  return it != obj.end() && it->is_string() ? it->get<std::string>() : fallback;
}

int64_t int_field(const json& obj, const char* key) {
  auto it = obj.find(key);
  return it != obj.end() && it->is_number_integer() ? it->get<int64_t>() : 0;
}

}  // namespace

Result<MigrationInfo> parse_migration_info(const json& ret) {
  if (!ret.is_object()) return qmp_error("query-migrate: reply is not an object: " + brief(ret));
  MigrationInfo info;
  info.status = "none";
  if (auto it = ret.find("status"); it != ret.end()) {
    if (!it->is_string()) return qmp_error("query-migrate: 'status' is not a string");
    info.status = it->get<std::string>();
  }
  KVMIG_TRY(get_u64(ret, "total-time", info.total_time_ms));
  KVMIG_TRY(get_u64(ret, "expected-downtime", info.downtime_ms));
  KVMIG_TRY(get_u64(ret, "downtime", info.downtime_ms));  // the measured one wins
  KVMIG_TRY(get_u64(ret, "setup-time", info.setup_time_ms));
  if (auto it = ret.find("error-desc"); it != ret.end() && it->is_string())
    info.error_desc = it->get<std::string>();
  if (auto it = ret.find("ram"); it != ret.end()) {
    if (!it->is_object()) return qmp_error("query-migrate: 'ram' is not an object");
    const json& ram = *it;
    KVMIG_TRY(get_u64(ram, "transferred", info.ram_transferred));
    KVMIG_TRY(get_u64(ram, "total", info.ram_total));
    KVMIG_TRY(get_u64(ram, "remaining", info.ram_remaining));
    KVMIG_TRY(get_u64(ram, "dirty-sync-count", info.dirty_sync_count));
    KVMIG_TRY(get_u64(ram, "normal", info.normal_pages));
    KVMIG_TRY(get_u64(ram, "duplicate", info.duplicate_pages));
    KVMIG_TRY(get_u64(ram, "dirty-pages-rate", info.dirty_pages_rate));
    KVMIG_TRY(get_u64(ram, "page-size", info.page_size));
    if (info.page_size == 0) return qmp_error("query-migrate: 'ram.page-size' is 0");
    if (auto m = ram.find("mbps"); m != ram.end()) {
      if (!m->is_number()) return qmp_error("query-migrate: 'ram.mbps' is not a number");
      info.mbps = m->get<double>();
    }
  }
  // The destination lists where it listens; QEMU 7 gives the port as a string.
  if (auto it = ret.find("socket-address"); it != ret.end() && it->is_array()) {
    for (const json& addr : *it) {
      auto port = addr.find("port");
      if (port == addr.end()) continue;
      long value = -1;
      if (port->is_string()) {
        const std::string& s = port->get_ref<const std::string&>();
        char* end = nullptr;
        value = std::strtol(s.c_str(), &end, 10);
        if (s.empty() || *end != '\0') value = -1;
      } else if (port->is_number_integer()) {
        value = port->get<long>();
      }
      if (value <= 0 || value > 65535)
        return qmp_error("query-migrate: bad socket-address port " + brief(*port));
      info.incoming_port = static_cast<uint16_t>(value);
      break;
    }
  }
  return info;
}

Result<QmpClient> QmpClient::connect(const std::string& socket_path, Ms timeout) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket_path.size() >= sizeof addr.sun_path)
    return qmp_error("socket path too long: " + socket_path);
  std::memcpy(addr.sun_path, socket_path.c_str(), socket_path.size() + 1);
  auto deadline = Clock::now() + timeout;
  for (;;) {
    Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) return Error::from_errno("QMP: socket(AF_UNIX)");
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
      auto left = std::chrono::duration_cast<Ms>(deadline - Clock::now());
      return from_fd(std::move(fd), std::max(left, Ms(1000)));
    }
    int err = errno;
    // ENOENT/ECONNREFUSED: QEMU has not created or opened the socket yet.
    if ((err != ENOENT && err != ECONNREFUSED) || Clock::now() >= deadline)
      return Error::from_errno("QMP: connect " + socket_path, err);
    std::this_thread::sleep_for(Ms(20));
  }
}

Result<QmpClient> QmpClient::from_fd(Fd fd, Ms timeout) {
  QmpClient client(std::move(fd));
  KVMIG_TRY(client.handshake(timeout));
  return client;
}

Result<void> QmpClient::handshake(Ms timeout) {
  auto msg = read_message(Clock::now() + timeout);
  if (!msg) return std::move(msg.error().prefix("QMP greeting"));
  json greeting = std::move(*msg);
  auto it = greeting.find("QMP");
  if (it == greeting.end() || !it->is_object())
    return qmp_error("expected a greeting {\"QMP\":...}, got: " + brief(greeting));
  auto r = execute("qmp_capabilities");
  if (!r) return std::move(r.error());
  return ok();
}

Result<void> QmpClient::send_line(const std::string& line) {
  std::string data = line + "\n";
  size_t done = 0;
  while (done < data.size()) {
    // MSG_NOSIGNAL: a QEMU that went away must give EPIPE, not kill us with SIGPIPE.
    ssize_t n = ::send(fd_.get(), data.data() + done, data.size() - done, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EPIPE || errno == ECONNRESET)
        return Error{"connection closed by QEMU (send: " + std::string(std::strerror(errno)) + ")",
                     EPIPE};
      return Error::from_errno("send");
    }
    done += static_cast<size_t>(n);
  }
  return ok();
}

Result<json> QmpClient::read_message(Clock::time_point deadline) {
  if (!fd_) return Error{"not connected", ENOTCONN};
  for (;;) {
    size_t nl = buffer_.find('\n');
    if (nl != std::string::npos) {
      std::string line = buffer_.substr(0, nl);
      buffer_.erase(0, nl + 1);
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty()) continue;
      json msg = json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (msg.is_discarded())
        return Error{"malformed JSON from QEMU: " + line.substr(0, 200)};
      if (!msg.is_object())
        return Error{"message is not a JSON object: " + line.substr(0, 200)};
      return msg;
    }
    if (buffer_.size() > kMaxLine) return Error{"line longer than 16 MiB from QEMU"};
    auto left = std::chrono::duration_cast<Ms>(deadline - Clock::now()).count();
    if (left <= 0) return Error{"timed out waiting for QEMU", ETIMEDOUT};
    pollfd p{fd_.get(), POLLIN, 0};
    int pr = ::poll(&p, 1, static_cast<int>(std::min<long>(left, 1 << 30)));
    if (pr < 0) {
      if (errno == EINTR) continue;
      return Error::from_errno("poll");
    }
    if (pr == 0) continue;  // the deadline check above ends the loop
    char chunk[65536];
    ssize_t n = ::read(fd_.get(), chunk, sizeof chunk);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return Error::from_errno("read");
    }
    if (n == 0) return Error{"connection closed by QEMU", EPIPE};
    buffer_.append(chunk, static_cast<size_t>(n));
  }
}

Result<json> QmpClient::execute(const std::string& command, const json& arguments) {
  error_class_.clear();
  uint64_t id = next_id_++;
  json request = {{"execute", command}, {"id", id}};
  if (!arguments.is_null() && !(arguments.is_object() && arguments.empty()))
    request["arguments"] = arguments;
  if (auto sent = send_line(request.dump(-1, ' ', false, json::error_handler_t::replace)); !sent)
    return std::move(sent.error().prefix("QMP " + command));
  auto deadline = Clock::now() + command_timeout_;
  for (;;) {
    auto msg = read_message(deadline);
    if (!msg) return std::move(msg.error().prefix("QMP " + command));
    json& m = *msg;
    if (m.contains("event")) {
      KVMIG_TRY(queue_event(m));
      continue;
    }
    auto mid = m.find("id");
    // A late reply to an earlier command that timed out: that command already failed.
    if (mid != m.end() && mid->is_number_unsigned() && mid->get<uint64_t>() < id) continue;
    if (mid == m.end() || !mid->is_number_unsigned() || mid->get<uint64_t>() != id)
      return qmp_error(command + ": reply for another request: " + brief(m));
    if (auto ret = m.find("return"); ret != m.end()) return *ret;
    if (auto err = m.find("error"); err != m.end() && err->is_object()) {
      std::string cls = string_field(*err, "class", "(no class)");
      std::string desc = string_field(*err, "desc", "(no description)");
      error_class_ = cls;
      return Error{"QMP " + command + ": " + cls + ": " + desc};
    }
    return qmp_error(command + ": reply has neither return nor error: " + brief(m));
  }
}

Result<void> QmpClient::queue_event(const json& msg) {
  const json& name = msg["event"];
  if (!name.is_string()) return qmp_error("event name is not a string: " + brief(msg));
  QmpEvent e;
  e.name = name.get<std::string>();
  auto data = msg.find("data");
  e.data = data != msg.end() ? *data : json::object();
  if (auto ts = msg.find("timestamp"); ts != msg.end() && ts->is_object()) {
    e.seconds = int_field(*ts, "seconds");
    e.microseconds = int_field(*ts, "microseconds");
  }
  events_.push_back(std::move(e));
  return ok();
}

Result<QmpEvent> QmpClient::wait_event(const std::string& name,
                                       const std::function<bool(const QmpEvent&)>& match,
                                       Ms timeout) {
  auto deadline = Clock::now() + timeout;
  size_t checked = 0;  // events before this index were already offered to `match`
  for (;;) {
    for (; checked < events_.size(); ++checked) {
      if (events_[checked].name != name || (match && !match(events_[checked]))) continue;
      QmpEvent e = std::move(events_[checked]);
      events_.erase(events_.begin() + static_cast<std::ptrdiff_t>(checked));
      return e;
    }
    auto msg = read_message(deadline);
    if (!msg) {
      if (msg.error().sys_errno == ETIMEDOUT)
        return Error{"QMP: no " + name + " event (matching) within " +
                         std::to_string(timeout.count()) + " ms",
                     ETIMEDOUT};
      return std::move(msg.error().prefix("QMP waiting for " + name));
    }
    if (!msg->contains("event"))
      return qmp_error("unexpected message while waiting for " + name + ": " +
                       brief(*msg));
    KVMIG_TRY(queue_event(*msg));
  }
}

std::vector<QmpEvent> QmpClient::take_events() {
  std::vector<QmpEvent> out(std::make_move_iterator(events_.begin()),
                            std::make_move_iterator(events_.end()));
  events_.clear();
  return out;
}

namespace {
Result<void> drop_value(Result<json> r) {
  if (!r) return std::move(r.error());
  return ok();
}
}  // namespace

Result<void> QmpClient::migrate_set_capabilities(const std::map<std::string, bool>& caps) {
  json list = json::array();
  for (const auto& [name, state] : caps) list.push_back({{"capability", name}, {"state", state}});
  return drop_value(execute("migrate-set-capabilities", {{"capabilities", list}}));
}

Result<void> QmpClient::migrate_set_parameters(const json& params) {
  if (!params.is_object()) return qmp_error("migrate-set-parameters: parameters must be an object");
  return drop_value(execute("migrate-set-parameters", params));
}

Result<json> QmpClient::query_migrate_parameters() { return execute("query-migrate-parameters"); }

Result<void> QmpClient::migrate(const std::string& uri) {
  return drop_value(execute("migrate", {{"uri", uri}}));
}

Result<void> QmpClient::migrate_incoming(const std::string& uri) {
  return drop_value(execute("migrate-incoming", {{"uri", uri}}));
}

Result<MigrationInfo> QmpClient::query_migrate() {
  KVMIG_ASSIGN(json ret, execute("query-migrate"));
  return parse_migration_info(ret);
}

Result<void> QmpClient::migrate_cancel() { return drop_value(execute("migrate_cancel")); }
Result<void> QmpClient::stop() { return drop_value(execute("stop")); }
Result<void> QmpClient::cont() { return drop_value(execute("cont")); }

Result<VmStatus> QmpClient::query_status() {
  KVMIG_ASSIGN(json ret, execute("query-status"));
  auto status = ret.find("status");
  auto running = ret.find("running");
  if (!ret.is_object() || status == ret.end() || !status->is_string() || running == ret.end() ||
      !running->is_boolean())
    return qmp_error("query-status: unexpected reply " + brief(ret));
  return VmStatus{status->get<std::string>(), running->get<bool>()};
}

Result<void> QmpClient::quit() {
  auto r = execute("quit");
  // QEMU may close the socket before its reply reaches us: that is the quit succeeding.
  if (!r && r.error().sys_errno != EPIPE && r.error().sys_errno != ECONNRESET)
    return std::move(r.error());
  fd_.reset();
  return ok();
}

Result<MigrationInfo> QmpClient::wait_migration(Ms timeout, Ms poll) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    KVMIG_ASSIGN(MigrationInfo info, query_migrate());
    if (info.finished() && info.status != "completed") return info;
    if (info.status == "completed") {
      // QEMU reports "completed" before it computes total-time and the final counters;
      // they are final once the run state has left finish-migrate.
      KVMIG_ASSIGN(VmStatus vm, query_status());
      if (vm.status != "finish-migrate") return query_migrate();
    }
    if (Clock::now() >= deadline)
      return Error{"QMP: migration not finished after " + std::to_string(timeout.count()) +
                       " ms (status " + info.status + ")",
                   ETIMEDOUT};
    std::this_thread::sleep_for(poll);
  }
}

}  // namespace kvmig::host
