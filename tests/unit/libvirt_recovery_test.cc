// The libvirt side of status and recovery as pure functions (host/libvirt_recovery.h): which
// facts make a domain "handed over", and what recovery does in each case. The same cases run
// on real libvirtds in tests/integration/libvirt_fault_test.cc.
#include "host/libvirt_recovery.h"

#include <gtest/gtest.h>

#include "tests/unit/status_facts.h"

namespace kvmig::host {
namespace {

const std::string kMig = "m-1";
const std::string kVm = "6b1c4a8e-3f5d-4e2a-9c7b-1d2e3f4a5b61";

Placeholder placeholder(const std::string& migration, bool tagged) {
  return test_facts::placeholder(kVm, migration, tagged ? VmEntryState::completed : VmEntryState::placeholder);
}

using test_facts::started_with;

using test_facts::source;

DomainStatus decide(const DestinationFacts& d, const SourceFacts& s, const DomainFacts& f) {
  return decide_domain(check_vm(kMig, kVm, d, s), f);
}

std::vector<DomainStep> steps(const DomainStatus& ds) { return plan_domain(ds).steps; }

DomainFacts handed_over_facts() {
  DomainFacts f;
  f.source_leftover = true;
  f.source_migrated_off = true;
  f.dest_active = true;
  f.dest_paused = true;
  return f;
}

TEST(LibvirtRecovery, SourceShutOffByMigrationAndUntaggedPausedArrivalIsHandedOverNotNotMigrated) {
  DomainStatus ds = decide(started_with(placeholder(kMig, false)), source(SourceState::gone), handed_over_facts());
  EXPECT_TRUE(ds.handed_over);
  EXPECT_EQ(ds.status.verdict, Verdict::in_doubt);
  EXPECT_NE(ds.status.reason.find("only copy"), std::string::npos) << ds.status.reason;
  EXPECT_EQ(steps(ds), (std::vector<DomainStep>{DomainStep::tag_completed, DomainStep::undefine_source,
                                                DomainStep::record_released, DomainStep::resume_destination}));
}

TEST(LibvirtRecovery, HandOverNeedsAllItsFacts) {
  // Shut off for another reason (its QEMU died): not a hand-over; fenced, and reported.
  DomainFacts f = handed_over_facts();
  f.source_migrated_off = false;
  DomainStatus ds = decide(started_with(placeholder(kMig, false)), source(SourceState::gone), f);
  EXPECT_FALSE(ds.handed_over);
  DomainPlan plan = plan_domain(ds);
  EXPECT_TRUE(plan.steps.empty()) << "an active untagged domain may be the only copy";
  EXPECT_FALSE(plan.problem.empty());
  // Nothing active at the destination: the VM runs nowhere, the placeholder is removed.
  f = handed_over_facts();
  f.dest_active = f.dest_paused = false;
  ds = decide(started_with(placeholder(kMig, false)), source(SourceState::gone), f);
  EXPECT_FALSE(ds.handed_over);
  EXPECT_EQ(ds.status.verdict, Verdict::not_migrated);
  plan = plan_domain(ds);
  EXPECT_EQ(plan.steps, std::vector<DomainStep>{DomainStep::fence_destination});
  EXPECT_NE(plan.problem.find("runs nowhere"), std::string::npos) << plan.problem;
  // Another migration's domain at the destination is not this one's hand-over.
  ds = decide(started_with(placeholder("m-0", false)), source(SourceState::gone), handed_over_facts());
  EXPECT_FALSE(ds.handed_over);
  // Tagged already: plainly migrated.
  ds = decide(started_with(placeholder(kMig, true)), source(SourceState::gone), handed_over_facts());
  EXPECT_FALSE(ds.handed_over);
  EXPECT_EQ(ds.status.verdict, Verdict::migrated);
}

TEST(LibvirtRecovery, RunningSourceJobIsAbortedBeforeAnythingElse) {
  DomainFacts f;
  f.source_job = true;
  f.dest_active = true;
  DomainStatus ds = decide(started_with(placeholder(kMig, false)), source(SourceState::running), f);
  EXPECT_EQ(ds.status.verdict, Verdict::not_migrated);
  EXPECT_NE(ds.status.reason.find("job still runs"), std::string::npos) << ds.status.reason;
  EXPECT_EQ(steps(ds), std::vector<DomainStep>{DomainStep::abort_source_job});
}

TEST(LibvirtRecovery, IncomingDomainIsDestroyedOnlyWhileTheSourceHoldsTheVm) {
  DomainFacts f;
  f.dest_active = true;
  DomainStatus ds = decide(started_with(placeholder(kMig, false)), source(SourceState::paused), f);
  EXPECT_EQ(steps(ds), (std::vector<DomainStep>{DomainStep::destroy_incoming, DomainStep::fence_destination,
                                                DomainStep::resume_source}));
  ds = decide(started_with(placeholder(kMig, false)), source(SourceState::unknown), f);
  EXPECT_TRUE(steps(ds).empty());
  EXPECT_FALSE(plan_domain(ds).problem.empty());
}

TEST(LibvirtRecovery, MigratedWithPausedArrivalUndefinesTheSourceThenResumes) {
  DomainFacts f;
  f.source_leftover = true;
  f.source_migrated_off = true;
  f.dest_active = f.dest_paused = true;
  DomainStatus ds = decide(started_with(placeholder(kMig, true)), source(SourceState::gone), f);
  EXPECT_EQ(ds.status.verdict, Verdict::migrated);
  EXPECT_EQ(steps(ds), (std::vector<DomainStep>{DomainStep::undefine_source, DomainStep::record_released,
                                                DomainStep::resume_destination}));
  // A source copy that still runs is destroyed first; one of unknown state blocks the resume.
  ds = decide(started_with(placeholder(kMig, true)), source(SourceState::running), DomainFacts{false, false, false, true, true});
  EXPECT_EQ(steps(ds), (std::vector<DomainStep>{DomainStep::destroy_source, DomainStep::record_released,
                                                DomainStep::resume_destination}));
  ds = decide(started_with(placeholder(kMig, true)), source(SourceState::unknown), DomainFacts{false, false, false, true, true});
  for (DomainStep s : steps(ds)) EXPECT_NE(s, DomainStep::resume_destination);
  EXPECT_FALSE(plan_domain(ds).problem.empty());
}

TEST(LibvirtRecovery, InDoubtDoesNothing) {
  DestinationFacts d;
  d.readable = false;
  d.read_error = "libvirtd down";
  DomainStatus ds = decide(d, source(SourceState::running), DomainFacts{});
  EXPECT_EQ(ds.status.verdict, Verdict::in_doubt);
  DomainPlan plan = plan_domain(ds);
  EXPECT_TRUE(plan.steps.empty());
  EXPECT_FALSE(plan.problem.empty());
}

}  // namespace
}  // namespace kvmig::host
