// `kvmig status [--site DIR] [--source-site DIR] [--libvirt URI] [--migration ID] [--vm UUID]... [--json]`:
// per VM of a (group) migration, the status checker's verdict (migrated / not-migrated /
// in-doubt) with its reason, read from the destination site DIR (and the source site, when
// given, for the source copy's state). Exit status: 0 every VM decided, 3 some VM in doubt,
// 1 nothing to report or the site unreadable, 125 bad input.
// Also `kvmig site init DIR`, which creates the site those commands read.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli/command_args.h"
#include "cli/domain_recovery_command.h"
#include "host/libvirt_placeholder.h"
#include "host/placeholder_union.h"
#include "host/recovery.h"
#include "host/site_db.h"

namespace {

constexpr int kNothing = 1;
constexpr int kInDoubt = 3;
constexpr int kUsage = 125;

struct StatusOptions {
  std::string site = "/var/lib/kvmig/site";
  std::string source_site;
  std::string migration;
  std::vector<std::string> vms;
  std::string libvirt;  // the destination's libvirtd: its domains are placeholders too
  std::string source_libvirt;  // the source's libvirtd: libvirt domains, cli/domain_recovery_command.h
  bool json = false;
};

[[noreturn]] void fail(int status, const std::string& message) {
  kvmig::cli::command_fail("status", status, message);
}

int run_status(StatusOptions opt) {
  using namespace kvmig::host;
  kvmig::cli::check_vm_selection("status", kUsage, opt.migration, false, opt.vms);
  if (!opt.vms.empty() && opt.migration.empty()) fail(kUsage, "--vm needs --migration");
  if (!opt.source_libvirt.empty()) {
    if (opt.migration.empty()) fail(kUsage, "--source-libvirt needs --migration");
    return kvmig::cli::run_domain_status({opt.site, opt.source_site, opt.libvirt, opt.source_libvirt, opt.migration,
                                          opt.vms, opt.json, false});
  }

  std::vector<VmStatus> statuses;
  auto dest = SiteDb::open(opt.site, false);
  if (!dest.ok()) {
    if (opt.vms.empty()) fail(kNothing, dest.error().message);
    statuses = unreadable_status(opt.migration, opt.vms, dest.error().message);
  } else {
    SiteRecords records(**dest);
    MicroVmRegistry micro_vms(**dest);
    std::unique_ptr<LibvirtConn> conn;
    std::unique_ptr<LibvirtPlaceholders> domains;
    std::vector<PlaceholderStore*> stores{&micro_vms};
    if (!opt.libvirt.empty()) {
      auto c = LibvirtConn::open(opt.libvirt);
      if (!c.ok()) fail(kNothing, "--libvirt: " + c.error().message);
      conn = std::make_unique<LibvirtConn>(std::move(*c));
      domains = std::make_unique<LibvirtPlaceholders>(*conn);
      stores.push_back(domains.get());
    }
    PlaceholderUnion placeholders(stores);
    std::unique_ptr<SiteDb> src_db;
    std::unique_ptr<SiteRecords> src_records;
    std::unique_ptr<MicroVmRegistry> src_registry;
    std::unique_ptr<MicroVmSource> source;
    if (!opt.source_site.empty()) {
      auto s = SiteDb::open(opt.source_site, false);
      if (!s.ok()) fail(kNothing, "--source-site: " + s.error().message);
      src_db = std::move(*s);
      src_records = std::make_unique<SiteRecords>(*src_db);
      src_registry = std::make_unique<MicroVmRegistry>(*src_db);
      source = std::make_unique<MicroVmSource>(*src_records, *src_registry);
    }
    auto r = read_status(records, placeholders, source.get(), opt.migration, opt.vms);
    if (!r.ok()) fail(kNothing, opt.site + ": " + r.error().message);
    statuses = std::move(*r);
  }
  if (statuses.empty())
    fail(kNothing, opt.migration.empty() ? "no migrations recorded at " + opt.site
                                         : "no records of migration " + opt.migration + " at " + opt.site +
                                               " (name its VMs with --vm to check them)");
  bool doubt = false;
  nlohmann::json out = nlohmann::json::array();
  std::string text;
  for (const VmStatus& st : statuses) {
    doubt |= st.verdict == Verdict::in_doubt;
    if (opt.json) {
      out.push_back(to_json(st));
    } else {
      text += st.migration_id + "  " + st.vm_uuid + "  " + std::string(verdict_name(st.verdict)) + "  " + st.reason;
      if (st.source.state != SourceState::unknown)
        text += "  [source " + std::string(source_state_name(st.source.state)) +
                (st.source.released ? ", released" : "") + "]";
      text += "\n";
    }
  }
  if (opt.json)
    std::printf("%s\n", nlohmann::json{{"site", opt.site}, {"vms", out}}.dump().c_str());
  else
    std::fwrite(text.data(), 1, text.size(), stdout);
  return doubt ? kInDoubt : 0;
}

}  // namespace

// `kvmig site init DIR`: creates a site (its database, schema and site id); the testbed and
// operators run it once per host. Opening an existing site only migrates its schema.
void add_site_command(CLI::App& app) {
  auto dir = std::make_shared<std::string>();
  CLI::App* site = app.add_subcommand("site", "Manage this host's kvmig site (records and VM registry)");
  site->require_subcommand(1);
  CLI::App* init = site->add_subcommand("init", "Create a site directory, or bring its schema up to date");
  init->add_option("dir", *dir, "Site directory")->required();
  init->callback([dir] {
    auto db = kvmig::host::SiteDb::open(*dir, true);
    if (!db.ok()) {
      std::fprintf(stderr, "kvmig: site init: %s\n", db.error().message.c_str());
      throw CLI::RuntimeError(kNothing);
    }
    std::printf("%s site %s schema %d\n", dir->c_str(), (*db)->site_id().c_str(), (*db)->schema_version());
  });
}

void add_status_command(CLI::App& app) {
  add_site_command(app);
  auto opt = std::make_shared<StatusOptions>();
  CLI::App* cmd = app.add_subcommand("status", "Tell, per VM of a migration, whether it migrated (from the site records)");
  cmd->add_option("--site", opt->site, "The destination's site directory (default /var/lib/kvmig/site)");
  cmd->add_option("--source-site", opt->source_site, "The source's site directory, to report the source copy too");
  cmd->add_option("--migration", opt->migration, "Only this migration id (default: every migration recorded)");
  cmd->add_option("--vm", opt->vms, "A VM UUID of the migration, even if the destination never recorded it");
  cmd->add_option("--libvirt", opt->libvirt, "The destination's libvirt URI: its domains are placeholders too");
  cmd->add_option("--source-libvirt", opt->source_libvirt, "The source's libvirt URI: status of libvirt domains (needs --libvirt, --source-site)");
  cmd->add_flag("--json", opt->json, "Print JSON on stdout");
  cmd->callback([opt] {
    int status = run_status(*opt);
    if (status != 0) throw CLI::RuntimeError(status);
  });
}
