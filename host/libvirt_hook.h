// The libvirt hook: libvirt runs /etc/libvirt/hooks/qemu.d/kvmig (installed by `kvmig hook
// install`) at each step of a QEMU domain's life with DOMAIN OP SUBOP EXTRA and the domain XML
// on stdin. For the domains kvmig moves (those carrying kvmig's metadata element), the
// migrate / prepare / started / stopped / release steps are recorded in the site database,
// so a site can tell afterwards what libvirt did with a domain during a migration.
// The hook never calls back into libvirt (libvirt holds locks while it waits for the hook, and
// a hook calling libvirt deadlocks it), and it prints nothing on stdout (for "migrate" libvirt
// would take the output as a replacement XML).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "host/site_db.h"

namespace kvmig::host {

struct HookEvent {
  std::string migration_id;
  std::string vm_uuid;
  std::string domain;
  std::string op;     // migrate | prepare | started | stopped | release
  std::string subop;  // begin | end
  int64_t at_ms = 0;
};

// Checks libvirt's arguments (DOMAIN OP SUBOP EXTRA) and the XML, whatever the domain. The
// event to record, or nothing when the domain carries no kvmig mark or the step is not one
// kvmig records. Errors are one line.
Result<std::optional<HookEvent>> hook_event(const std::vector<std::string>& args, std::string_view domain_xml);

// For an incoming domain (op migrate or prepare, subop begin): an error when this site has
// recorded the migration aborted for this domain (`kvmig recover` fenced it). The hook then
// exits non-zero and libvirt refuses the incoming migration: a migration that recovery fenced
// while libvirt's job was not yet visible at the source cannot arrive afterwards.
Result<void> check_not_fenced(SiteDb& db, const HookEvent& event);

// The hook's table in the site database (libvirt_events, schema step 2 in host/site_db.cc).
Result<void> record_hook_event(SiteDb& db, const HookEvent& event);
// Events of one migration (every migration when empty), in the order recorded.
Result<std::vector<HookEvent>> hook_events(SiteDb& db, std::string_view migration_id);

// The script libvirt runs, and its installation as DIR/qemu.d/kvmig (0755, written to a
// temporary file and renamed, so libvirt never runs half a script). Returns the path.
std::string hook_script(const std::string& kvmig_binary, const std::string& site);
Result<std::string> install_hook(const std::string& hooks_dir, const std::string& kvmig_binary,
                                 const std::string& site);

}  // namespace kvmig::host
