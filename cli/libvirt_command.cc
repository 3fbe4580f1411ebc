// `kvmig migrate-domain NAME... --from URI --to URI --site DIR --dest-site DIR [--peer-uri URI]
//  [--migrate-uri URI] [--migration ID] [--bandwidth MIB] [--json]`: moves a libvirt domain
// between two libvirtd instances with libvirt's peer-to-peer migration, writing the records,
// the placeholder and the completion tag at both sites (host/libvirt_migration.h), and prints
// the completed job's statistics as `virsh domjobinfo --completed` does. Several NAMEs move
// together, in parallel, as one group under one migration id (each its own libvirt job and
// records; `kvmig status --migration ID` then answers per domain).
// --site is the source's site, --dest-site the destination's (both reachable as directories
// from where kvmig runs, as on the testbed). Exit status: 0 migrated, 1 the move failed (the
// message says where the VM is; for a group: any domain failed), 125 bad input.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "cli/command_args.h"
#include "host/libvirt_migration.h"
#include "host/site_db.h"

namespace {

constexpr int kFailed = 1;
constexpr int kUsage = 125;

struct DomainOptions {
  std::string from, to;
  std::string site = "/var/lib/kvmig/site";
  std::string dest_site;
  bool json = false;
  std::vector<std::string> names;
  kvmig::host::DomainMoveOptions move;
};

[[noreturn]] void fail(int status, const std::string& message) {
  kvmig::cli::command_fail("migrate-domain", status, message);
}

void print_moved(const kvmig::host::DomainMoveResult& moved, bool json);

void run_migrate_domain(DomainOptions opt) {
  using namespace kvmig::host;
  if (opt.move.migration_id.empty()) opt.move.migration_id = random_uuid();
  if (auto r = check_migration_id(opt.move.migration_id); !r.ok()) fail(kUsage, "--migration: " + r.error().message);
  for (const std::string& n : opt.names) {
    if (n.empty()) fail(kUsage, "NAME: empty domain name");
    for (const std::string& m : opt.names)
      if (&m != &n && m == n) fail(kUsage, "NAME: domain " + n + " named twice");
  }
  if (opt.from == opt.to && opt.move.peer_uri.empty()) fail(kUsage, "--from and --to are the same libvirtd");
  auto src_db = SiteDb::open(opt.site, false);
  if (!src_db.ok()) fail(kUsage, "--site: " + src_db.error().message);
  auto dst_db = SiteDb::open(opt.dest_site, false);
  if (!dst_db.ok()) fail(kUsage, "--dest-site: " + dst_db.error().message);
  if ((*src_db)->site_id() == (*dst_db)->site_id()) fail(kUsage, "--site and --dest-site are the same site");
  auto src = LibvirtConn::open(opt.from);
  if (!src.ok()) fail(kFailed, "--from: " + src.error().message);
  auto dst = LibvirtConn::open(opt.to);
  if (!dst.ok()) fail(kFailed, "--to: " + dst.error().message);
  // One thread per domain, each with its own site and libvirt connections: SQLite handles are
  // not shared between threads, and libvirtd was seen to leave the second of three
  // migrations asked over one shared connection unstarted until the first ended.
  std::vector<kvmig::Result<DomainMoveResult>> results(opt.names.size(), kvmig::Error{"not run"});
  std::vector<std::thread> threads;
  for (size_t i = 0; i < opt.names.size(); ++i)
    threads.emplace_back([&, i] {
      auto s = SiteDb::open(opt.site, false);
      auto d = SiteDb::open(opt.dest_site, false);
      if (!s.ok() || !d.ok()) {
        results[i] = kvmig::Error{"opening the sites: " + (s.ok() ? d.error() : s.error()).message};
        return;
      }
      auto from = LibvirtConn::open(opt.from);
      auto to = LibvirtConn::open(opt.to);
      if (!from.ok() || !to.ok()) {
        results[i] = kvmig::Error{(from.ok() ? "--to: " + to.error().message : "--from: " + from.error().message)};
        return;
      }
      SiteRecords src_records(**s), dst_records(**d);
      DomainMoveOptions move = opt.move;
      move.domain = opt.names[i];
      results[i] = move_domain(*from, *to, src_records, dst_records, move);
    });
  for (std::thread& t : threads) t.join();
  bool failed = false;
  for (size_t i = 0; i < results.size(); ++i) {
    if (!results[i].ok()) {
      std::fprintf(stderr, "kvmig: migrate-domain: %s: %s\n", opt.names[i].c_str(), results[i].error().message.c_str());
      failed = true;
      continue;
    }
    print_moved(*results[i], opt.json);
  }
  std::fflush(stdout);
  if (failed) throw CLI::RuntimeError(kFailed);
}

void print_moved(const kvmig::host::DomainMoveResult& moved, bool json) {
  using namespace kvmig::host;
  if (json) {
    nlohmann::json stats = nlohmann::json::object();
    for (const JobStat& s : moved.stats.fields) {
      if (s.type == VIR_TYPED_PARAM_STRING) stats[s.field] = s.text;
      else if (s.type == VIR_TYPED_PARAM_DOUBLE) stats[s.field] = s.real;
      else stats[s.field] = s.number;
    }
    nlohmann::json out{{"migration", moved.migration_id}, {"uuid", moved.uuid},   {"name", moved.name},
                       {"elapsed_ms", moved.elapsed_ms},  {"job_type", moved.stats.job_type}, {"job", stats}};
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("migrated %s (%s), migration %s, in %lld ms\n%s", moved.name.c_str(), moved.uuid.c_str(),
                moved.migration_id.c_str(), (long long)moved.elapsed_ms, moved.stats.domjobinfo().c_str());
  }
}

}  // namespace

void add_libvirt_command(CLI::App& app) {
  auto opt = std::make_shared<DomainOptions>();
  CLI::App* cmd = app.add_subcommand("migrate-domain", "Live-migrate a libvirt domain between two libvirtd (peer to peer), with site records");
  cmd->add_option("name", opt->names, "The domains' names at the source (several: one group)")->required();
  cmd->add_option("--from", opt->from, "Source libvirt URI (kvmig's connection)")->required();
  cmd->add_option("--to", opt->to, "Destination libvirt URI (kvmig's connection)")->required();
  cmd->add_option("--site", opt->site, "The source's site directory (default /var/lib/kvmig/site)");
  cmd->add_option("--dest-site", opt->dest_site, "The destination's site directory")->required();
  cmd->add_option("--peer-uri", opt->move.peer_uri, "The destination libvirtd as the source libvirtd reaches it (default: --to)");
  cmd->add_option("--migrate-uri", opt->move.migrate_uri, "Where the memory stream goes, e.g. tcp://10.77.12.2");
  cmd->add_option("--migration", opt->move.migration_id, "Migration id (default: a new UUID)");
  cmd->add_option("--bandwidth", opt->move.bandwidth_mib, "Bandwidth limit, MiB/s (default: none)");
  cmd->add_flag("--json", opt->json, "Print JSON on stdout");
  cmd->callback([opt] { run_migrate_domain(*opt); });
}
