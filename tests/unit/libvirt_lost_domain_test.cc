// Status and recovery of libvirt domains when a copy is lost or cannot be asked
// (host/libvirt_recovery.h), as pure functions: a migrated domain whose QEMU ended at the
// destination, and a source libvirtd that does not answer. The same cases run on real
// libvirtds in tests/integration/libvirt_fault_test.cc.
#include <gtest/gtest.h>

#include "tests/unit/status_facts.h"

#include <algorithm>

#include "host/libvirt_recovery.h"

namespace kvmig::host {
namespace {

const std::string kMig = "m-2";
const std::string kVm = "6b1c4a8e-3f5d-4e2a-9c7b-1d2e3f4a5b62";

DestinationFacts arrived(bool tagged) {
  return test_facts::started_with(
      test_facts::placeholder(kVm, kMig, tagged ? VmEntryState::completed : VmEntryState::placeholder), tagged);
}

using test_facts::source;

DomainFacts dest(bool active, bool paused = false) {
  DomainFacts f;
  f.dest_defined = true;
  f.dest_active = active;
  f.dest_paused = paused;
  return f;
}

DomainStatus decide(const DestinationFacts& d, const SourceFacts& s, const DomainFacts& f) {
  return decide_domain(check_vm(kMig, kVm, d, s), f);
}

bool has(const DomainPlan& plan, DomainStep step) {
  return std::find(plan.steps.begin(), plan.steps.end(), step) != plan.steps.end();
}

// Regression for the micro-VM checker's gap (a destination dead between its tag and its first
// run): a tagged domain that does not run at the destination never gets its source destroyed.
TEST(LibvirtLostDomain, MigratedButNotRunningAtTheDestinationNeverDestroysASourceCopy) {
  for (SourceState s : {SourceState::running, SourceState::paused}) {
    DomainStatus ds = decide(arrived(true), source(s), dest(false));
    EXPECT_EQ(ds.status.verdict, Verdict::migrated);
    DomainPlan plan = plan_domain(ds);
    EXPECT_TRUE(plan.steps.empty()) << source_state_name(s);
    EXPECT_NE(plan.problem.find("nothing destroyed"), std::string::npos) << plan.problem;
  }
  // The same facts with the destination running: the source copy is destroyed as usual.
  DomainPlan plan = plan_domain(decide(arrived(true), source(SourceState::running), dest(true)));
  EXPECT_TRUE(has(plan, DomainStep::destroy_source));
  EXPECT_TRUE(plan.problem.empty()) << plan.problem;
}

TEST(LibvirtLostDomain, MigratedAndLostAtTheDestinationIsReportedRunsNowhere) {
  DomainFacts f = dest(false);
  f.source_leftover = true;
  f.source_migrated_off = true;
  DomainPlan plan = plan_domain(decide(arrived(true), source(SourceState::gone), f));
  // The shut-off source definition goes (the tagged one at the destination is the VM's now),
  // the release is recorded, nothing is resumed, and the loss is reported.
  EXPECT_EQ(plan.steps, (std::vector<DomainStep>{DomainStep::undefine_source, DomainStep::record_released}));
  EXPECT_NE(plan.problem.find("runs nowhere"), std::string::npos) << plan.problem;
  // Released already: nothing left to do but to say so.
  plan = plan_domain(decide(arrived(true), source(SourceState::gone, true), dest(false)));
  EXPECT_TRUE(plan.steps.empty());
  EXPECT_NE(plan.problem.find("runs nowhere"), std::string::npos) << plan.problem;
}

TEST(LibvirtLostDomain, UnreachableSourceWithAnActiveUntaggedArrivalIsInDoubt) {
  DomainStatus ds = decide(arrived(false), source(SourceState::unknown), dest(true, true));
  EXPECT_EQ(ds.status.verdict, Verdict::in_doubt);
  EXPECT_FALSE(ds.handed_over);
  EXPECT_NE(ds.status.reason.find("only copy"), std::string::npos) << ds.status.reason;
  DomainPlan plan = plan_domain(ds);
  EXPECT_TRUE(plan.steps.empty());
  EXPECT_FALSE(plan.problem.empty());
}

TEST(LibvirtLostDomain, UnreachableSourceWithNothingActiveIsNotMigratedFencedButNotResumed) {
  DomainStatus ds = decide(arrived(false), source(SourceState::unknown), dest(false));
  EXPECT_EQ(ds.status.verdict, Verdict::not_migrated);
  DomainPlan plan = plan_domain(ds);
  EXPECT_EQ(plan.steps, std::vector<DomainStep>{DomainStep::fence_destination});
  EXPECT_NE(plan.problem.find("unknown"), std::string::npos) << plan.problem;
  // Migrated with the source unknown: nothing destroyed, nothing resumed, reported.
  plan = plan_domain(decide(arrived(true), source(SourceState::unknown), dest(true, true)));
  EXPECT_TRUE(plan.steps.empty());
  EXPECT_FALSE(plan.problem.empty());
}

// After a restart the source's libvirtd no longer says a domain was shut off by its migration;
// the destination's finished incoming domain (active, no job) still shows the hand-over.
TEST(LibvirtLostDomain, HandOverIsSeenFromTheDestinationWhenTheSourceForgotWhy) {
  DomainFacts f = dest(true, true);
  f.source_leftover = true;  // shut off, reason unknown
  f.dest_arrived = true;
  DomainStatus ds = decide(arrived(false), source(SourceState::gone), f);
  EXPECT_TRUE(ds.handed_over);
  EXPECT_EQ(plan_domain(ds).steps, (std::vector<DomainStep>{DomainStep::tag_completed, DomainStep::undefine_source,
                                                            DomainStep::record_released,
                                                            DomainStep::resume_destination}));
  // Still receiving (an incoming job): not a hand-over, and not "not migrated" either.
  f.dest_arrived = false;
  ds = decide(arrived(false), source(SourceState::gone), f);
  EXPECT_FALSE(ds.handed_over);
  EXPECT_EQ(ds.status.verdict, Verdict::in_doubt);
  EXPECT_TRUE(plan_domain(ds).steps.empty());
  // Fenced by recovery before: never completed afterwards.
  DestinationFacts fenced = arrived(false);
  fenced.aborted = true;
  f.dest_arrived = true;
  EXPECT_FALSE(decide(fenced, source(SourceState::gone), f).handed_over);
}

}  // namespace
}  // namespace kvmig::host
