// `kvmig hook install [--dir /etc/libvirt/hooks] [--site DIR]`: installs DIR/qemu.d/kvmig, the
// libvirt hook that runs `kvmig hook qemu` with libvirt's arguments.
// `kvmig hook qemu [--site DIR] [--] DOMAIN OP SUBOP EXTRA` (libvirt runs it, domain XML on
// stdin): checks the XML and records migrate/prepare/started/stopped/release of the domains
// carrying kvmig's metadata in the site (host/libvirt_hook.h). It never calls libvirt and
// prints nothing on stdout. An incoming domain whose migration this site recorded aborted is
// refused (libvirt then refuses the migration). Exit status: 0 recorded or nothing to record,
// 1 the site could not be written or the migration was fenced, 125 bad arguments or bad XML
// (then nothing is written).
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cli/command_args.h"
#include "host/libvirt_hook.h"

namespace {

constexpr int kSiteError = 1;
constexpr int kUsage = 125;
constexpr size_t kMaxXml = 16 << 20;  // libvirt's own cap on a domain XML is far below this

[[noreturn]] void fail(int status, const std::string& message) {
  kvmig::cli::command_fail("hook", status, message);
}

std::string read_stdin() {
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(0, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail(kUsage, std::string("reading stdin: ") + std::strerror(errno));
    }
    if (n == 0) return out;
    out.append(buf, size_t(n));
    if (out.size() > kMaxXml) fail(kUsage, "stdin: domain XML larger than 16 MiB");
  }
}

std::string self_path() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) fail(kSiteError, std::string("cannot find the kvmig binary: ") + std::strerror(errno));
  return std::string(buf, size_t(n));
}

struct HookOptions {
  std::string dir = "/etc/libvirt/hooks";
  std::string site = "/var/lib/kvmig/site";
  std::vector<std::string> args;
};

void run_qemu_hook(const HookOptions& opt) {
  using namespace kvmig::host;
  std::string xml = read_stdin();
  auto event = hook_event(opt.args, xml);
  if (!event.ok()) fail(kUsage, event.error().message);
  if (!*event) return;  // not a domain kvmig moves, or a step it does not record
  auto db = SiteDb::open(opt.site, false);
  if (!db.ok()) fail(kSiteError, db.error().message);
  if (auto r = record_hook_event(**db, **event); !r.ok()) fail(kSiteError, r.error().message);
  if (auto r = check_not_fenced(**db, **event); !r.ok()) fail(kSiteError, r.error().message);
}

}  // namespace

void add_hook_command(CLI::App& app) {
  auto opt = std::make_shared<HookOptions>();
  CLI::App* hook = app.add_subcommand("hook", "The libvirt hook: install it, or run it as libvirt does");
  hook->require_subcommand(1);
  CLI::App* install = hook->add_subcommand("install", "Install DIR/qemu.d/kvmig, which runs `kvmig hook qemu`");
  install->add_option("--dir", opt->dir, "libvirt's hooks directory (default /etc/libvirt/hooks)");
  install->add_option("--site", opt->site, "The site the hook records into (default /var/lib/kvmig/site)");
  install->callback([opt] {
    auto path = kvmig::host::install_hook(opt->dir, self_path(), opt->site);
    if (!path.ok()) fail(kSiteError, "install: " + path.error().message);
    std::printf("installed %s (libvirtd reads its hooks when it starts: restart it)\n", path->c_str());
  });
  CLI::App* qemu = hook->add_subcommand("qemu", "Run as libvirt's qemu hook: DOMAIN OP SUBOP EXTRA, domain XML on stdin");
  qemu->add_option("--site", opt->site, "Site directory (default /var/lib/kvmig/site)");
  qemu->add_option("args", opt->args, "DOMAIN OP SUBOP EXTRA, as libvirt passes them");
  qemu->callback([opt] { run_qemu_hook(*opt); });
}
