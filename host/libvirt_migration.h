// Moving a libvirt domain between two libvirtd instances through libvirt's own migration
// (peer to peer: the source daemon talks to the destination daemon), with the same records,
// placeholder and completion tagging as a micro-VM move (host/migration_recorder.h):
//
//   destination site: migration_started, then the placeholder (an inactive domain with the
//       source's UUID, name and XML, marked with kvmig's element), placeholder_created
//   libvirt:          virDomainMigrateToURI3(LIVE | PEER2PEER | PERSIST_DEST | PAUSED), the
//                     placeholder's XML as DEST_XML and PERSIST_XML (so the mark arrives too)
//   destination:      the domain arrived PAUSED; the mark gets its completed event, then the
//                     migration_completed record; only then is the domain resumed
//   source:           libvirt stopped the source copy; kvmig undefines it, records
//                     source_released at the source site
//
// A failure before libvirt's migration returns leaves the source running (libvirt resumes it)
// and the destination fenced (placeholder undefined, aborted recorded). A failure to tag
// leaves the arrived domain paused and untagged: never run, in doubt until `kvmig recover`.
// Job statistics are the completed job's, as `virsh domjobinfo --completed` shows them.
#pragma once

#include <libvirt/libvirt.h>

#include <cstdint>
#include <string>
#include <vector>

#include "base/result.h"
#include "host/libvirt_conn.h"
#include "host/site_records.h"

namespace kvmig::host {

// One field of virDomainGetJobStats (VIR_DOMAIN_JOB_*), kept in libvirt's order.
struct JobStat {
  std::string field;  // e.g. "time_elapsed", "memory_total", "downtime"
  int type = 0;       // VIR_TYPED_PARAM_*
  uint64_t number = 0;
  double real = 0;
  std::string text;
};

struct JobStats {
  int job_type = VIR_DOMAIN_JOB_NONE;
  std::vector<JobStat> fields;

  const JobStat* find(const std::string& field) const;
  // The lines of `virsh domjobinfo`: "Time elapsed:     123          ms" ...
  std::string domjobinfo() const;
};

// The completed (`completed`) or current job's statistics of a domain.
Result<JobStats> job_stats(const LibvirtDomain& dom, bool completed);

struct DomainMoveOptions {
  std::string domain;        // name at the source
  std::string migration_id;  // [A-Za-z0-9._-]{1,64}
  // The destination libvirtd as the SOURCE daemon reaches it (peer to peer). Empty: the
  // URI kvmig itself used to open the destination.
  std::string peer_uri;
  // Where the memory stream goes (VIR_MIGRATE_PARAM_URI, e.g. "tcp://10.77.12.2"). Empty:
  // libvirt's choice (the destination's host name).
  std::string migrate_uri;
  uint64_t bandwidth_mib = 0;  // MiB/s, 0: unlimited
};

struct DomainMoveResult {
  std::string migration_id;
  std::string uuid;
  std::string name;
  int64_t elapsed_ms = 0;  // the whole move, records included
  JobStats stats;
};

Result<DomainMoveResult> move_domain(const LibvirtConn& source, const LibvirtConn& destination,
                                     SiteRecords& source_site, SiteRecords& destination_site,
                                     const DomainMoveOptions& options);

}  // namespace kvmig::host
