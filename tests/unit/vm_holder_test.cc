// VmHolder (host/vm_holder.h): a process's hold on a VM at a site outlives nothing: kill -9 of
// the holder makes the probe say gone, a stopped holder still reads alive, and a second live
// holder of the same UUID is refused.
#include "host/vm_holder.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>

#include "test_util.h"

namespace kvmig::host {
namespace {

const std::string kVm = "6f1e8a52-3333-4c2b-9d3e-0123456789ab";

class VmHolderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test::make_temp_dir("kvmig-holder");
    ASSERT_FALSE(dir_.empty());
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  // A child process that takes the hold, says so on a pipe and then waits to be killed.
  pid_t child_holder(const std::string& migration) {
    int p[2];
    EXPECT_EQ(::pipe(p), 0);
    pid_t pid = ::fork();
    if (pid == 0) {
      auto h = VmHolder::take(dir_, kVm, migration);
      char c = h.ok() ? 'y' : 'n';
      (void)!::write(p[1], &c, 1);
      for (;;) ::pause();
    }
    ::close(p[1]);
    char c = 0;
    EXPECT_EQ(::read(p[0], &c, 1), 1);
    ::close(p[0]);
    EXPECT_EQ(c, 'y');
    return pid;
  }
  std::string dir_;
};

TEST_F(VmHolderTest, NoHolderFileIsUnknownAndTheProbeCreatesNone) {
  HolderProbe p = probe_holder(dir_, kVm);
  EXPECT_EQ(p.state, HolderProbe::unknown);
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/holders/" + kVm));
}

TEST_F(VmHolderTest, KillNineOfTheHolderReadsGoneAndAStoppedOneAlive) {
  pid_t pid = child_holder("mig-1");
  HolderProbe alive = probe_holder(dir_, kVm);
  EXPECT_EQ(alive.state, HolderProbe::alive) << alive.detail;
  EXPECT_EQ(alive.migration_id, "mig-1");
  EXPECT_EQ(alive.pid, pid);
  auto second = VmHolder::take(dir_, kVm, "mig-2");
  ASSERT_FALSE(second.ok()) << "two live holders of one UUID at one site";
  EXPECT_NE(second.error().message.find("already runs"), std::string::npos) << second.error().message;
  EXPECT_FALSE(lock_if_gone(dir_, kVm).ok());

  ::kill(pid, SIGSTOP);  // a stopped destination may still run the VM later
  EXPECT_EQ(probe_holder(dir_, kVm).state, HolderProbe::alive);
  ::kill(pid, SIGKILL);
  ASSERT_EQ(::waitpid(pid, nullptr, 0), pid);
  HolderProbe gone = probe_holder(dir_, kVm);
  EXPECT_EQ(gone.state, HolderProbe::gone) << gone.detail;
  EXPECT_EQ(gone.migration_id, "mig-1") << "what the dead holder wrote is still read";

  // Gone: the VM may be taken again, and recovery may hold it while it fences.
  {
    auto fence = lock_if_gone(dir_, kVm);
    ASSERT_TRUE(fence.ok()) << fence.error().message;
    EXPECT_EQ(probe_holder(dir_, kVm).state, HolderProbe::alive) << "held while fencing";
  }
  auto again = VmHolder::take(dir_, kVm, "");
  ASSERT_TRUE(again.ok()) << again.error().message;
  EXPECT_EQ(probe_holder(dir_, kVm).migration_id, "");
  again->release();
  EXPECT_EQ(probe_holder(dir_, kVm).state, HolderProbe::gone);
}

// A UUID names a file under SITE/holders: anything else is refused before a file is touched.
TEST_F(VmHolderTest, ANameThatIsNotAUuidReachesNoFile) {
  for (const std::string bad : {"../escape", "6f1e8a52-3333-4c2b-9d3e-0123456789a/", "", "x"}) {
    auto h = VmHolder::take(dir_, bad, "m");
    ASSERT_FALSE(h.ok()) << bad;
    EXPECT_NE(h.error().message.find("not a UUID"), std::string::npos) << h.error().message;
    EXPECT_FALSE(lock_if_gone(dir_, bad).ok()) << bad;
    EXPECT_EQ(probe_holder(dir_, bad).state, HolderProbe::unknown) << bad;
  }
  EXPECT_FALSE(std::filesystem::exists(std::filesystem::path(dir_).parent_path() / "escape"));
  EXPECT_TRUE(VmHolder::take(dir_, kVm, "m").ok());
}

TEST_F(VmHolderTest, ControlSocketDeadOnlyWhenNobodyCanListen) {
  EXPECT_TRUE(control_socket_dead(dir_ + "/no-such.sock"));
  EXPECT_FALSE(control_socket_dead("")) << "no socket registered proves nothing";
}

}  // namespace
}  // namespace kvmig::host
