// The seed's decision path, branch by branch, and the recovery plan each verdict leads to.
#include "host/status_checker.h"

#include <gtest/gtest.h>

#include "tests/unit/status_facts.h"

#include "host/recovery.h"

namespace kvmig::host {
namespace {

const std::string kMig = "group-7";
const std::string kVm = "6f1e8a52-1111-4c2b-9d3e-0123456789ab";

Placeholder placeholder(const std::string& migration, VmEntryState state) {
  return test_facts::placeholder(kVm, migration, state);
}

DestinationFacts started_only() {
  DestinationFacts d;
  d.started = true;
  return d;
}

DestinationFacts fully_migrated() {
  DestinationFacts d = started_only();
  d.placeholder = placeholder(kMig, VmEntryState::completed);
  d.completed_record = true;
  return d;
}

using test_facts::source;

VmStatus check(const DestinationFacts& d, const SourceFacts& s = source(SourceState::paused)) {
  return check_vm(kMig, kVm, d, s);
}

TEST(StatusChecker, AllThreeMeanMigrated) {
  VmStatus st = check(fully_migrated(), source(SourceState::gone, true));
  EXPECT_EQ(st.verdict, Verdict::migrated);
  EXPECT_EQ(st.reason, "migration-started record, placeholder, completed event");
}

TEST(StatusChecker, MigratedWithSourceStillPresentSaysSo) {
  VmStatus st = check(fully_migrated(), source(SourceState::paused));
  EXPECT_EQ(st.verdict, Verdict::migrated);
  EXPECT_NE(st.reason.find("source copy still exists (paused)"), std::string::npos) << st.reason;
}

TEST(StatusChecker, UnreadableDestinationIsInDoubt) {
  DestinationFacts d = fully_migrated();
  d.readable = false;
  d.read_error = "connection refused";
  VmStatus st = check(d);
  EXPECT_EQ(st.verdict, Verdict::in_doubt);
  EXPECT_NE(st.reason.find("connection refused"), std::string::npos);
}

TEST(StatusChecker, NoStartedRecordIsNotMigrated) {
  VmStatus st = check(DestinationFacts{});
  EXPECT_EQ(st.verdict, Verdict::not_migrated);
  EXPECT_NE(st.reason.find("no migration-started record"), std::string::npos);
}

TEST(StatusChecker, OwnPlaceholderWithoutStartedRecordIsInDoubt) {
  DestinationFacts d;
  d.placeholder = placeholder(kMig, VmEntryState::placeholder);
  EXPECT_EQ(check(d).verdict, Verdict::in_doubt);
}

TEST(StatusChecker, OtherMigrationsVmWithoutStartedRecordIsNotMigrated) {
  DestinationFacts d;
  d.placeholder = placeholder("older-migration", VmEntryState::completed);
  EXPECT_EQ(check(d).verdict, Verdict::not_migrated);
}

TEST(StatusChecker, ReleasedSourceWithoutAnyDestinationRecordIsInDoubt) {
  EXPECT_EQ(check(DestinationFacts{}, source(SourceState::gone, true)).verdict, Verdict::in_doubt);
}

TEST(StatusChecker, StartedWithoutPlaceholderIsNotMigrated) {
  VmStatus st = check(started_only());
  EXPECT_EQ(st.verdict, Verdict::not_migrated);
  EXPECT_NE(st.reason.find("no placeholder"), std::string::npos);
}

TEST(StatusChecker, StartedAbortedAndRemovedSaysAborted) {
  DestinationFacts d = started_only();
  d.aborted = true;
  VmStatus st = check(d);
  EXPECT_EQ(st.verdict, Verdict::not_migrated);
  EXPECT_NE(st.reason.find("aborted"), std::string::npos);
}

TEST(StatusChecker, SameUuidFromAnotherMigrationIsNotThisPlaceholder) {
  DestinationFacts d = started_only();
  d.placeholder = placeholder("other", VmEntryState::completed);
  VmStatus st = check(d);
  EXPECT_EQ(st.verdict, Verdict::not_migrated);
  EXPECT_NE(st.reason.find("belongs to migration other"), std::string::npos) << st.reason;
}

TEST(StatusChecker, CompletedRecordWithoutPlaceholderIsInDoubt) {
  DestinationFacts d = started_only();
  d.completed_record = true;
  EXPECT_EQ(check(d).verdict, Verdict::in_doubt);
}

TEST(StatusChecker, ReleasedSourceWithoutPlaceholderIsInDoubt) {
  EXPECT_EQ(check(started_only(), source(SourceState::gone, true)).verdict, Verdict::in_doubt);
}

TEST(StatusChecker, UntaggedPlaceholderIsNotMigrated) {
  DestinationFacts d = started_only();
  d.placeholder = placeholder(kMig, VmEntryState::placeholder);
  VmStatus st = check(d);
  EXPECT_EQ(st.verdict, Verdict::not_migrated);
  EXPECT_NE(st.reason.find("not tagged completed"), std::string::npos);
}

TEST(StatusChecker, CompletedRecordWithUntaggedPlaceholderIsInDoubt) {
  DestinationFacts d = started_only();
  d.placeholder = placeholder(kMig, VmEntryState::placeholder);
  d.completed_record = true;
  EXPECT_EQ(check(d).verdict, Verdict::in_doubt);
}

TEST(StatusChecker, ReleasedSourceWithUntaggedPlaceholderIsInDoubt) {
  DestinationFacts d = started_only();
  d.placeholder = placeholder(kMig, VmEntryState::placeholder);
  EXPECT_EQ(check(d, source(SourceState::gone, true)).verdict, Verdict::in_doubt);
}

TEST(StatusChecker, TaggedButAbortedIsInDoubt) {
  DestinationFacts d = fully_migrated();
  d.aborted = true;
  EXPECT_EQ(check(d).verdict, Verdict::in_doubt);
}

TEST(StatusChecker, TagCountsEvenWithoutCompletedRecord) {
  // libvirt order: the tag is written first, the record after; a crash between them leaves
  // the VM running at the destination, so the tag alone must mean migrated.
  DestinationFacts d = fully_migrated();
  d.completed_record = false;
  EXPECT_EQ(check(d).verdict, Verdict::migrated);
}

TEST(GatherDestination, BuildsFactsPerMigrationAndVmFromRecordsAndPlaceholders) {
  const std::string other_vm = "00000000-0000-4000-8000-000000000002";
  std::vector<Record> records = {
      {1, kMig, kVm, RecordKind::migration_started, 10, ""},
      {2, kMig, kVm, RecordKind::placeholder_created, 11, ""},
      {3, kMig, other_vm, RecordKind::migration_started, 12, ""},
      {4, kMig, kVm, RecordKind::migration_completed, 13, ""},
      {5, "m2", other_vm, RecordKind::aborted, 14, ""},
  };
  std::vector<Placeholder> ph = {placeholder(kMig, VmEntryState::completed)};
  auto all = gather_destination(records, ph, "");
  ASSERT_EQ(all.size(), 3u);
  const DestinationFacts& a = all.at({kMig, kVm});
  EXPECT_TRUE(a.started);
  EXPECT_TRUE(a.completed_record);
  EXPECT_EQ(a.completed_ms, 13);
  ASSERT_TRUE(a.placeholder);
  EXPECT_TRUE(a.placeholder->completed());
  const DestinationFacts& b = all.at({kMig, other_vm});
  EXPECT_TRUE(b.started);
  EXPECT_FALSE(b.placeholder);
  EXPECT_TRUE(all.at({"m2", other_vm}).aborted);

  const std::string unseen = "00000000-0000-4000-8000-000000000003";
  auto one = gather_destination(records, ph, kMig, {unseen});
  ASSERT_EQ(one.size(), 3u);
  EXPECT_FALSE(one.at({kMig, unseen}).started);
  EXPECT_EQ(one.count({"m2", other_vm}), 0u);
}

TEST(RecoveryPlan, NotMigratedFencesThenResumesPausedSource) {
  RecoveryPlan p = plan_recovery(check(started_only(), source(SourceState::paused)));
  ASSERT_EQ(p.steps.size(), 2u);
  EXPECT_EQ(p.steps[0], RecoveryStep::fence_destination);
  EXPECT_EQ(p.steps[1], RecoveryStep::resume_source);
  EXPECT_TRUE(p.problem.empty());
}

TEST(RecoveryPlan, NotMigratedRunningSourceOnlyFences) {
  RecoveryPlan p = plan_recovery(check(started_only(), source(SourceState::running)));
  ASSERT_EQ(p.steps.size(), 1u);
  EXPECT_EQ(p.steps[0], RecoveryStep::fence_destination);
  EXPECT_TRUE(p.problem.empty());
}

TEST(RecoveryPlan, NotMigratedWithSourceGoneOrUnknownIsAProblem) {
  EXPECT_NE(plan_recovery(check(started_only(), source(SourceState::gone))).problem.find("runs nowhere"),
            std::string::npos);
  EXPECT_FALSE(plan_recovery(check(started_only(), source(SourceState::unknown))).problem.empty());
}

TEST(RecoveryPlan, MigratedDestroysAndReleasesSource) {
  RecoveryPlan p = plan_recovery(check(fully_migrated(), source(SourceState::paused)));
  ASSERT_EQ(p.steps.size(), 2u);
  EXPECT_EQ(p.steps[0], RecoveryStep::destroy_source);
  EXPECT_EQ(p.steps[1], RecoveryStep::record_released);
  EXPECT_TRUE(p.problem.empty());
}

TEST(RecoveryPlan, MigratedAndAlreadyReleasedDoesNothing) {
  RecoveryPlan p = plan_recovery(check(fully_migrated(), source(SourceState::gone, true)));
  EXPECT_TRUE(p.steps.empty());
  EXPECT_TRUE(p.problem.empty());
}

TEST(RecoveryPlan, MigratedWithUnknownSourceIsAProblemAndRecordsNothing) {
  RecoveryPlan p = plan_recovery(check(fully_migrated(), source(SourceState::unknown)));
  EXPECT_TRUE(p.steps.empty());
  EXPECT_FALSE(p.problem.empty());
}

TEST(RecoveryPlan, InDoubtTouchesNothing) {
  DestinationFacts d = started_only();
  d.completed_record = true;
  RecoveryPlan p = plan_recovery(check(d, source(SourceState::paused)));
  EXPECT_TRUE(p.steps.empty());
  EXPECT_NE(p.problem.find("in doubt"), std::string::npos);
}

// A VM that left its site and came back by a later migration has the same UUID there: for
// the first migration it is another copy, never to be destroyed or resumed by its recovery.
TEST(RecoveryPlan, MigratedWithALaterCopyAtTheSourceDestroysNothing) {
  RecoveryPlan p = plan_recovery(check(fully_migrated(), source(SourceState::other)));
  ASSERT_EQ(p.steps.size(), 1u);
  EXPECT_EQ(p.steps[0], RecoveryStep::record_released);
  EXPECT_TRUE(p.problem.empty());
  EXPECT_TRUE(plan_recovery(check(fully_migrated(), source(SourceState::other, true))).steps.empty());
}

TEST(RecoveryPlan, NotMigratedWithALaterCopyAtTheSourceOnlyFences) {
  RecoveryPlan p = plan_recovery(check(started_only(), source(SourceState::other)));
  ASSERT_EQ(p.steps.size(), 1u);
  EXPECT_EQ(p.steps[0], RecoveryStep::fence_destination);
  EXPECT_TRUE(p.problem.empty());
}

}  // namespace
}  // namespace kvmig::host
