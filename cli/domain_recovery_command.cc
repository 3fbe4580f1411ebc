#include "cli/domain_recovery_command.h"

#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>

#include "cli/command_args.h"
#include "host/libvirt_recovery.h"
#include "host/site_db.h"

namespace kvmig::cli {

namespace {

using namespace kvmig::host;

constexpr int kSiteError = 1;
constexpr int kUnresolved = 3;
constexpr int kUsage = 125;

struct Opened {
  std::unique_ptr<SiteDb> dest_db, src_db;
  std::unique_ptr<SiteRecords> dest_records, src_records;
  LibvirtConn dest, source;
  std::string dest_error;  // the destination's site or libvirtd could not be read: why
  std::string source_error;  // the source's libvirtd could not be reached: why
};

// The source's site must answer. A source libvirtd that does not (killed, restarting) leaves
// its copies' state unknown: the verdicts still come from the destination, and recovery then
// touches no source copy (host/libvirt_recovery.h). An unreadable destination site or
// libvirtd makes every domain in doubt.
Opened open_sites(const char* command, const DomainSiteOptions& opt) {
  if (opt.libvirt.empty() || opt.source_libvirt.empty())
    command_fail(command, kUsage, "libvirt domains need both --libvirt and --source-libvirt");
  if (opt.source_site.empty()) command_fail(command, kUsage, "libvirt domains need --source-site");
  Opened o;
  auto s = SiteDb::open(opt.source_site, false);
  if (!s.ok()) command_fail(command, kSiteError, "--source-site: " + s.error().message);
  o.src_db = std::move(*s);
  o.src_records = std::make_unique<SiteRecords>(*o.src_db);
  // A full or broken destination site: the domains named with --vm are in doubt.
  auto d = SiteDb::open(opt.site, false);
  if (!d.ok()) {
    if (opt.vms.empty()) command_fail(command, kSiteError, "--site: " + d.error().message);
    o.dest_error = "the destination's site: " + d.error().message;
    return o;
  }
  o.dest_db = std::move(*d);
  o.dest_records = std::make_unique<SiteRecords>(*o.dest_db);
  auto sc = LibvirtConn::open(opt.source_libvirt);
  if (sc.ok())
    o.source = std::move(*sc);
  else
    o.source_error = sc.error().message;
  auto dc = LibvirtConn::open(opt.libvirt);
  if (dc.ok())
    o.dest = std::move(*dc);
  else
    o.dest_error = "the destination's libvirtd: " + dc.error().message;
  return o;
}

// Every domain of the migration, with its libvirt facts; in doubt when the destination's
// libvirtd cannot be asked (its placeholders are the seed's second and third question).
std::vector<DomainStatus> read_statuses(const char* command, Opened& o, const DomainSiteOptions& opt) {
  if (o.dest_error.empty()) {
    LibvirtSites sites{*o.dest_records, o.dest, *o.src_records, o.source, o.source_error};
    auto r = read_domain_status(sites, opt.migration, opt.vms);
    if (r.ok()) return std::move(*r);
    o.dest_error = r.error().message;
  }
  std::set<std::string> uuids(opt.vms.begin(), opt.vms.end());
  if (o.dest_records) {
    auto recs = o.dest_records->for_migration(opt.migration);
    if (!recs.ok()) command_fail(command, kSiteError, opt.site + ": " + recs.error().message);
    for (const Record& r : *recs) uuids.insert(r.vm_uuid);
  }
  std::vector<DomainStatus> out;
  for (VmStatus& st : unreadable_status(opt.migration, {uuids.begin(), uuids.end()}, o.dest_error))
    out.push_back(DomainStatus{std::move(st), {}, false});
  return out;
}

// As read_statuses, but none at all is an error (one line, kSiteError): the migration id is
// wrong, or its records are gone and only --vm can name the domains (so that COMMAND can VERB them).
std::vector<DomainStatus> statuses(const char* command, const char* verb, Opened& o, const DomainSiteOptions& opt) {
  std::vector<DomainStatus> all = read_statuses(command, o, opt);
  if (all.empty())
    command_fail(command, kSiteError, "no records of migration " + opt.migration + " at " + opt.site +
                                          " (name its domains with --vm to " + verb + " them)");
  return all;
}

nlohmann::json domain_json(const DomainStatus& ds) {
  nlohmann::json j = to_json(ds.status);
  j["libvirt"] = {{"handed_over", ds.handed_over},
                  {"source_job", ds.facts.source_job},
                  {"source_leftover", ds.facts.source_leftover},
                  {"source_migrated_off", ds.facts.source_migrated_off},
                  {"destination_active", ds.facts.dest_active},
                  {"destination_paused", ds.facts.dest_paused},
                  {"destination_arrived", ds.facts.dest_arrived}};
  return j;
}

}  // namespace

int run_domain_status(const DomainSiteOptions& opt) {
  Opened o = open_sites("status", opt);
  std::vector<DomainStatus> all = statuses("status", "check", o, opt);
  bool doubt = false;
  nlohmann::json out = nlohmann::json::array();
  for (const DomainStatus& ds : all) {
    const VmStatus& st = ds.status;
    doubt |= st.verdict == Verdict::in_doubt;
    if (opt.json) {
      out.push_back(domain_json(ds));
      continue;
    }
    std::printf("%s  %s  %s  %s  [source %s%s]\n", st.migration_id.c_str(), st.vm_uuid.c_str(),
                std::string(verdict_name(st.verdict)).c_str(), st.reason.c_str(),
                std::string(source_state_name(st.source.state)).c_str(), st.source.released ? ", released" : "");
  }
  if (opt.json) std::printf("%s\n", nlohmann::json{{"site", opt.site}, {"vms", out}}.dump().c_str());
  return doubt ? kUnresolved : 0;
}

int run_domain_recover(const DomainSiteOptions& opt) {
  Opened o = open_sites("recover", opt);
  std::vector<DomainStatus> all = statuses("recover", "recover", o, opt);
  bool unresolved = false;
  nlohmann::json out = nlohmann::json::array();
  for (const DomainStatus& ds : all) {
    RecoveryOutcome r;
    if (opt.dry_run || !o.dest_error.empty()) {
      DomainPlan plan = plan_domain(ds);
      r.status = ds.status;
      if (o.dest_error.empty())
        for (DomainStep step : plan.steps) r.done.push_back("would: " + std::string(domain_step_name(step)));
      r.problem = plan.problem;
    } else {
      LibvirtSites sites{*o.dest_records, o.dest, *o.src_records, o.source, o.source_error};
      r = recover_domain(ds, sites);
    }
    unresolved |= !r.problem.empty();
    if (opt.json) {
      nlohmann::json j = domain_json(DomainStatus{r.status, ds.facts, ds.handed_over});
      j["done"] = r.done;
      j["problem"] = r.problem;
      out.push_back(std::move(j));
      continue;
    }
    std::string line = r.status.migration_id + "  " + r.status.vm_uuid + "  " + std::string(verdict_name(ds.status.verdict));
    for (const std::string& d : r.done) line += "; " + d;
    if (r.done.empty() && r.problem.empty()) line += "; nothing to do";
    if (!r.problem.empty()) line += "; PROBLEM: " + r.problem;
    std::printf("%s\n", line.c_str());
  }
  if (opt.json) std::printf("%s\n", nlohmann::json{{"site", opt.site}, {"vms", out}}.dump().c_str());
  return unresolved ? kUnresolved : 0;
}

}  // namespace kvmig::cli
