// `kvmig recover --resume-source` on real site databases (SQLite files): the tagged placeholder
// of a destination whose process is gone is fenced before anything is resumed, the fence stops
// a late destination from completing or starting the migration again, and a destination copy
// that turns out to be held by a live process is never fenced.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

#include "test_util.h"

#include "host/migration_recorder.h"
#include "host/recovery.h"
#include "host/site_db.h"
#include "host/vm_holder.h"

namespace kvmig::host {
namespace {

const std::string kMig = "tagged-1";
const std::string kVm = "6f1e8a52-4444-4c2b-9d3e-0123456789ab";

class ResumeSource : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test::make_temp_dir("kvmig-resume");
    ASSERT_FALSE(dir_.empty());
    auto d = SiteDb::open(dir_ + "/dst", true);
    auto s = SiteDb::open(dir_ + "/src", true);
    ASSERT_TRUE(d.ok() && s.ok());
    dst_ = std::move(*d);
    src_ = std::move(*s);
    dst_records_ = std::make_unique<SiteRecords>(*dst_);
    src_records_ = std::make_unique<SiteRecords>(*src_);
    dst_store_ = std::make_unique<MicroVmRegistry>(*dst_);
    src_registry_ = std::make_unique<MicroVmRegistry>(*src_);
    recorder_ = std::make_unique<MigrationRecorder>(*dst_records_, *dst_store_, true);
    source_ = std::make_unique<MicroVmSource>(*src_records_, *src_registry_);
    // The destination as MicroVmSite leaves it when killed at destination:tagged: its hold
    // taken before the started record, the placeholder tagged, then the process gone.
    auto h = VmHolder::take(dst_->dir(), kVm, kMig);
    ASSERT_TRUE(h.ok()) << h.error().message;
    holder_ = std::move(*h);
    ASSERT_TRUE(recorder_->started(kMig, kVm, "vm").ok());
    ASSERT_TRUE(recorder_->completed(kMig, kVm).ok());
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  VmStatus status() {
    auto st = read_status(*dst_records_, *dst_store_, source_.get(), kMig);
    EXPECT_TRUE(st.ok());
    EXPECT_EQ(st->size(), 1u);
    return st->at(0);
  }
  // The source copy as a paused VM that never got DONE would report it (no process runs one
  // in a unit test; the integration test tests/integration/fault_tagged_test.cc has one).
  static VmStatus with_paused_source(VmStatus st) {
    st.source.state = SourceState::paused;
    return check_vm(st.migration_id, st.vm_uuid, st.destination, st.source);
  }

  std::string dir_;
  std::unique_ptr<SiteDb> dst_, src_;
  std::unique_ptr<SiteRecords> dst_records_, src_records_;
  std::unique_ptr<MicroVmRegistry> dst_store_, src_registry_;
  std::unique_ptr<MigrationRecorder> recorder_;
  std::unique_ptr<MicroVmSource> source_;
  VmHolder holder_;
};

TEST_F(ResumeSource, LiveDestinationHolderReadsAliveAndIsNeverFenced) {
  VmStatus st = status();
  EXPECT_EQ(st.destination.copy, CopyLiveness::alive) << st.destination.copy_detail;
  EXPECT_EQ(st.verdict, Verdict::migrated) << st.reason;
  RecoveryOutcome o = resume_source_vm(with_paused_source(st), *dst_records_, *dst_store_, *source_);
  EXPECT_NE(o.problem.find("--resume-source refused"), std::string::npos) << o.problem;
  EXPECT_TRUE(o.done.empty());
  auto p = dst_store_->find(kVm);
  ASSERT_TRUE(p.ok() && *p);
  EXPECT_TRUE((*p)->completed());
}

TEST_F(ResumeSource, HolderThatComesBackBeforeTheFenceStopsIt) {
  holder_.release();
  VmStatus st = with_paused_source(status());
  ASSERT_EQ(st.destination.copy, CopyLiveness::gone);
  ASSERT_EQ(st.verdict, Verdict::in_doubt) << st.reason;
  EXPECT_NE(st.reason.find("it may never have run"), std::string::npos) << st.reason;
  auto back = VmHolder::take(dst_->dir(), kVm, kMig);  // between status and fence
  ASSERT_TRUE(back.ok());
  RecoveryOutcome o = resume_source_vm(st, *dst_records_, *dst_store_, *source_);
  EXPECT_NE(o.problem.find("fencing"), std::string::npos) << o.problem;
  EXPECT_TRUE(o.done.empty()) << "nothing fenced, nothing resumed";
  auto aborted = dst_records_->has(RecordKind::aborted, kMig, kVm);
  ASSERT_TRUE(aborted.ok());
  EXPECT_FALSE(*aborted);
}

TEST_F(ResumeSource, FenceComesFirstAndStopsALateDestination) {
  holder_.release();
  VmStatus st = with_paused_source(status());
  ASSERT_EQ(resume_source_refusal(st), "");
  // The source site has no such VM registered: the resume fails, after the fence.
  RecoveryOutcome o = resume_source_vm(st, *dst_records_, *dst_store_, *source_);
  ASSERT_EQ(o.done.size(), 1u) << o.problem;
  EXPECT_NE(o.done[0].find("aborted recorded"), std::string::npos);
  EXPECT_NE(o.problem.find("source resumed failed"), std::string::npos) << o.problem;

  auto p = dst_store_->find(kVm);
  ASSERT_TRUE(p.ok());
  EXPECT_FALSE(*p) << "the tagged placeholder is gone";
  // A late destination of this migration can neither tag nor start it again.
  EXPECT_FALSE(recorder_->completed(kMig, kVm).ok());
  EXPECT_FALSE(recorder_->started(kMig, kVm, "vm").ok());
  // The records now read "not migrated": plain recover takes it from here.
  VmStatus after = with_paused_source(status());
  EXPECT_EQ(after.verdict, Verdict::not_migrated) << after.reason;
  EXPECT_TRUE(after.destination.aborted_after_completion);
  // Running it twice changes nothing: refused, the fence stays.
  RecoveryOutcome again = resume_source_vm(after, *dst_records_, *dst_store_, *source_);
  EXPECT_NE(again.problem.find("refused"), std::string::npos);
}

}  // namespace
}  // namespace kvmig::host
