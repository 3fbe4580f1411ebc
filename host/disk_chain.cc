#include "host/disk_chain.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "base/fd.h"

namespace kvmig::host {
namespace fs = std::filesystem;
namespace {

using helper::LayerFormat;

struct ToolRun {
  int status = -1;
  std::string out, err;
};

// Runs a program (no shell) and collects its stdout and stderr.
Result<ToolRun> run_tool(const std::vector<std::string>& argv) {
  int out[2], err[2];
  if (::pipe2(out, O_CLOEXEC) != 0) return Error::from_errno("pipe");
  if (::pipe2(err, O_CLOEXEC) != 0) {
    ::close(out[0]), ::close(out[1]);
    return Error::from_errno("pipe");
  }
  pid_t pid = ::fork();
  if (pid < 0) return Error::from_errno("fork");
  if (pid == 0) {
    ::dup2(out[1], 1);
    ::dup2(err[1], 2);
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    ::_exit(127);
  }
  ::close(out[1]), ::close(err[1]);
  Fd o(out[0]), e(err[0]);
  ToolRun r;
  pollfd fds[2] = {{o.get(), POLLIN, 0}, {e.get(), POLLIN, 0}};
  std::string* sinks[2] = {&r.out, &r.err};
  for (int open_count = 2; open_count > 0;) {
    if (::poll(fds, 2, -1) < 0 && errno != EINTR) break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !fds[i].revents) continue;
      char buf[8192];
      ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
      if (n > 0) sinks[i]->append(buf, static_cast<size_t>(n));
      else if (n == 0 || errno != EINTR) fds[i].fd = -1, --open_count;
    }
  }
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  if (r.status == 127) return Error{argv[0] + ": not found (qemu-utils is needed for qcow2 images)"};
  return r;
}

// qemu-img's own message, on one line, without its "qemu-img: " prefix.
std::string tool_message(const ToolRun& r) {
  std::string m = r.err.empty() ? r.out : r.err;
  if (m.rfind("qemu-img: ", 0) == 0) m = m.substr(10);
  std::replace(m.begin(), m.end(), '\n', ' ');
  while (!m.empty() && m.back() == ' ') m.pop_back();
  return m.substr(0, 500);
}

bool is_qcow2(int fd) {
  unsigned char magic[4] = {};
  return ::pread(fd, magic, 4, 0) == 4 && std::memcmp(magic, "QFI\xfb", 4) == 0;
}

std::string absolute(const std::string& p) { return fs::absolute(p).lexically_normal().string(); }

// A delta on a file system that reports no holes would read as if it overrode its whole
// parent: refuse it rather than copy something else than what it means.
Result<void> check_holes_visible(int fd, const struct stat& st, const std::string& path) {
  if (static_cast<uint64_t>(st.st_blocks) * 512 >= static_cast<uint64_t>(st.st_size)) return ok();
  off_t hole = ::lseek(fd, 0, SEEK_HOLE);
  if (hole >= 0 && hole < st.st_size) return ok();
  return Error{"kvmig delta " + path + ": its file system does not report holes (SEEK_HOLE), " +
               "which a delta needs"};
}

// The qcow2 part of a chain, top first, as QEMU reads it.
Result<std::vector<ChainLayer>> qcow2_chain(const std::string& top) {
  KVMIG_ASSIGN(ToolRun r, run_tool({"qemu-img", "info", "--backing-chain", "--output=json", "-f", "qcow2",
                                    "-U", top}));
  if (r.status != 0) return Error{"qcow2 chain of " + top + ": " + tool_message(r)};
  auto j = nlohmann::json::parse(r.out, nullptr, false);
  if (j.is_discarded() || !j.is_array() || j.empty())
    return Error{"qcow2 chain of " + top + ": qemu-img printed no chain"};
  std::vector<ChainLayer> out;
  for (const auto& e : j) {
    if (!e.is_object() || !e.contains("filename") || !e.contains("format"))
      return Error{"qcow2 chain of " + top + ": unexpected qemu-img output"};
    ChainLayer l;
    l.path = absolute(e["filename"].get<std::string>());
    std::string format = e["format"].get<std::string>();
    if (format == "qcow2") l.format = LayerFormat::qcow2;
    else if (format == "raw") l.format = LayerFormat::raw;
    else return Error{"qcow2 chain of " + top + ": layer " + l.path + " is " + format + ", not qcow2 or raw"};
    l.virtual_size = e.value("virtual-size", uint64_t{0});
    out.push_back(std::move(l));
  }
  return out;
}

}  // namespace

Result<std::optional<DeltaDescriptor>> read_delta_descriptor(const std::string& delta) {
  std::string path = delta + kDeltaSuffix;
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT) return std::optional<DeltaDescriptor>();
    return Error::from_errno("descriptor " + path);
  }
  char buf[8192];
  ssize_t n = ::read(fd.get(), buf, sizeof buf);
  if (n < 0) return Error::from_errno("descriptor " + path);
  auto j = nlohmann::json::parse(std::string(buf, static_cast<size_t>(n)), nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("kvmig_delta") ||
      !j["kvmig_delta"].is_number_integer() || j["kvmig_delta"].get<int64_t>() != 1 ||
      !j.contains("parent") || !j["parent"].is_string() || !j.contains("size") ||
      !j["size"].is_number_unsigned() || j["parent"].get<std::string>().empty())
    return Error{"descriptor " + path + ": not a kvmig delta descriptor (version 1, parent, size)"};
  return std::optional<DeltaDescriptor>(DeltaDescriptor{j["parent"].get<std::string>(), j["size"].get<uint64_t>()});
}

Result<void> write_delta_descriptor(const std::string& delta, const DeltaDescriptor& d) {
  nlohmann::json j{{"kvmig_delta", 1}, {"parent", d.parent}, {"size", d.size}};
  std::string text = j.dump() + "\n", path = delta + kDeltaSuffix, tmp = path + ".tmp";
  Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644));
  if (!fd) return Error::from_errno("descriptor " + tmp);
  if (::write(fd.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size()) || ::fsync(fd.get()) != 0)
    return Error::from_errno("descriptor " + tmp);
  if (::rename(tmp.c_str(), path.c_str()) != 0) return Error::from_errno("descriptor " + path);
  return ok();
}

Result<std::vector<ChainLayer>> read_disk_chain(const std::string& image) {
  std::vector<ChainLayer> top_first;
  std::set<std::pair<dev_t, ino_t>> seen;
  std::string path = absolute(image), child;
  for (;;) {
    Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) {
      int err = errno;
      if (child.empty()) return Error::from_errno("image " + path, err);
      return Error{"missing parent: " + child + " names " + path + ": " + std::strerror(err)};
    }
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) return Error::from_errno("fstat " + path);
    if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
      return Error{"image " + path + ": not a regular file or block device"};
    if (!seen.insert({st.st_dev, st.st_ino}).second)
      return Error{"chain loops: " + child + " names " + path + ", which is already in the chain"};
    if (top_first.size() >= helper::kMaxChainLayers)
      return Error{"chain of " + image + ": more than " + std::to_string(helper::kMaxChainLayers) + " layers"};
    ChainLayer layer{path, LayerFormat::raw, static_cast<uint64_t>(st.st_size), static_cast<uint64_t>(st.st_size)};
    KVMIG_ASSIGN(auto descriptor, read_delta_descriptor(path));
    if (descriptor) {
      if (!S_ISREG(st.st_mode)) return Error{"kvmig delta " + path + ": not a regular file"};
      if (layer.file_size != descriptor->size)
        return Error{"kvmig delta " + path + " is " + std::to_string(layer.file_size) + " bytes, declared " +
                     std::to_string(descriptor->size) +
                     (layer.file_size < descriptor->size ? " (shorter than declared)" : " (longer than declared)")};
      KVMIG_TRY(check_holes_visible(fd.get(), st, path));
      layer.format = LayerFormat::kvmig_delta;
      top_first.push_back(layer);
      child = path;
      path = absolute((fs::path(path).parent_path() / descriptor->parent).string());
      continue;
    }
    if (is_qcow2(fd.get())) {
      KVMIG_ASSIGN(auto chain, qcow2_chain(path));
      for (ChainLayer& l : chain) {
        struct stat ls {};
        if (::stat(l.path.c_str(), &ls) != 0) return Error::from_errno("layer " + l.path);
        if (&l != &chain.front() && !seen.insert({ls.st_dev, ls.st_ino}).second)
          return Error{"chain loops: " + l.path + " appears twice"};
        l.file_size = static_cast<uint64_t>(ls.st_size);
        if (l.format == LayerFormat::raw) l.virtual_size = l.file_size;
        top_first.push_back(l);
      }
      if (top_first.size() > helper::kMaxChainLayers)
        return Error{"chain of " + image + ": more than " + std::to_string(helper::kMaxChainLayers) + " layers"};
    } else {
      top_first.push_back(layer);
    }
    break;
  }
  std::reverse(top_first.begin(), top_first.end());
  // The raw layers are disks: sector-aligned; a delta matches its parent's size.
  for (size_t i = 0; i < top_first.size(); ++i) {
    const ChainLayer& l = top_first[i];
    if (l.format != LayerFormat::qcow2 && (l.file_size == 0 || l.file_size % 512 != 0))
      return Error{"image " + l.path + ": size " + std::to_string(l.file_size) +
                   " is not a non-zero multiple of 512 bytes (not aligned)"};
    if (l.format == LayerFormat::kvmig_delta) {
      if (top_first[i - 1].format == LayerFormat::qcow2)
        return Error{"kvmig delta " + l.path + ": its parent " + top_first[i - 1].path + " is qcow2"};
      if (top_first[i - 1].file_size != l.file_size)
        return Error{"kvmig delta " + l.path + " is " + std::to_string(l.file_size) + " bytes, its parent " +
                     top_first[i - 1].path + " " + std::to_string(top_first[i - 1].file_size)};
    }
  }
  return top_first;
}

Result<std::string> snapshot_disk(const std::string& image, const std::string& output) {
  KVMIG_ASSIGN(auto chain, read_disk_chain(image));
  const ChainLayer& top = chain.back();
  std::string out = output;
  if (out.empty()) {
    fs::path p(top.path);
    for (int n = 1; out.empty() && n < 10000; ++n) {
      fs::path candidate = p.parent_path() / (p.stem().string() + ".delta" + std::to_string(n) + p.extension().string());
      if (!fs::exists(candidate) && !fs::exists(candidate.string() + kDeltaSuffix)) out = candidate.string();
    }
  }
  out = absolute(out);
  if (fs::exists(out) || fs::exists(out + kDeltaSuffix)) return Error{"snapshot " + out + ": exists already"};
  std::string parent_ref = fs::path(top.path).lexically_relative(fs::path(out).parent_path()).string();
  if (top.format == LayerFormat::qcow2) {
    KVMIG_ASSIGN(ToolRun r, run_tool({"qemu-img", "create", "-q", "-f", "qcow2", "-b", parent_ref, "-F", "qcow2", out}));
    if (r.status != 0) return Error{"snapshot " + out + ": " + tool_message(r)};
  } else {
    Fd fd(::open(out.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
    if (!fd) return Error::from_errno("snapshot " + out);
    if (::ftruncate(fd.get(), static_cast<off_t>(top.file_size)) != 0 || ::fsync(fd.get()) != 0)
      return Error::from_errno("snapshot " + out);
    KVMIG_TRY(write_delta_descriptor(out, {parent_ref, top.file_size}));
  }
  // The old top is now a lower layer: read-only, so it can be pre-copied and shared.
  struct stat st {};
  if (::stat(top.path.c_str(), &st) == 0) ::chmod(top.path.c_str(), st.st_mode & ~(S_IWUSR | S_IWGRP | S_IWOTH));
  return out;
}

Result<void> relink_layer(const std::string& root, const helper::DiskChainLayer& child,
                          const helper::DiskChainLayer& parent) {
  fs::path child_path = fs::path(root) / child.path;
  std::string ref = fs::path(parent.path).lexically_relative(fs::path(child.path).parent_path()).string();
  if (child.format == LayerFormat::kvmig_delta) return write_delta_descriptor(child_path.string(), {ref, child.size});
  std::string parent_format = parent.format == LayerFormat::qcow2 ? "qcow2" : "raw";
  KVMIG_ASSIGN(ToolRun info, run_tool({"qemu-img", "info", "--output=json", "-f", "qcow2", "-U", child_path.string()}));
  if (info.status != 0) return Error{"layer " + child.path + ": " + tool_message(info)};
  auto j = nlohmann::json::parse(info.out, nullptr, false);
  if (!j.is_discarded() && j.is_object() && j.value("backing-filename", "") == ref &&
      j.value("backing-filename-format", "") == parent_format)
    return ok();
  KVMIG_ASSIGN(ToolRun r, run_tool({"qemu-img", "rebase", "-u", "-f", "qcow2", "-b", ref, "-F", parent_format,
                                    child_path.string()}));
  if (r.status != 0) return Error{"re-linking " + child.path + ": " + tool_message(r)};
  return ok();
}

}  // namespace kvmig::host
