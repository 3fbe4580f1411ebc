// ControlServer: a unix socket that answers line-based JSON requests, one JSON object per
// line each way: {"cmd":"pause"} -> {"ok":true,...} or {"ok":false,"error":"..."}.
// The command table is open: `kvmig vm run` registers pause/resume/stats, and the migration
// code registers its own ("save", "migrate") through register_command().
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "base/fd.h"
#include "base/result.h"

namespace kvmig::host {

class ControlServer {
 public:
  // Receives the whole request object; returns the reply's fields ("ok" is added), or an
  // Error whose message goes back as "error". Called on the connection's own thread, so a
  // long handler (a migration) does not block other clients' "stats".
  using Handler = std::function<Result<nlohmann::json>(const nlohmann::json& request)>;

  // Default socket path for a VM run by this process: /run/kvmig/vm-<pid>.sock.
  static std::string default_path();

  ControlServer() = default;
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  // Adding or replacing a command is safe while the server runs.
  void register_command(const std::string& name, Handler handler);
  // Binds `path` (creating its directory, removing a stale socket nobody answers on) and
  // starts serving. Fails if another process is listening there.
  Result<void> start(const std::string& path);
  // Stops accepting, closes client connections, joins threads and removes the socket file.
  void stop();
  const std::string& path() const { return path_; }

  // Handles one request line as a connection would (also what the tests drive directly).
  std::string handle_line(const std::string& line);

 private:
  void accept_loop();
  void serve(int fd);

  std::mutex mu_;
  std::map<std::string, Handler> handlers_;
  std::string path_;
  Fd listen_fd_;
  Fd wake_read_, wake_write_;
  std::thread acceptor_;
  std::condition_variable clients_done_;  // client threads are detached; stop() waits here
  std::vector<int> client_fds_;
  std::atomic<bool> stopping_{false};
};

// Client side, for the CLI and tests: connects to `path`, sends `request`, returns the reply.
Result<nlohmann::json> control_request(const std::string& path, const nlohmann::json& request);

}  // namespace kvmig::host
