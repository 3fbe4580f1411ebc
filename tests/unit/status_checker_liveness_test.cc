// The decision rows that use the destination copy's liveness (host/vm_holder.h) and what the
// source knows of DONE: the gap of a destination killed between its completion tag and its
// first vCPU run, where the records alone say "migrated" while the only copy is the paused
// source (docs/control-plane.md, the decision path).
#include <gtest/gtest.h>

#include "tests/unit/status_facts.h"

#include "host/recovery.h"
#include "host/status_checker.h"

namespace kvmig::host {
namespace {

const std::string kMig = "group-9";
const std::string kVm = "6f1e8a52-2222-4c2b-9d3e-0123456789ab";

DestinationFacts tagged(CopyLiveness copy, const std::string& control = "") {
  DestinationFacts d;
  d.started = true;
  d.completed_record = true;
  Placeholder p;
  p.uuid = kVm;
  p.migration_id = kMig;
  p.state = VmEntryState::completed;
  p.control = control;
  d.placeholder = p;
  d.copy = copy;
  return d;
}

using test_facts::source;

VmStatus check(const DestinationFacts& d, const SourceFacts& s) { return check_vm(kMig, kVm, d, s); }

TEST(StatusLiveness, TaggedAndAliveIsMigrated) {
  VmStatus st = check(tagged(CopyLiveness::alive), source(SourceState::paused));
  EXPECT_EQ(st.verdict, Verdict::migrated);
  EXPECT_NE(st.reason.find("destination copy is alive"), std::string::npos) << st.reason;
  EXPECT_NE(st.reason.find("recover destroys it"), std::string::npos) << st.reason;
  EXPECT_EQ(resume_source_refusal(st).find("not in doubt"), 0u);
}

TEST(StatusLiveness, TaggedWithUnknownLivenessKeepsTheRecordsAnswer) {
  // An older kvmig's site (no holder files) or a libvirt domain: the tag decides, as before.
  VmStatus st = check(tagged(CopyLiveness::unknown), source(SourceState::paused));
  EXPECT_EQ(st.verdict, Verdict::migrated);
}

TEST(StatusLiveness, TaggedCopyGoneBeforeDoneWithPausedSourceIsInDoubtAndResumable) {
  VmStatus st = check(tagged(CopyLiveness::gone), source(SourceState::paused));
  EXPECT_EQ(st.verdict, Verdict::in_doubt);
  EXPECT_NE(st.reason.find("destination copy is gone; it may never have run"), std::string::npos) << st.reason;
  EXPECT_NE(st.reason.find("--resume-source"), std::string::npos) << st.reason;
  RecoveryPlan plan = plan_recovery(st);
  EXPECT_TRUE(plan.steps.empty()) << "plain recover must destroy nothing";
  EXPECT_FALSE(plan.problem.empty());
  EXPECT_EQ(resume_source_refusal(st), "");
}

TEST(StatusLiveness, TaggedCopyThatRanAndIsGoneBeforeDoneSaysItRan) {
  // The control socket is registered on the row only after the VM ran there.
  VmStatus st = check(tagged(CopyLiveness::gone, "/run/kvmig/b.sock"), source(SourceState::paused));
  EXPECT_EQ(st.verdict, Verdict::in_doubt);
  EXPECT_NE(st.reason.find("it ran"), std::string::npos) << st.reason;
  EXPECT_NE(st.reason.find("back to the switch-over"), std::string::npos) << st.reason;
  EXPECT_TRUE(plan_recovery(st).steps.empty());
  EXPECT_EQ(resume_source_refusal(st), "") << "the operator may still take the source back";
}

TEST(StatusLiveness, TaggedCopyGoneAfterTheSourceGotDoneIsMigratedAndNotRunning) {
  for (SourceFacts s : {source(SourceState::gone, true), source(SourceState::paused, false, true),
                        source(SourceState::paused, true)}) {
    VmStatus st = check(tagged(CopyLiveness::gone), s);
    EXPECT_EQ(st.verdict, Verdict::migrated) << st.reason;
    EXPECT_NE(st.reason.find("destination copy is not running"), std::string::npos) << st.reason;
    EXPECT_NE(resume_source_refusal(st), "");
  }
  // The stale paused source is still destroyed: the VM ran at the destination.
  RecoveryPlan plan = plan_recovery(check(tagged(CopyLiveness::gone), source(SourceState::paused, false, true)));
  ASSERT_FALSE(plan.steps.empty());
  EXPECT_EQ(plan.steps[0], RecoveryStep::destroy_source);
}

TEST(StatusLiveness, TaggedCopyGoneWithoutAPausedSourceCopyIsInDoubtAndNotResumable) {
  struct Row {
    SourceState state;
    const char* says;
  };
  for (Row row : {Row{SourceState::gone, "runs nowhere"}, Row{SourceState::running, "source copy runs"},
                  Row{SourceState::unknown, "unknown"}, Row{SourceState::other, "not this migration's copy"}}) {
    VmStatus st = check(tagged(CopyLiveness::gone), source(row.state));
    EXPECT_EQ(st.verdict, Verdict::in_doubt) << st.reason;
    EXPECT_NE(st.reason.find(row.says), std::string::npos) << st.reason;
    EXPECT_TRUE(plan_recovery(st).steps.empty());
    EXPECT_NE(resume_source_refusal(st), "") << source_state_name(row.state);
  }
}

TEST(StatusLiveness, ResumeSourceNeedsTheCopyKnownGone) {
  VmStatus alive = check(tagged(CopyLiveness::alive), source(SourceState::paused));
  EXPECT_NE(resume_source_refusal(alive), "");
  // In doubt for another reason (completion recorded, placeholder untagged): refused too.
  DestinationFacts d = tagged(CopyLiveness::gone);
  d.placeholder->state = VmEntryState::placeholder;
  VmStatus untagged = check(d, source(SourceState::paused));
  ASSERT_EQ(untagged.verdict, Verdict::in_doubt);
  EXPECT_NE(resume_source_refusal(untagged).find("no tagged placeholder"), std::string::npos);
}

TEST(StatusLiveness, FencedTaggedCopyIsNotMigratedAndRecoveryResumesTheSource) {
  // What `kvmig recover --resume-source` leaves: placeholder removed, aborted after completed.
  DestinationFacts d = tagged(CopyLiveness::gone);
  d.placeholder.reset();
  d.aborted = true;
  d.aborted_after_completion = true;
  VmStatus st = check(d, source(SourceState::paused));
  EXPECT_EQ(st.verdict, Verdict::not_migrated) << st.reason;
  EXPECT_NE(st.reason.find("fenced"), std::string::npos) << st.reason;
  RecoveryPlan plan = plan_recovery(st);
  ASSERT_EQ(plan.steps.size(), 2u);
  EXPECT_EQ(plan.steps[1], RecoveryStep::resume_source);
  EXPECT_EQ(check(d, source(SourceState::running)).verdict, Verdict::not_migrated);
  // A source that got DONE contradicts the fence: in doubt.
  EXPECT_EQ(check(d, source(SourceState::gone, true)).verdict, Verdict::in_doubt);
  // An abort recorded before the completion is not a fence of the tagged copy.
  d.aborted_after_completion = false;
  EXPECT_EQ(check(d, source(SourceState::paused)).verdict, Verdict::in_doubt);
}

TEST(StatusLiveness, GatherTellsAnAbortAfterTheCompletionFromOneBefore) {
  const std::string other = "00000000-0000-4000-8000-000000000009";
  std::vector<Record> records = {
      {1, kMig, kVm, RecordKind::migration_started, 10, ""},
      {2, kMig, kVm, RecordKind::migration_completed, 11, ""},
      {3, kMig, kVm, RecordKind::aborted, 12, "recovered"},
      {4, kMig, other, RecordKind::migration_started, 13, ""},
      {5, kMig, other, RecordKind::aborted, 14, ""},
      {6, kMig, other, RecordKind::migration_completed, 15, ""},
  };
  auto facts = gather_destination(records, {}, kMig);
  EXPECT_TRUE(facts.at({kMig, kVm}).aborted_after_completion);
  EXPECT_TRUE(facts.at({kMig, other}).aborted);
  EXPECT_FALSE(facts.at({kMig, other}).aborted_after_completion);
}

TEST(StatusLiveness, JsonCarriesLivenessAndDone) {
  VmStatus st = check(tagged(CopyLiveness::gone), source(SourceState::paused, false, true));
  nlohmann::json j = to_json(st);
  EXPECT_EQ(j["destination"]["copy"], "gone");
  EXPECT_EQ(j["source"]["got_done"], true);
}

}  // namespace
}  // namespace kvmig::host
