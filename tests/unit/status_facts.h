// Fact builders shared by the status-checker and recovery unit tests: one way to say "the
// source is in this state" so the tests read as the decision table does.
#pragma once

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

}  // namespace kvmig::host::test_facts
