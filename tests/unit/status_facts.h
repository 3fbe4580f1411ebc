// Fact builders shared by the status-checker and recovery unit tests: one way to say "the
// source is in this state" so the tests read as the decision table does.
#pragma once

#include <optional>
#include <string>

#include "host/status_checker.h"

namespace kvmig::host::test_facts {

inline SourceFacts source(SourceState state, bool released = false, bool got_done = false) {
  SourceFacts s;
  s.state = state;
  s.released = released;
  s.got_done = got_done;
  s.detail = "test";
  return s;
}

// The VM `uuid`'s entry at the destination, named "vm", of `migration`.
inline Placeholder placeholder(const std::string& uuid, const std::string& migration, VmEntryState state) {
  Placeholder p;
  p.uuid = uuid;
  p.name = "vm";
  p.migration_id = migration;
  p.state = state;
  return p;
}

// A destination that recorded the start, with this entry (or none) and maybe the completion.
inline DestinationFacts started_with(std::optional<Placeholder> p, bool completed_record = false) {
  DestinationFacts d;
  d.started = true;
  d.placeholder = std::move(p);
  d.completed_record = completed_record;
  return d;
}

}  // namespace kvmig::host::test_facts
