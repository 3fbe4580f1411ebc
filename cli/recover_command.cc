// `kvmig recover --site DIR --source-site DIR --migration ID [--vm UUID]... [--dry-run] [--json]`:
// makes the status checker's answer true on both sites, per VM (host/recovery.h): not
// migrated -> destination fenced, source resumed if paused; migrated -> source destroyed and
// released; in doubt -> nothing. Exit status: 0 every VM runs exactly once where its verdict
// says, 3 some VM in doubt or not recoverable (reported), 1 a site unreadable, 125 bad input.
// With --libvirt and --source-libvirt the VMs are libvirt domains (cli/domain_recovery_command.h).
// `--resume-source --vm UUID...` is the operator's answer to "destination copy is gone; it may
// never have run": only the named VMs, only in exactly that case (host/recovery.h
// resume_source_vm): the tagged placeholder is fenced, then the source copy resumed.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli/command_args.h"
#include "cli/domain_recovery_command.h"
#include "host/recovery.h"
#include "host/site_db.h"

namespace {

constexpr int kSiteError = 1;
constexpr int kUnresolved = 3;
constexpr int kUsage = 125;

struct RecoverOptions {
  std::string site = "/var/lib/kvmig/site";
  std::string source_site;
  std::string migration;
  std::vector<std::string> vms;
  bool dry_run = false;
  bool json = false;
  bool resume_source = false;
  std::string libvirt, source_libvirt;  // libvirt domains: cli/domain_recovery_command.h
};

[[noreturn]] void fail(int status, const std::string& message) {
  kvmig::cli::command_fail("recover", status, message);
}

std::unique_ptr<kvmig::host::SiteDb> open_site(const std::string& dir, const char* option) {
  auto db = kvmig::host::SiteDb::open(dir, false);
  if (!db.ok()) fail(kSiteError, std::string(option) + ": " + db.error().message);
  return std::move(*db);
}

int run_recover(RecoverOptions opt) {
  using namespace kvmig::host;
  kvmig::cli::check_vm_selection("recover", kUsage, opt.migration, true, opt.vms);
  if (opt.resume_source && opt.vms.empty()) fail(kUsage, "--resume-source needs --vm UUID for each VM to resume");
  if (opt.resume_source && (!opt.libvirt.empty() || !opt.source_libvirt.empty()))
    fail(kUsage, "--resume-source is for micro-VMs, not with --libvirt/--source-libvirt");
  if (!opt.libvirt.empty() || !opt.source_libvirt.empty())
    return kvmig::cli::run_domain_recover({opt.site, opt.source_site, opt.libvirt, opt.source_libvirt, opt.migration,
                                           opt.vms, opt.json, opt.dry_run});
  // Both sites must be readable: recovery acting on half the picture is how a VM ends up
  // running twice.
  auto dest_db = open_site(opt.site, "--site");
  auto src_db = open_site(opt.source_site, "--source-site");
  SiteRecords dest_records(*dest_db), src_records(*src_db);
  MicroVmRegistry dest_store(*dest_db), src_registry(*src_db);
  MicroVmSource source(src_records, src_registry);
  MigrationRecorder dest_recorder(dest_records, dest_store, true);
  MigrationRecorder src_recorder(src_records, src_registry, true);

  auto statuses = read_status(dest_records, dest_store, &source, opt.migration, opt.vms);
  if (!statuses.ok()) fail(kSiteError, opt.site + ": " + statuses.error().message);
  if (statuses->empty())
    fail(kSiteError, "no records of migration " + opt.migration + " at " + opt.site +
                         " (name its VMs with --vm to recover them)");
  bool unresolved = false;
  nlohmann::json out = nlohmann::json::array();
  for (const VmStatus& st : *statuses) {
    RecoveryOutcome o;
    if (opt.resume_source) {
      // Only the VMs named: resuming a source is never done for a whole group by default.
      if (std::find(opt.vms.begin(), opt.vms.end(), st.vm_uuid) == opt.vms.end()) continue;
      if (opt.dry_run) {
        o.status = st;
        o.problem = resume_source_refusal(st);
        if (o.problem.empty()) o.done = {"would: fence the tagged placeholder", "would: resume the source"};
        else o.problem = "--resume-source refused: " + o.problem;
      } else {
        o = resume_source_vm(st, dest_records, dest_store, source);
      }
    } else if (opt.dry_run) {
      RecoveryPlan plan = plan_recovery(st);
      o.status = st;
      for (RecoveryStep step : plan.steps) o.done.push_back("would: " + std::string(recovery_step_name(step)));
      o.problem = plan.problem;
    } else {
      o = recover_vm(st, dest_recorder, source, src_recorder);
    }
    unresolved |= !o.problem.empty();
    if (opt.json) {
      nlohmann::json j = to_json(o.status);
      j["done"] = o.done;
      j["problem"] = o.problem;
      out.push_back(std::move(j));
      continue;
    }
    std::string line = st.migration_id + "  " + st.vm_uuid + "  " + std::string(verdict_name(st.verdict));
    for (const std::string& d : o.done) line += "; " + d;
    if (o.done.empty() && o.problem.empty()) line += "; nothing to do";
    if (!o.problem.empty()) line += "; PROBLEM: " + o.problem;
    std::printf("%s\n", line.c_str());
  }
  if (opt.json) std::printf("%s\n", nlohmann::json{{"site", opt.site}, {"vms", out}}.dump().c_str());
  return unresolved ? kUnresolved : 0;
}

}  // namespace

void add_recover_command(CLI::App& app) {
  auto opt = std::make_shared<RecoverOptions>();
  CLI::App* cmd = app.add_subcommand("recover", "Make each VM of a migration run exactly once, as `kvmig status` decides");
  cmd->add_option("--site", opt->site, "The destination's site directory (default /var/lib/kvmig/site)");
  cmd->add_option("--source-site", opt->source_site, "The source's site directory")->required();
  cmd->add_option("--migration", opt->migration, "The migration id")->required();
  cmd->add_option("--vm", opt->vms, "A VM UUID of the migration, even if the destination never recorded it");
  cmd->add_flag("--dry-run", opt->dry_run, "Only print what would be done");
  cmd->add_flag("--resume-source", opt->resume_source,
                "For the --vm VMs whose tagged destination copy is gone before the source got DONE: fence "
                "the destination, resume the source (docs/control-plane.md)");
  cmd->add_flag("--json", opt->json, "Print JSON on stdout");
  cmd->add_option("--libvirt", opt->libvirt, "libvirt domains: the destination's libvirt URI (with --source-libvirt)");
  cmd->add_option("--source-libvirt", opt->source_libvirt, "libvirt domains: the source's libvirt URI (with --libvirt)");
  cmd->callback([opt] {
    int status = run_recover(*opt);
    if (status != 0) throw CLI::RuntimeError(status);
  });
}
