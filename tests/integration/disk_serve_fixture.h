// What the disk-copy and disk-chain integration tests share: a `kvmig disk serve` child
// process on an ephemeral loopback port, whole-file checks computed here, independently
// of the tool's own, and kvmig runs whose --json output they read.
#pragma once

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "base/fd.h"
#include "helper/disk_extents.h"
#include "test_util.h"

namespace kvmig::test {

namespace fs = std::filesystem;

inline uint64_t hash_of(const fs::path& p) {
  kvmig::Fd fd(::open(p.c_str(), O_RDONLY));
  EXPECT_TRUE(fd.valid()) << p;
  struct stat st {};
  ::fstat(fd.get(), &st);
  auto h = kvmig::helper::hash_file(fd.get(), static_cast<uint64_t>(st.st_size));
  EXPECT_TRUE(h.ok());
  return h.ok() ? *h : 0;
}

inline uint64_t allocated(const fs::path& p) {
  struct stat st {};
  ::stat(p.c_str(), &st);
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

// A kvmig run whose stdout is (or should be) --json output; json() is discarded when it is not.
struct JsonRun : CliRun {
  nlohmann::json json() const { return nlohmann::json::parse(out, nullptr, false); }
};

inline JsonRun run_kvmig_json(const std::string& args) { return {run_kvmig(args)}; }

// Error messages must be one line; this counts them.
inline int line_count(const std::string& s) { return static_cast<int>(std::count(s.begin(), s.end(), '\n')); }

// A `kvmig disk serve` child process on an ephemeral loopback port.
class Server {
 public:
  Server(const fs::path& root, const fs::path& log) : log_(log) {
    pid_ = ::fork();
    if (pid_ == 0) {
      int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(fd, 2);
      ::execl(KVMIG_BINARY, "kvmig", "disk", "serve", "--listen", "127.0.0.1:0", "--root",
              root.c_str(), "--ack-every", "8M", static_cast<char*>(nullptr));
      ::_exit(127);
    }
    for (int i = 0; i < 500 && port_ == 0; ++i) {
      std::string text = kvmig::test::read_file(log);
      auto at = text.find("listening on 127.0.0.1:");
      if (at != std::string::npos) port_ = std::atoi(text.c_str() + at + 23);
      else std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  ~Server() {
    ::kill(pid_, SIGTERM);
    ::waitpid(pid_, nullptr, 0);
  }
  int port() const { return port_; }
  std::string at(const std::string& dst) const { return "127.0.0.1:" + std::to_string(port_) + ":" + dst; }
  std::string log() const { return kvmig::test::read_file(log_); }

 private:
  fs::path log_;
  pid_t pid_ = -1;
  int port_ = 0;
};

}  // namespace kvmig::test
