// Helpers many tests need: a private scratch directory, a whole file as a string, and a run
// of the kvmig binary with its output captured. Header-only; KVMIG_BINARY comes from
// tests/CMakeLists.txt.
#pragma once

#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

namespace kvmig::test {

// Creates "/tmp/PREFIX-XXXXXX" (unique, mode 0700); "" if it cannot. Tests running in
// parallel (ctest -j) each get their own.
inline std::string make_temp_dir(const std::string& prefix) {
  std::string tmpl = "/tmp/" + prefix + "-XXXXXX";
  return ::mkdtemp(tmpl.data()) ? tmpl : std::string();
}

// The whole file; "" when it cannot be read.
inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

struct CliRun {
  int status = -1;  // exit status; 128 + N when killed by signal N (as a shell reports it)
  std::string out, err;
};

// Runs `kvmig ARGS` through the shell (ARGS may quote), capturing stdout and stderr in
// private temporary files that are removed afterwards.
inline CliRun run_kvmig(const std::string& args) {
  CliRun r;
  char out_path[] = "/tmp/kvmig-test-out-XXXXXX";
  char err_path[] = "/tmp/kvmig-test-err-XXXXXX";
  int out_fd = ::mkstemp(out_path);
  int err_fd = ::mkstemp(err_path);
  if (out_fd >= 0 && err_fd >= 0) {
    std::string cmd = std::string(KVMIG_BINARY) + " " + args + " >" + out_path + " 2>" + err_path;
    int rc = std::system(cmd.c_str());
    r.status = WIFEXITED(rc) ? WEXITSTATUS(rc) : WIFSIGNALED(rc) ? 128 + WTERMSIG(rc) : -1;
    r.out = read_file(out_path);
    r.err = read_file(err_path);
  }
  if (out_fd >= 0) ::close(out_fd), ::unlink(out_path);
  if (err_fd >= 0) ::close(err_fd), ::unlink(err_path);
  return r;
}

// Runs a shell command with stdout and stderr merged; status -1 when it did not exit normally.
struct ShellRun {
  int status = -1;
  std::string out;
};
inline ShellRun run_shell(const std::string& cmd) {
  ShellRun r;
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

// Whether PROG is on PATH.
inline bool have_program(const char* prog) {
  return run_shell(std::string("command -v ") + prog + " >/dev/null").status == 0;
}

}  // namespace kvmig::test
