#include "host/libvirt_migration.h"

#include <libvirt/virterror.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <thread>

#include "host/libvirt_placeholder.h"
#include "host/migration_recorder.h"

namespace kvmig::host {

namespace {

enum class Unit { none, ms, bytes, bytes_per_s, pages_per_s, text };

struct Label {
  const char* field;
  const char* label;
  Unit unit;
};

// virsh domjobinfo's order and labels.
constexpr Label kLabels[] = {
    {VIR_DOMAIN_JOB_OPERATION, "Operation", Unit::text},
    {VIR_DOMAIN_JOB_TIME_ELAPSED, "Time elapsed", Unit::ms},
    {VIR_DOMAIN_JOB_TIME_ELAPSED_NET, "Time elapsed w/o network", Unit::ms},
    {VIR_DOMAIN_JOB_DATA_PROCESSED, "Data processed", Unit::bytes},
    {VIR_DOMAIN_JOB_DATA_REMAINING, "Data remaining", Unit::bytes},
    {VIR_DOMAIN_JOB_DATA_TOTAL, "Data total", Unit::bytes},
    {VIR_DOMAIN_JOB_MEMORY_PROCESSED, "Memory processed", Unit::bytes},
    {VIR_DOMAIN_JOB_MEMORY_REMAINING, "Memory remaining", Unit::bytes},
    {VIR_DOMAIN_JOB_MEMORY_TOTAL, "Memory total", Unit::bytes},
    {VIR_DOMAIN_JOB_MEMORY_BPS, "Memory bandwidth", Unit::bytes_per_s},
    {VIR_DOMAIN_JOB_MEMORY_DIRTY_RATE, "Dirty rate", Unit::pages_per_s},
    {VIR_DOMAIN_JOB_MEMORY_PAGE_SIZE, "Page size", Unit::none},
    {VIR_DOMAIN_JOB_MEMORY_ITERATION, "Iteration", Unit::none},
    {VIR_DOMAIN_JOB_MEMORY_POSTCOPY_REQS, "Postcopy requests", Unit::none},
    {VIR_DOMAIN_JOB_DISK_PROCESSED, "File processed", Unit::bytes},
    {VIR_DOMAIN_JOB_DISK_REMAINING, "File remaining", Unit::bytes},
    {VIR_DOMAIN_JOB_DISK_TOTAL, "File total", Unit::bytes},
    {VIR_DOMAIN_JOB_DISK_BPS, "File bandwidth", Unit::bytes_per_s},
    {VIR_DOMAIN_JOB_MEMORY_CONSTANT, "Constant pages", Unit::none},
    {VIR_DOMAIN_JOB_MEMORY_NORMAL, "Normal pages", Unit::none},
    {VIR_DOMAIN_JOB_MEMORY_NORMAL_BYTES, "Normal data", Unit::bytes},
    {VIR_DOMAIN_JOB_DOWNTIME, "Total downtime", Unit::ms},
    {VIR_DOMAIN_JOB_DOWNTIME_NET, "Downtime w/o network", Unit::ms},
    {VIR_DOMAIN_JOB_SETUP_TIME, "Setup time", Unit::ms},
    {VIR_DOMAIN_JOB_COMPRESSION_CACHE, "Compression cache", Unit::bytes},
    {VIR_DOMAIN_JOB_COMPRESSION_BYTES, "Compressed data", Unit::bytes},
    {VIR_DOMAIN_JOB_COMPRESSION_PAGES, "Compressed pages", Unit::none},
    {VIR_DOMAIN_JOB_COMPRESSION_CACHE_MISSES, "Compression cache misses", Unit::none},
    {VIR_DOMAIN_JOB_COMPRESSION_OVERFLOW, "Compression overflows", Unit::none},
    {VIR_DOMAIN_JOB_AUTO_CONVERGE_THROTTLE, "Auto converge throttle", Unit::none},
    {VIR_DOMAIN_JOB_ERRMSG, "Error message", Unit::text},
};

const char* job_type_name(int type) {
  switch (type) {
    case VIR_DOMAIN_JOB_NONE: return "None";
    case VIR_DOMAIN_JOB_BOUNDED: return "Bounded";
    case VIR_DOMAIN_JOB_UNBOUNDED: return "Unbounded";
    case VIR_DOMAIN_JOB_COMPLETED: return "Completed";
    case VIR_DOMAIN_JOB_FAILED: return "Failed";
    case VIR_DOMAIN_JOB_CANCELLED: return "Cancelled";
  }
  return "Unknown";
}

const char* operation_name(uint64_t op) {
  switch (op) {
    case VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN: return "Incoming migration";
    case VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT: return "Outgoing migration";
    case VIR_DOMAIN_JOB_OPERATION_SAVE: return "Save";
    case VIR_DOMAIN_JOB_OPERATION_RESTORE: return "Restore";
    case VIR_DOMAIN_JOB_OPERATION_DUMP: return "Dump";
    case VIR_DOMAIN_JOB_OPERATION_SNAPSHOT: return "Snapshot";
  }
  return "Unknown";
}

// As virsh prints sizes: the largest binary unit that keeps the value >= 1, three decimals.
std::string capacity(uint64_t bytes) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double v = double(bytes);
  int u = 0;
  while (v >= 1024 && u < 6) v /= 1024, ++u;
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.3f %s", v, units[u]);
  return buf;
}

std::string number_text(const JobStat& s) {
  if (s.type == VIR_TYPED_PARAM_STRING) return s.text;
  if (s.type == VIR_TYPED_PARAM_DOUBLE) return std::to_string(s.real);
  return std::to_string(s.number);
}

}  // namespace

const JobStat* JobStats::find(const std::string& field) const {
  for (const JobStat& s : fields)
    if (s.field == field) return &s;
  return nullptr;
}

std::string JobStats::domjobinfo() const {
  std::string out;
  auto line = [&out](const std::string& label, const std::string& value) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "%-17s %s\n", (label + ":").c_str(), value.c_str());
    out += buf;
  };
  line("Job type", job_type_name(job_type));
  for (const Label& l : kLabels) {
    const JobStat* s = find(l.field);
    if (!s) continue;
    char buf[96];
    switch (l.unit) {
      case Unit::text:
        line(l.label, s->type == VIR_TYPED_PARAM_STRING ? s->text : operation_name(s->number));
        break;
      case Unit::ms:
        std::snprintf(buf, sizeof buf, "%-12llu ms", (unsigned long long)s->number);
        line(l.label, buf);
        break;
      case Unit::bytes: line(l.label, capacity(s->number)); break;
      case Unit::bytes_per_s: line(l.label, capacity(s->number) + "/s"); break;
      case Unit::pages_per_s:
        std::snprintf(buf, sizeof buf, "%-12llu pages/s", (unsigned long long)s->number);
        line(l.label, buf);
        break;
      case Unit::none: line(l.label, number_text(*s)); break;
    }
  }
  return out;
}

Result<JobStats> job_stats(const LibvirtDomain& dom, bool completed) {
  int type = 0, n = 0;
  virTypedParameterPtr params = nullptr;
  if (virDomainGetJobStats(dom.get(), &type, &params, &n, completed ? VIR_DOMAIN_JOB_STATS_COMPLETED : 0) < 0)
    return libvirt_error("virDomainGetJobStats " + dom.name());
  JobStats stats;
  stats.job_type = type;
  for (int i = 0; i < n; ++i) {
    JobStat s{params[i].field, params[i].type};
    switch (params[i].type) {
      case VIR_TYPED_PARAM_INT: s.number = uint64_t(params[i].value.i); break;
      case VIR_TYPED_PARAM_UINT: s.number = params[i].value.ui; break;
      case VIR_TYPED_PARAM_LLONG: s.number = uint64_t(params[i].value.l); break;
      case VIR_TYPED_PARAM_ULLONG: s.number = params[i].value.ul; break;
      case VIR_TYPED_PARAM_DOUBLE: s.real = params[i].value.d; break;
      case VIR_TYPED_PARAM_BOOLEAN: s.number = params[i].value.b; break;
      case VIR_TYPED_PARAM_STRING: s.text = params[i].value.s ? params[i].value.s : ""; break;
    }
    stats.fields.push_back(std::move(s));
  }
  virTypedParamsFree(params, n);
  return stats;
}

namespace {

// Owner of the typed parameters handed to virDomainMigrateToURI3.
class MigrateParams {
 public:
  ~MigrateParams() { virTypedParamsFree(params_, n_); }
  Result<void> add(const char* field, const std::string& value) {
    if (virTypedParamsAddString(&params_, &n_, &max_, field, value.c_str()) < 0)
      return libvirt_error(std::string("migration parameter ") + field);
    return ok();
  }
  Result<void> add(const char* field, uint64_t value) {
    if (virTypedParamsAddULLong(&params_, &n_, &max_, field, value) < 0)
      return libvirt_error(std::string("migration parameter ") + field);
    return ok();
  }
  virTypedParameterPtr get() const { return params_; }
  int size() const { return n_; }

 private:
  virTypedParameterPtr params_ = nullptr;
  int n_ = 0, max_ = 0;
};

// virDomainMigrateToURI3 on a thread of its own while this one watches the destination site:
// libvirt's job can copy for minutes, and a site that fills meanwhile could not take the
// completion record after the hand-over (the domain would be tagged but never recorded). Like
// the micro-VM session's on_round, a site under MigrationRecorder::kMinFreeBytes aborts the
// job while the source still runs; `site_full` then says why. An abort that comes too late
// (libvirt is past the point of no return) is refused by libvirt and the move goes on.
Result<void> migrate_watching_site(const LibvirtDomain& dom, const std::string& peer, const MigrateParams& params,
                                   unsigned flags, MigrationRecorder& dest_recorder, std::string& site_full) {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  Result<void> result = ok();
  std::thread job([&] {
    Result<void> r = ok();
    // libvirt's errors are per thread: read this one here.
    if (virDomainMigrateToURI3(dom.get(), peer.c_str(), params.get(), params.size(), flags) < 0)
      r = libvirt_error("virDomainMigrateToURI3 " + dom.name() + " -> " + peer);
    std::lock_guard lock(mu);
    result = std::move(r);
    done = true;
    cv.notify_all();
  });
  bool tried = false;
  std::unique_lock lock(mu);
  while (!cv.wait_for(lock, std::chrono::milliseconds(250), [&] { return done; })) {
    if (tried) continue;
    auto room = dest_recorder.on_round(helper::SessionVm{});
    if (room.ok()) continue;
    tried = true;
    lock.unlock();
    if (virDomainAbortJob(dom.get()) == 0)
      site_full = "destination site: " + room.error().message + ": libvirt's migration aborted";
    else
      virResetLastError();  // too late to abort: the move goes on, the completion may fail later
    lock.lock();
  }
  lock.unlock();
  job.join();
  return result;
}

}  // namespace

Result<DomainMoveResult> move_domain(const LibvirtConn& source, const LibvirtConn& destination,
                                     SiteRecords& source_site, SiteRecords& destination_site,
                                     const DomainMoveOptions& options) {
  int64_t start = now_ms();
  KVMIG_TRY(check_migration_id(options.migration_id));
  DomainMoveResult result;
  result.migration_id = options.migration_id;
  KVMIG_ASSIGN(LibvirtDomain dom, source.by_name(options.domain));
  KVMIG_ASSIGN(bool active, dom.active());
  if (!active) return Error{"domain " + options.domain + " at " + source.uri() + " is not running: nothing to migrate"};
  KVMIG_ASSIGN(result.uuid, dom.uuid());
  result.name = dom.name();
  KVMIG_ASSIGN(std::string source_xml, dom.xml(VIR_DOMAIN_XML_SECURE | VIR_DOMAIN_XML_MIGRATABLE));

  // Destination first: the started record and the placeholder exist before anything moves.
  LibvirtPlaceholders dest_store(destination);
  KVMIG_TRY(dest_store.set_definition(result.uuid, source_xml));
  MigrationRecorder dest_recorder(destination_site, dest_store, false);
  KVMIG_TRY(dest_recorder.started(options.migration_id, result.uuid, result.name));
  auto fence = [&](Error e) -> Error {
    if (auto r = dest_recorder.aborted(options.migration_id, result.uuid, e.message); !r.ok())
      e.message += " (and fencing the destination failed: " + r.error().message + ")";
    return e;
  };

  auto placeholder_xml = dest_store.definition(result.uuid);
  if (!placeholder_xml.ok()) return fence(std::move(placeholder_xml.error()));
  MigrateParams params;
  for (auto r : {params.add(VIR_MIGRATE_PARAM_DEST_XML, *placeholder_xml),
                 params.add(VIR_MIGRATE_PARAM_PERSIST_XML, *placeholder_xml)})
    if (!r.ok()) return fence(std::move(r.error()));
  if (!options.migrate_uri.empty())
    if (auto r = params.add(VIR_MIGRATE_PARAM_URI, options.migrate_uri); !r.ok()) return fence(std::move(r.error()));
  if (options.bandwidth_mib)
    if (auto r = params.add(VIR_MIGRATE_PARAM_BANDWIDTH, options.bandwidth_mib); !r.ok())
      return fence(std::move(r.error()));
  // PAUSED: the domain must not run at the destination before kvmig has tagged it.
  unsigned flags = VIR_MIGRATE_LIVE | VIR_MIGRATE_PEER2PEER | VIR_MIGRATE_PERSIST_DEST | VIR_MIGRATE_PAUSED |
                   VIR_MIGRATE_ABORT_ON_ERROR;
  std::string peer = options.peer_uri.empty() ? destination.uri() : options.peer_uri;
  std::string site_full;
  if (auto r = migrate_watching_site(dom, peer, params, flags, dest_recorder, site_full); !r.ok()) {
    if (!site_full.empty()) r.error().message = site_full + " (" + r.error().message + ")";
    return fence(std::move(r.error()));
  }

  // libvirt's part is done: the source copy is stopped, the destination's is paused.
  if (auto stats = job_stats(dom, true); stats.ok()) result.stats = std::move(*stats);
  KVMIG_ASSIGN(LibvirtDomain arrived, destination.by_uuid(result.uuid));
  if (!arrived) return Error{"migration " + options.migration_id + ": " + result.uuid + " is not at " + destination.uri() + " after libvirt's migration (in doubt)"};
  // Its QEMU may have ended since libvirt's Finish: a tag on a domain that cannot run would
  // claim a VM that no longer exists anywhere. Left untagged, `kvmig status` says so.
  KVMIG_ASSIGN(bool arrived_active, arrived.active());
  if (!arrived_active)
    return Error{"migration " + options.migration_id + ": " + result.name + " arrived at " + destination.uri() +
                 " but no longer runs there (its QEMU ended): not tagged, the VM is lost (kvmig status)"};
  if (auto r = dest_recorder.completed(options.migration_id, result.uuid); !r.ok())
    return std::move(r.error().prefix("migration " + options.migration_id + ": the domain stays paused at " +
                                      destination.uri() + ", in doubt (kvmig recover)"));
  if (virDomainResume(arrived.get()) < 0)
    return libvirt_error("virDomainResume " + result.name + " at " + destination.uri() +
                         " (migrated and tagged completed: resume it there)");
  if (result.stats.fields.empty())
    if (auto stats = job_stats(arrived, true); stats.ok()) result.stats = std::move(*stats);

  // The source's copy: stopped by libvirt; its definition goes too, then it is released.
  KVMIG_ASSIGN(LibvirtDomain left, source.by_uuid(result.uuid));
  if (left) {
    KVMIG_ASSIGN(bool still, left.active());
    if (still) return Error{"domain " + result.name + " still runs at " + source.uri() + " after migrating"};
    if (virDomainUndefineFlags(left.get(), VIR_DOMAIN_UNDEFINE_KEEP_NVRAM) < 0)
      return libvirt_error("virDomainUndefineFlags " + result.name + " at " + source.uri());
  }
  LibvirtPlaceholders source_store(source);
  MigrationRecorder source_recorder(source_site, source_store, false);
  KVMIG_TRY(source_recorder.released(options.migration_id, result.uuid));
  result.elapsed_ms = now_ms() - start;
  return result;
}

}  // namespace kvmig::host
