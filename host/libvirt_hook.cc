#include "host/libvirt_hook.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>

#include "base/fd.h"
#include "host/domain_xml.h"
#include "host/site_records.h"

namespace kvmig::host {

namespace {

constexpr const char* kRecordedOps[] = {"migrate", "prepare", "started", "stopped", "release"};
constexpr const char* kKnownOps[] = {"prepare", "start", "started", "stopped", "release", "migrate",
                                     "restore", "reconnect", "attach"};

bool one_of(std::string_view s, auto& list) {
  for (const char* x : list)
    if (s == x) return true;
  return false;
}

// Text that goes into a shell script between single quotes.
std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

}  // namespace

Result<std::optional<HookEvent>> hook_event(const std::vector<std::string>& args, std::string_view domain_xml) {
  if (args.size() != 4) return Error{"expected DOMAIN OP SUBOP EXTRA, got " + std::to_string(args.size()) + " arguments"};
  const std::string& op = args[1];
  if (!one_of(op, kKnownOps)) return Error{"unknown operation '" + op + "'"};
  if (args[2] != "begin" && args[2] != "end" && args[2] != "-") return Error{"unknown sub-operation '" + args[2] + "'"};
  if (domain_xml.empty()) return Error{"no domain XML on stdin"};
  auto d = read_domain_xml(domain_xml);
  if (!d.ok()) return std::move(d.error().prefix("stdin"));
  if (d->name != args[0]) return Error{"stdin describes domain '" + d->name + "', not '" + args[0] + "'"};
  if (!d->mark || !one_of(op, kRecordedOps)) return std::optional<HookEvent>();
  return std::optional<HookEvent>(HookEvent{d->mark->migration_id, d->uuid, d->name, op, args[2], now_ms()});
}

Result<void> check_not_fenced(SiteDb& db, const HookEvent& e) {
  if ((e.op != "migrate" && e.op != "prepare") || e.subop != "begin") return ok();
  SiteRecords records(db);
  KVMIG_ASSIGN(bool fenced, records.has(RecordKind::aborted, e.migration_id, e.vm_uuid));
  if (fenced)
    return Error{"migration " + e.migration_id + " of " + e.vm_uuid + " (" + e.domain +
                 ") was aborted at this site (kvmig recover): refusing the incoming domain"};
  return ok();
}

Result<void> record_hook_event(SiteDb& db, const HookEvent& e) {
  Transaction tx(db);
  KVMIG_TRY(tx.begun());
  KVMIG_ASSIGN(Statement * s, db.prepare("INSERT INTO libvirt_events(migration_id, vm_uuid, domain, op, subop, at_ms) "
                                         "VALUES (?1, ?2, ?3, ?4, ?5, ?6)"));
  s->bind(1, e.migration_id).bind(2, e.vm_uuid).bind(3, e.domain).bind(4, e.op).bind(5, e.subop).bind(6, e.at_ms);
  if (auto r = s->run(); !r.ok()) return std::move(r.error().prefix("recording libvirt " + e.op + " of " + e.domain));
  return tx.commit();
}

Result<std::vector<HookEvent>> hook_events(SiteDb& db, std::string_view migration_id) {
  KVMIG_ASSIGN(Statement * s, db.prepare("SELECT migration_id, vm_uuid, domain, op, subop, at_ms FROM libvirt_events "
                                         "WHERE ?1 = '' OR migration_id = ?1 ORDER BY seq"));
  s->bind(1, migration_id);
  std::vector<HookEvent> out;
  for (;;) {
    auto row = s->step();
    if (!row.ok() || !*row) {
      s->reset();
      if (!row.ok()) return std::move(row.error());
      return out;
    }
    out.push_back({s->text(0), s->text(1), s->text(2), s->text(3), s->text(4), s->integer(5)});
  }
}

std::string hook_script(const std::string& kvmig_binary, const std::string& site) {
  return "#!/bin/sh\n"
         "# Installed by `kvmig hook install`: records what libvirt does with the domains kvmig\n"
         "# moves (migrate, prepare, started, stopped, release) in this host's kvmig site.\n"
         "exec " + shell_quote(kvmig_binary) + " hook qemu --site " + shell_quote(site) + " -- \"$@\"\n";
}

Result<std::string> install_hook(const std::string& hooks_dir, const std::string& kvmig_binary,
                                 const std::string& site) {
  if (kvmig_binary.empty() || kvmig_binary[0] != '/') return Error{"kvmig binary '" + kvmig_binary + "' is not an absolute path"};
  std::filesystem::path dir = std::filesystem::path(hooks_dir) / "qemu.d";
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Error{"creating " + dir.string() + ": " + ec.message(), ec.value()};
  std::string path = (dir / "kvmig").string();
  std::string tmp = path + ".tmp";
  Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0755));
  if (!fd) return Error::from_errno("creating " + tmp);
  std::string text = hook_script(kvmig_binary, site);
  if (::write(fd.get(), text.data(), text.size()) != ssize_t(text.size()) || ::fchmod(fd.get(), 0755) != 0 ||
      ::fsync(fd.get()) != 0) {
    Error e = Error::from_errno("writing " + tmp);
    ::unlink(tmp.c_str());
    return e;
  }
  fd.reset();
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    Error e = Error::from_errno("renaming " + tmp + " to " + path);
    ::unlink(tmp.c_str());
    return e;
  }
  return path;
}

}  // namespace kvmig::host
