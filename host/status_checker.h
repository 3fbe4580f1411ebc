// The status checker: the seed's decision path (US2015378759), per VM, as a pure function of
// what was read from the destination site and what is known of the source. Only all three of
// "a migration-started record", "a placeholder with the same UUID", "the placeholder carries
// the migration-completed event" mean migrated; anything contradictory is in doubt, and in
// doubt is never acted on. docs/control-plane.md draws the path.
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "host/placeholder_registry.h"
#include "host/site_records.h"

namespace kvmig::host {

enum class Verdict { migrated, not_migrated, in_doubt };
std::string_view verdict_name(Verdict v);  // "migrated", "not-migrated", "in-doubt"

// The source's copy of the VM, as the recovery's source actions found it.
enum class SourceState {
  unknown,  // not asked (no source site given) or could not be asked
  running,
  paused,
  gone,  // no such VM at the source any more (its process ended)
  other,  // a VM with this UUID runs at the source, but it is not this migration's copy: it
          // came back by a later migration (recovery must neither destroy nor resume it)
};
std::string_view source_state_name(SourceState s);

// Whether the destination's copy of this migration still has a live process (host/vm_holder.h).
enum class CopyLiveness {
  unknown,  // not asked, or cannot be told (no holder: an older kvmig, a libvirt domain)
  alive,    // the process that received this migration still holds the VM (running or not yet)
  gone,     // that process has ended: whatever it ran is gone
};
std::string_view copy_liveness_name(CopyLiveness c);

// What the destination site says about one VM of one migration.
struct DestinationFacts {
  bool readable = true;
  std::string read_error;  // why not, when !readable
  bool started = false;           // a migration_started record
  bool completed_record = false;  // a migration_completed record
  bool aborted = false;           // an aborted record
  // The aborted record came after the completed one: recovery fenced a tagged copy it found
  // gone (`kvmig recover --resume-source`), and the source copy is the VM again.
  bool aborted_after_completion = false;
  int64_t completed_ms = 0;
  std::optional<Placeholder> placeholder;  // the VM with this UUID there, whatever its migration
  CopyLiveness copy = CopyLiveness::unknown;  // of this migration's tagged placeholder
  std::string copy_detail;
};

struct SourceFacts {
  SourceState state = SourceState::unknown;
  bool released = false;  // a source_released record at the source site
  std::string detail;     // e.g. why the state is unknown
  // The source session read DONE (its process says so). DONE is sent only once the destination's
  // vCPUs run, so this (or `released`, recorded right after DONE) proves the destination ran.
  bool got_done = false;
};

struct VmStatus {
  std::string migration_id;
  std::string vm_uuid;
  Verdict verdict = Verdict::in_doubt;
  std::string reason;
  SourceFacts source;
  DestinationFacts destination;
};

// The decision, per VM. Pure: the same facts always give the same answer.
VmStatus check_vm(const std::string& migration_id, const std::string& vm_uuid, const DestinationFacts& destination,
                  const SourceFacts& source);

// The status as `kvmig status --json` prints it (docs/control-plane.md).
nlohmann::json to_json(const VmStatus& status);

// Destination facts for every (migration, VM) the records name, from one read of the records
// and one of the placeholders (so 10,000 VMs take two queries, not 20,000). `only_migration`
// empty: every migration. `extra_vms` are VMs the caller knows belong to `only_migration`
// even if the destination never recorded them (it may have failed before the first record).
using VmKey = std::pair<std::string, std::string>;  // (migration id, VM UUID)
std::map<VmKey, DestinationFacts> gather_destination(const std::vector<Record>& records,
                                                     const std::vector<Placeholder>& placeholders,
                                                     const std::string& only_migration,
                                                     const std::vector<std::string>& extra_vms = {});

}  // namespace kvmig::host
