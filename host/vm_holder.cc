#include "host/vm_holder.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>

namespace kvmig::host {

namespace {

std::string holder_dir(const std::string& site_dir) { return site_dir + "/holders"; }
std::string holder_path(const std::string& site_dir, const std::string& uuid) {
  return holder_dir(site_dir) + "/" + uuid;
}

struct flock whole_file(short type) {
  struct flock fl {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = 0;
  fl.l_len = 0;  // to the end, whatever the size
  fl.l_pid = 0;  // required for OFD locks
  return fl;
}

// "pid=123 migration=ID\n", as take() writes it; anything else reads as nothing.
void parse_content(int fd, HolderProbe& p) {
  char buf[160] = {};
  ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
  if (n <= 0) return;
  buf[n] = '\0';
  char migration[80] = {};
  long pid = 0;
  int got = std::sscanf(buf, "pid=%ld migration=%79[A-Za-z0-9._-]", &pid, migration);
  if (got >= 1) p.pid = pid;
  if (got == 2) p.migration_id = migration;
}

// The UUID names a file: only the canonical 36-character form, so no record or argument can
// reach outside SITE/holders (callers validate UUIDs already; this is the last line).
bool plain_uuid(const std::string& uuid) {
  if (uuid.size() != 36) return false;
  for (size_t i = 0; i < uuid.size(); ++i) {
    const char c = uuid[i];
    const bool dash = i == 8 || i == 13 || i == 18 || i == 23;
    if (dash ? c != '-' : !std::isxdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

Result<Fd> open_holder(const std::string& site_dir, const std::string& uuid) {
  if (!plain_uuid(uuid)) return Error{"holder: '" + uuid + "' is not a UUID", EINVAL};
  if (::mkdir(holder_dir(site_dir).c_str(), 0755) != 0 && errno != EEXIST)
    return Error::from_errno("mkdir " + holder_dir(site_dir));
  std::string path = holder_path(site_dir, uuid);
  Fd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (!fd) return Error::from_errno("open " + path);
  return fd;
}

}  // namespace

Result<VmHolder> VmHolder::take(const std::string& site_dir, const std::string& uuid, const std::string& migration_id) {
  KVMIG_ASSIGN(Fd fd, open_holder(site_dir, uuid));
  struct flock fl = whole_file(F_WRLCK);
  if (::fcntl(fd.get(), F_OFD_SETLK, &fl) != 0) {
    int e = errno;
    if (e != EAGAIN && e != EACCES) return Error::from_errno("F_OFD_SETLK " + holder_path(site_dir, uuid), e);
    HolderProbe p;
    parse_content(fd.get(), p);
    return Error{"vm " + uuid + " already runs at site " + site_dir + " (live process " + std::to_string(p.pid) +
                     (p.migration_id.empty() ? std::string() : ", migration " + p.migration_id) + ")",
                 EAGAIN};
  }
  // Who holds it, for status reasons. Best effort: on a full disk the lock still counts, and a
  // holder that could not write itself down reads as a live process of no known migration.
  char line[160];
  int n = std::snprintf(line, sizeof line, "pid=%ld migration=%s\n", static_cast<long>(::getpid()),
                        migration_id.c_str());
  if (::ftruncate(fd.get(), 0) == 0) (void)!::pwrite(fd.get(), line, static_cast<size_t>(n), 0);
  return VmHolder(std::move(fd));
}

HolderProbe probe_holder(const std::string& site_dir, const std::string& uuid) {
  HolderProbe p;
  if (!plain_uuid(uuid)) {
    p.detail = "'" + uuid + "' is not a UUID";
    return p;
  }
  std::string path = holder_path(site_dir, uuid);
  // O_RDWR: F_OFD_GETLK for a write lock wants a descriptor that could take it. Never created
  // here: a probe must not invent a holder file.
  Fd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd) {
    p.detail = errno == ENOENT ? "no holder file (kvmig before holders, or no process ever held it here)"
                               : "cannot open " + path + ": " + std::strerror(errno);
    return p;
  }
  struct flock fl = whole_file(F_WRLCK);
  if (::fcntl(fd.get(), F_OFD_GETLK, &fl) != 0) {
    p.detail = "F_OFD_GETLK " + path + ": " + std::strerror(errno);
    return p;
  }
  parse_content(fd.get(), p);
  p.state = fl.l_type == F_UNLCK ? HolderProbe::gone : HolderProbe::alive;
  p.detail = std::string(p.state == HolderProbe::alive ? "held by live process " : "last held by process ") +
             std::to_string(p.pid) + (p.migration_id.empty() ? std::string() : " (migration " + p.migration_id + ")");
  return p;
}

Result<Fd> lock_if_gone(const std::string& site_dir, const std::string& uuid) {
  KVMIG_ASSIGN(Fd fd, open_holder(site_dir, uuid));
  struct flock fl = whole_file(F_WRLCK);
  if (::fcntl(fd.get(), F_OFD_SETLK, &fl) != 0) {
    int e = errno;
    if (e == EAGAIN || e == EACCES) return Error{"vm " + uuid + " is held at site " + site_dir + " by a live process", EAGAIN};
    return Error::from_errno("F_OFD_SETLK " + holder_path(site_dir, uuid), e);
  }
  return fd;
}

bool control_socket_dead(const std::string& path) {
  sockaddr_un addr{};
  if (path.empty() || path.size() >= sizeof addr.sun_path) return false;
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return false;
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return false;
  return errno == ENOENT || errno == ECONNREFUSED;
}

}  // namespace kvmig::host
