// scripts/testbed: two hosts on one machine, each with its own namespaces, libvirtd and kvmig
// site; `down` leaves nothing running. Uses a testbed name of its own, so it can run next to
// other tests that bring up a testbed.
#include <signal.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "host/site_db.h"
#include "test_util.h"

namespace {

using Output = kvmig::test::ShellRun;
using kvmig::test::have_program;
Output run(const std::string& cmd) { return kvmig::test::run_shell(cmd); }
bool have(const char* prog) { return have_program(prog); }

int read_pid(const std::string& path) {
  std::ifstream f(path);
  int pid = 0;
  f >> pid;
  return pid;
}

class TestbedTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "the testbed needs root (namespaces, mounts, veth)";
    for (const char* prog : {"libvirtd", "virsh", "ip", "unshare", "nsenter"})
      if (!have(prog)) GTEST_SKIP() << prog << " is not installed";
    name_ = "kvmig-tbt" + std::to_string(::getpid());
    state_ = "/run/" + name_;
    env_ = "KVMIG=" KVMIG_BINARY " KVMIG_TESTBED_NAME=" + name_ + " " KVMIG_SOURCE_DIR "/scripts/testbed ";
  }
  void TearDown() override {
    if (!name_.empty() && std::filesystem::exists(state_)) (void)run(env_ + "down");
  }
  std::string name_, state_, env_;
};

TEST_F(TestbedTest, UpGivesTwoHostsWithTheirOwnLibvirtdAndSiteDownLeavesNothing) {
  Output up = run(env_ + "up 2");
  ASSERT_EQ(up.status, 0) << up.out;

  int pids[2];
  std::string netns[2];
  for (int i = 1; i <= 2; ++i) {
    std::string h = std::to_string(i);
    Output uri = run(env_ + "exec " + h + " virsh -c qemu:///system uri");
    EXPECT_EQ(uri.status, 0) << uri.out;
    EXPECT_NE(uri.out.find("qemu:///system"), std::string::npos) << uri.out;
    Output version = run(env_ + "exec " + h + " virsh -c qemu:///system version");
    EXPECT_EQ(version.status, 0) << version.out;
    EXPECT_NE(version.out.find("Running hypervisor"), std::string::npos) << version.out;

    pids[i - 1] = read_pid(state_ + "/h" + h + "/run/libvirt/libvirtd.pid");
    ASSERT_GT(pids[i - 1], 1) << "host " << h << " has no libvirtd pid file";
    EXPECT_EQ(std::filesystem::read_symlink("/proc/" + std::to_string(pids[i - 1]) + "/exe").filename(), "libvirtd");
    netns[i - 1] = std::filesystem::read_symlink("/proc/" + std::to_string(pids[i - 1]) + "/ns/net").string();
    Output own = run(env_ + "exec " + h + " readlink /proc/self/ns/net");
    EXPECT_EQ(own.out, netns[i - 1] + "\n") << "libvirtd of host " << h << " is not in its host's network namespace";

    // QEMU runs as root (scripts/testbed says why): libvirt's DAC label says so.
    Output caps = run(env_ + "exec " + h + " virsh -c qemu:///system capabilities");
    EXPECT_NE(caps.out.find("<baselabel type='kvm'>+0:+0</baselabel>"), std::string::npos) << caps.out;

    auto site = kvmig::host::SiteDb::open(state_ + "/h" + h + "/var/lib/kvmig/site", false);
    EXPECT_TRUE(site.ok()) << (site.ok() ? "" : site.error().message);
  }
  EXPECT_NE(pids[0], pids[1]);
  EXPECT_NE(netns[0], netns[1]);
  // The veth link: host 2 reaches host 1's address (a refused TCP connect is an answer).
  Output link = run(env_ + "exec 2 bash -c 'exec 3<>/dev/tcp/10.77.12.1/9' ");
  EXPECT_NE(link.out.find("refused"), std::string::npos) << link.out;
  // Each host's /etc/libvirt is its own: a file made in host 1 is not in host 2.
  ASSERT_EQ(run(env_ + "exec 1 touch /etc/libvirt/kvmig-testbed-mark").status, 0);
  EXPECT_NE(run(env_ + "exec 2 test -e /etc/libvirt/kvmig-testbed-mark").status, 0);
  EXPECT_FALSE(std::filesystem::exists("/etc/libvirt/kvmig-testbed-mark"));

  Output down = run(env_ + "down");
  ASSERT_EQ(down.status, 0) << down.out;
  for (int pid : pids) EXPECT_NE(::kill(pid, 0), 0) << "libvirtd " << pid << " still runs after down";
  EXPECT_FALSE(std::filesystem::exists(state_));
  Output ns = run("ip netns list");
  EXPECT_EQ(ns.out.find(name_), std::string::npos) << ns.out;
}

}  // namespace
