// Issue 5, item 7 for libvirt domains: a group of three domains moved together under one
// migration id between two real libvirtd (scripts/testbed), and a fault in each phase libvirt
// exposes. After each fault `kvmig status` must be right for every domain, and after
// `kvmig recover` every domain must run exactly once (asked of both libvirtds by UUID, and the
// guests must go on without a lost page). One test, one testbed, one boot of the group: each
// scenario starts where the previous one left the group (a group that moved leaves again from
// there), so the matrix costs little more than the moves themselves.
//
// Phases: a migration is held in pre-copy by a 1 MiB/s limit against guests that dirty memory
// as fast as they can (it cannot converge) and let through by raising the limit. "Destination
// started, before completion tagging" is reached by stopping the kvmig process (SIGSTOP) while
// libvirt finishes without it, then killing it.
//
// Source-side kill: the kvmig migrate process, because with peer-to-peer migration it is the
// only source-side process kvmig owns (libvirt's job runs inside the source libvirtd and goes
// on without it: that is what recovery must handle). Killing the source QEMU loses the VM's
// memory whatever anyone does: the last scenario does it and checks that status and recover
// say so and that nothing starts twice.
#include "tests/integration/libvirt_fault_harness.h"

namespace kvmig::test {
namespace {

class LibvirtFaultMatrix : public LibvirtFault {
 public:  // the test body takes their addresses
  void kill_qemus(int h) {
    for (const Dom& d : group_) {
      pid_t pid = tb_->qemu_pid(h, d.name);
      ASSERT_GT(pid, 0) << "no QEMU pid for " << d.name << " at host " << h;
      ::kill(pid, SIGKILL);
    }
  }
  void kill_qemu(int h, const Dom& d) {
    pid_t pid = tb_->qemu_pid(h, d.name);
    ASSERT_GT(pid, 0) << "no QEMU pid for " << d.name << " at host " << h;
    ::kill(pid, SIGKILL);
    ASSERT_TRUE(wait_until([&] { return !active_at(h, d); }, 20s)) << d.name << " still active at host " << h;
  }
  static void resume(const Child& m) { ::kill(m.pid, SIGCONT); }
  // Some domain of the group has a job at host h (libvirtd, restarted, recovers its own).
  bool any_job(int h) {
    LibvirtConn c = conn(h);
    for (const Dom& d : group_)
      if (auto dom = c.by_uuid(d.uuid); dom.ok() && *dom)
        if (auto job = job_stats(*dom, false); !job.ok() || job->job_type != VIR_DOMAIN_JOB_NONE) return true;
    return false;
  }
  void fill_tiny() { (void)run_shell("dd if=/dev/zero of=" + shared_ + "/tiny/fill bs=4k 2>/dev/null"); }
  void free_tiny() { fs::remove(shared_ + "/tiny/fill"); }
  void kill_libvirtd(int h) {
    pid_t pid = tb_->libvirtd_pid(h);
    ASSERT_GT(pid, 0) << "no libvirtd pid at host " << h;
    ::kill(pid, SIGKILL);
  }

  // Every domain's job of migration ID is in pre-copy (held there by the 1 MiB/s limit).
  ::testing::AssertionResult reached_precopy(const std::string& id) {
    if (wait_until([&] { return in_precopy(at_); }, 60s)) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << migrate_err(id) << jobs(at_);
  }

  // Stops kvmig M (SIGSTOP) and lets libvirt finish the moves without it. The caller kills M
  // whatever this returns, then asserts on it.
  ::testing::AssertionResult handed_over_without(const Child& m) {
    if (::kill(m.pid, SIGSTOP) != 0) return ::testing::AssertionFailure() << "cannot stop kvmig";
    set_speed(at_, 8192);
    if (wait_until([&] { return handed_over(at_, other(at_)); }, 60s)) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "libvirt did not finish the moves without kvmig";
  }

  // A recover that must succeed (exit 0).
  CliRun recover_ok(const std::string& id, const Sites& s) {
    CliRun r = recover(id, s);
    EXPECT_EQ(r.status, 0) << r.out << r.err;
    return r;
  }

  // The link between the hosts is down when the migration starts: QEMU cannot connect.
  void link_cut_before_precopy() {
    const std::string id = "lvf-link-before";
    int from = at_;
    ASSERT_TRUE(tb_->set_link(false));
    Child m = migrate(id);
    // Either libvirt gives up at once, or its job hangs connecting: recovery must cope with both.
    (void)m.wait(10s);
    expect_verdicts(id, sites(from), "not-migrated", 0);
    recover_ok(id, sites(from));
    ASSERT_TRUE(tb_->set_link(true));
    ASSERT_TRUE(m.wait(60s).has_value()) << "migrate-domain still runs after recovery";
    EXPECT_EQ(*m.status, 1) << migrate_err(id);
    expect_once_at(from);
  }

  // The destination site is full before the first record: nothing may move.
  void disk_full_before_records() {
    const std::string id = "lvf-full-before";
    int from = at_;
    fill_tiny();
    Child m = migrate(id, tiny_site_);
    ASSERT_TRUE(m.wait(60s).has_value());
    EXPECT_NE(*m.status, 0) << migrate_err(id);
    // While the site is full SQLite cannot even open it (no room for its shared-memory file):
    // every domain is in doubt, and recover does nothing.
    expect_verdicts(id, sites(from, tiny_site_), "in-doubt", 3);
    EXPECT_EQ(recover(id, sites(from, tiny_site_)).status, 3);
    free_tiny();
    expect_verdicts(id, sites(from, tiny_site_), "not-migrated", 0);
    recover_ok(id, sites(from, tiny_site_));
    expect_once_at(from);
  }

  void destination_qemu_killed_in_precopy() {
    const std::string id = "lvf-dqemu-pre";
    int from = at_, to = other(at_);
    Child m = migrate(id);
    ASSERT_TRUE(reached_precopy(id));
    kill_qemus(to);
    ASSERT_TRUE(m.wait(60s).has_value());
    EXPECT_EQ(*m.status, 1) << migrate_err(id);
    expect_verdicts(id, sites(from), "not-migrated", 0);
    recover_ok(id, sites(from));
    expect_once_at(from);
  }

  void destination_libvirtd_killed_in_precopy() {
    const std::string id = "lvf-dlibvirtd-pre";
    int from = at_, to = other(at_);
    Child m = migrate(id);
    ASSERT_TRUE(reached_precopy(id));
    ASSERT_NO_FATAL_FAILURE(kill_libvirtd(to));
    ASSERT_TRUE(m.wait(90s).has_value()) << "migrate-domain hangs without the destination's libvirtd";
    // Regression: kvmig died of SIGPIPE (exit 141) writing to the dead daemon's socket.
    EXPECT_EQ(*m.status, 1) << migrate_err(id);
    EXPECT_NE(migrate_err(id).find("fencing the destination failed"), std::string::npos) << migrate_err(id);
    // The destination's placeholders cannot be asked: in doubt, and recover touches nothing.
    expect_verdicts(id, sites(from), "in-doubt", 3);
    auto r = recover(id, sites(from));
    EXPECT_EQ(r.status, 3) << r.out << r.err;
    ASSERT_TRUE(tb_->start_libvirtd(to));
    expect_verdicts(id, sites(from), "not-migrated", 0);
    recover_ok(id, sites(from));
    expect_once_at(from);
  }

  void link_cut_in_precopy() {
    const std::string id = "lvf-link-pre";
    int from = at_;
    Child m = migrate(id);
    ASSERT_TRUE(reached_precopy(id));
    ASSERT_TRUE(tb_->set_link(false));
    expect_verdicts(id, sites(from), "not-migrated", 0);
    auto r = recover_ok(id, sites(from));
    EXPECT_NE(r.out.find("source migration job aborted"), std::string::npos) << r.out;
    ASSERT_TRUE(tb_->set_link(true));
    ASSERT_TRUE(m.wait(60s).has_value());
    EXPECT_EQ(*m.status, 1) << migrate_err(id);
    expect_once_at(from);
  }

  // libvirt's job goes on inside the source libvirtd: recovery aborts it.
  void kvmig_killed_in_precopy() {
    const std::string id = "lvf-kvmig-pre";
    int from = at_;
    Child m = migrate(id);
    ASSERT_TRUE(reached_precopy(id));
    m.kill9();
    expect_verdicts(id, sites(from), "not-migrated", 0);
    auto r = recover_ok(id, sites(from));
    EXPECT_NE(r.out.find("source migration job aborted"), std::string::npos) << r.out;
    expect_once_at(from);
  }

  // libvirt finished (source shut off, destination paused) but kvmig never tagged: handed over.
  void kvmig_killed_before_tagging() {
    const std::string id = "lvf-kvmig-tag";
    int from = at_, to = other(at_);
    Child m = migrate(id);
    ASSERT_TRUE(reached_precopy(id));
    auto over = handed_over_without(m);
    m.kill9();
    ASSERT_TRUE(over);
    expect_verdicts(id, sites(from), "in-doubt", 3);
    recover_ok(id, sites(from));
    expect_verdicts(id, sites(from), "migrated", 0);
    expect_once_at(to);
  }

  // Handed over, and the destination's libvirtd dies too: in doubt until it is back.
  void destination_libvirtd_killed_before_tagging() {
    const std::string id = "lvf-dlibvirtd-tag";
    int from = at_, to = other(at_);
    Child m = migrate(id);
    ASSERT_TRUE(reached_precopy(id));
    auto over = handed_over_without(m);
    ASSERT_NO_FATAL_FAILURE(kill_libvirtd(to));
    m.kill9();
    ASSERT_TRUE(over);
    expect_verdicts(id, sites(from), "in-doubt", 3);
    EXPECT_EQ(recover(id, sites(from)).status, 3);
    ASSERT_TRUE(tb_->start_libvirtd(to));
    expect_verdicts(id, sites(from), "in-doubt", 3);  // now: handed over
    recover_ok(id, sites(from));
    expect_verdicts(id, sites(from), "migrated", 0);
    expect_once_at(to);
  }

  // The completion tag is on the domains, the completion record cannot be written: the site
  // fills after libvirt finished (kvmig stopped meanwhile), when kvmig no longer watches it.
  void disk_full_before_completion_record() {
    const std::string id = "lvf-full-tag";
    int from = at_, to = other(at_);
    free_tiny();
    Child m = migrate(id, tiny_site_);
    ASSERT_TRUE(reached_precopy(id));
    auto over = handed_over_without(m);
    fill_tiny();
    resume(m);
    ASSERT_TRUE(over);
    ASSERT_TRUE(m.wait(60s).has_value());
    EXPECT_EQ(*m.status, 1) << migrate_err(id);
    expect_verdicts(id, sites(from, tiny_site_), "migrated", 0);
    recover_ok(id, sites(from, tiny_site_));
    free_tiny();
    expect_once_at(to);
  }

  // The destination site fills while libvirt copies: kvmig watches it (as the micro-VM session
  // does each round) and aborts libvirt's jobs while the sources still run, rather than letting
  // the domains arrive where their completion cannot be recorded.
  void disk_full_in_precopy() {
    const std::string id = "lvf-full-pre";
    int from = at_;
    free_tiny();
    Child m = migrate(id, tiny_site_);
    ASSERT_TRUE(reached_precopy(id));
    fill_tiny();
    ASSERT_TRUE(m.wait(30s).has_value()) << "migrate-domain did not give up on a full destination site";
    EXPECT_EQ(*m.status, 1) << migrate_err(id);
    EXPECT_NE(migrate_err(id).find("libvirt's migration aborted"), std::string::npos) << migrate_err(id);
    // Started, placeholder gone (the fence's undefine needs no room): not migrated.
    expect_verdicts(id, sites(from, tiny_site_), "not-migrated", 0);
    free_tiny();  // the operator makes room, then recovers (the fence's record needs it)
    recover_ok(id, sites(from, tiny_site_));
    expect_once_at(from);
  }

  // The source libvirtd dies in pre-copy. The destination's libvirtd ends the incoming domains
  // when the peer connection drops; the source QEMUs run on without their daemon. Until it is
  // back the sources' state is unknown: the verdict is the destination's (not migrated) and
  // recover fences but resumes nothing (exit 3). Restarted, libvirtd cancels the
  // interrupted outgoing migrations itself, and recover finds nothing left to do.
  void source_libvirtd_killed_in_precopy() {
    const std::string id = "lvf-slibvirtd-pre";
    int from = at_, to = other(at_);
    Child m = migrate(id);
    ASSERT_TRUE(reached_precopy(id));
    ASSERT_NO_FATAL_FAILURE(kill_libvirtd(from));
    ASSERT_TRUE(m.wait(60s).has_value()) << "migrate-domain hangs without the source's libvirtd";
    EXPECT_EQ(*m.status, 1) << migrate_err(id);
    for (const Dom& d : group_)
      ASSERT_TRUE(wait_until([&] { return !active_at(to, d); }, 30s)) << d.name << ": incoming domain still active";
    expect_verdicts(id, sites(from), "not-migrated", 0);
    int rc = -1;
    for (auto& [uuid, problem] : recover_problems(id, sites(from), &rc))
      EXPECT_NE(problem.find("unknown"), std::string::npos) << uuid << ": " << last_status_;
    EXPECT_EQ(rc, 3) << last_status_;
    ASSERT_TRUE(tb_->start_libvirtd(from));
    ASSERT_TRUE(wait_until([&] { return !any_job(from); }, 30s)) << jobs(from);
    expect_verdicts(id, sites(from), "not-migrated", 0);
    recover_ok(id, sites(from));
    expect_once_at(from);
  }

  // libvirt finished (kvmig stopped), then the link goes down, then kvmig goes on. After
  // libvirt's Confirm nothing kvmig needs crosses the hosts' link (its libvirt connections are
  // its own management path; here unix sockets): it tags, resumes, releases as usual.
  void link_cut_after_handover() {
    const std::string id = "lvf-link-over";
    int from = at_, to = other(at_);
    Child m = migrate(id);
    ASSERT_TRUE(reached_precopy(id));
    auto over = handed_over_without(m);
    bool cut = tb_->set_link(false);
    resume(m);
    ASSERT_TRUE(over);
    ASSERT_TRUE(cut);
    ASSERT_TRUE(m.wait(60s).has_value());
    EXPECT_EQ(*m.status, 0) << migrate_err(id);
    expect_verdicts(id, sites(from), "migrated", 0);
    auto r = recover_ok(id, sites(from));
    ASSERT_TRUE(tb_->set_link(true));
    expect_once_at(to);
  }

  // libvirt finished, then the source libvirtd dies (and kvmig with it, stopped before its
  // tag). The destinations' paused, untagged domains are the only copies, but without the
  // source's daemon nobody can confirm the sources were shut off by the migration: in doubt,
  // nothing done. Restarted: handed over, and recover completes at the destination.
  void source_libvirtd_killed_after_handover() {
    const std::string id = "lvf-slibvirtd-over";
    int from = at_, to = other(at_);
    Child m = migrate(id);
    ASSERT_TRUE(reached_precopy(id));
    auto over = handed_over_without(m);
    ASSERT_NO_FATAL_FAILURE(kill_libvirtd(from));
    m.kill9();
    ASSERT_TRUE(over);
    expect_verdicts(id, sites(from), "in-doubt", 3);
    EXPECT_EQ(recover(id, sites(from)).status, 3);
    for (const Dom& d : group_) EXPECT_TRUE(active_at(to, d)) << d.name << ": the only copy was touched";
    ASSERT_TRUE(tb_->start_libvirtd(from));
    expect_verdicts(id, sites(from), "in-doubt", 3);  // now: handed over
    // Which evidence showed the hand-over (the restarted daemon may forget why it shut off).
    auto j = nlohmann::json::parse(last_status_.substr(0, last_status_.find('\n')), nullptr, false);
    if (!j.is_discarded())
      for (const auto& vm : j["vms"]) {
        EXPECT_TRUE(vm["libvirt"]["handed_over"].get<bool>()) << vm.dump();
        std::fprintf(stderr, "[ evidence ] %s\n", vm["libvirt"].dump().c_str());
      }
    recover_ok(id, sites(from));
    expect_verdicts(id, sites(from), "migrated", 0);
    expect_once_at(to);
  }

  void guests_intact() {
    for (const Dom& d : group_) {
      auto report = kvmig::testing::guest_report(d.console);
      EXPECT_TRUE(report.corrupt.empty()) << d.name;
      EXPECT_TRUE(report.errors.empty()) << d.name;
      ASSERT_FALSE(report.passes.empty());
      EXPECT_EQ(report.passes.back().errors, 0u) << d.name;
    }
  }

  // The VM's memory is lost with its QEMU: recover must say so and start nothing twice. One
  // domain of the group dies; the others' moves go on and complete.
  void source_qemu_killed_in_precopy() {
    const std::string id = "lvf-sqemu-pre";
    int from = at_, to = other(at_);
    Child m = migrate(id);
    ASSERT_TRUE(reached_precopy(id));
    const Dom lost = group_.back();
    ASSERT_NO_FATAL_FAILURE(kill_qemu(from, lost));
    set_speed(from, 8192);
    ASSERT_TRUE(m.wait(60s).has_value());
    EXPECT_EQ(*m.status, 1) << migrate_err(id);
    auto v = status(id, sites(from));
    for (const Dom& d : group_) EXPECT_EQ(v[d.uuid], d.uuid == lost.uuid ? "not-migrated" : "migrated") << d.name;
    int rc = -1;
    auto problems = recover_problems(id, sites(from), &rc);
    EXPECT_EQ(rc, 3) << last_status_;
    for (const Dom& d : group_)
      EXPECT_EQ(problems[d.uuid].find("runs nowhere") != std::string::npos, d.uuid == lost.uuid)
          << d.name << ": " << problems[d.uuid];
    EXPECT_FALSE(active_at(from, lost)) << "started again";
    EXPECT_TRUE(defined_at(from, lost));
    EXPECT_FALSE(defined_at(to, lost)) << "the destination's placeholder is left";
    group_.pop_back();  // lost: the rest of the matrix goes on with the others
    expect_once_at(to);
  }

  // The window the micro-VM checker misses has a libvirt twin: the destination QEMU dies after
  // libvirt finished but before kvmig's tag (`lost_early`), and after kvmig's completion, once
  // the domain runs there (`lost_late`). In libvirt's path the source QEMU is stopped by
  // libvirt's Confirm before kvmig can tag, so no source copy can be destroyed by mistake:
  // kvmig refuses to tag a domain that no longer runs (not migrated, runs nowhere), and a
  // migrated domain that no longer runs is reported, never "recovered" by touching a source.
  void destination_qemu_killed_after_handover() {
    ASSERT_EQ(group_.size(), 2u);
    const std::string id = "lvf-dqemu-over";
    int from = at_, to = other(at_);
    const Dom lost_early = group_[0], lost_late = group_[1];
    Child m = migrate(id);
    ASSERT_TRUE(reached_precopy(id));
    auto over = handed_over_without(m);
    if (over) kill_qemu(to, lost_early);
    resume(m);
    ASSERT_TRUE(over);
    ASSERT_TRUE(m.wait(60s).has_value());
    EXPECT_EQ(*m.status, 1) << migrate_err(id);
    EXPECT_NE(migrate_err(id).find("not tagged"), std::string::npos) << migrate_err(id);
    ASSERT_TRUE(passes_grow(lost_late, 20s)) << lost_late.name << " does not run at host " << to;
    ASSERT_NO_FATAL_FAILURE(kill_qemu(to, lost_late));
    auto v = status(id, sites(from));
    EXPECT_EQ(v[lost_early.uuid], "not-migrated") << last_status_;
    EXPECT_EQ(v[lost_late.uuid], "migrated") << last_status_;
    int rc = -1;
    auto problems = recover_problems(id, sites(from), &rc);
    EXPECT_EQ(rc, 3) << last_status_;
    for (const Dom& d : group_)
      EXPECT_NE(problems[d.uuid].find("runs nowhere"), std::string::npos) << d.name << ": " << last_status_;
    // Defined once each, running nowhere: the early one where it came from (the fence removed
    // the untagged arrival), the late one where it arrived (the source's leftover undefined).
    EXPECT_TRUE(defined_at(from, lost_early) && !defined_at(to, lost_early));
    EXPECT_TRUE(defined_at(to, lost_late) && !defined_at(from, lost_late));
    for (const Dom& d : group_) EXPECT_FALSE(active_at(from, d) || active_at(to, d)) << d.name << " started again";
  }
};

TEST_F(LibvirtFaultMatrix, GroupOfThreeRunsExactlyOnceAfterEveryFaultAndRecover) {
  ASSERT_TRUE(boot_group());
  struct Step {
    const char* name;
    void (LibvirtFaultMatrix::*run)();
  };
  const Step steps[] = {
      {"link cut before pre-copy", &LibvirtFaultMatrix::link_cut_before_precopy},
      {"destination disk full before the records", &LibvirtFaultMatrix::disk_full_before_records},
      {"kill -9 destination QEMU in pre-copy", &LibvirtFaultMatrix::destination_qemu_killed_in_precopy},
      {"kill -9 destination libvirtd in pre-copy", &LibvirtFaultMatrix::destination_libvirtd_killed_in_precopy},
      {"link cut in pre-copy", &LibvirtFaultMatrix::link_cut_in_precopy},
      {"kill -9 kvmig in pre-copy", &LibvirtFaultMatrix::kvmig_killed_in_precopy},
      {"destination disk full in pre-copy", &LibvirtFaultMatrix::disk_full_in_precopy},
      {"kill -9 source libvirtd in pre-copy", &LibvirtFaultMatrix::source_libvirtd_killed_in_precopy},
      {"kill -9 kvmig after libvirt finished, before tagging", &LibvirtFaultMatrix::kvmig_killed_before_tagging},
      {"destination disk full before the completion record", &LibvirtFaultMatrix::disk_full_before_completion_record},
      {"kill -9 destination libvirtd after libvirt finished, before tagging",
       &LibvirtFaultMatrix::destination_libvirtd_killed_before_tagging},
      {"link cut after libvirt finished, before tagging", &LibvirtFaultMatrix::link_cut_after_handover},
      {"kill -9 source libvirtd after libvirt finished, before tagging",
       &LibvirtFaultMatrix::source_libvirtd_killed_after_handover},
      {"no guest lost or tore a page through all of the above", &LibvirtFaultMatrix::guests_intact},
      {"kill -9 source QEMU (one domain) in pre-copy", &LibvirtFaultMatrix::source_qemu_killed_in_precopy},
      {"kill -9 destination QEMU after libvirt finished: before the tag (one domain), after (another)",
       &LibvirtFaultMatrix::destination_qemu_killed_after_handover},
  };
  for (const Step& s : steps) {
    SCOPED_TRACE(s.name);
    auto t0 = std::chrono::steady_clock::now();
    (this->*s.run)();
    std::fprintf(stderr, "[ scenario ] %s: %lld ms\n", s.name,
                 (long long)std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count());
    if (HasFatalFailure()) return;
  }
}

// Bad input to the libvirt forms of status, recover and migrate-domain: one line on stderr,
// exit 125, before any libvirtd is asked; an unreadable destination site is "in doubt" per
// named domain, never "not migrated".
TEST(LibvirtRecoveryCli, RefusesIncompleteOptionsAndCallsAnUnreadableSiteInDoubt) {
  std::string dir = make_temp_dir("kvmig-lvcli");
  ASSERT_FALSE(dir.empty());
  ASSERT_EQ(run_kvmig("site init " + dir + "/src").status, 0);
  const std::string src = " --source-site " + dir + "/src";
  const std::string nowhere = "'qemu+unix:///system?socket=" + dir + "/none'";
  for (const std::string& bad :
       {"status --site " + dir + "/src" + src + " --source-libvirt " + nowhere,  // no --migration
        "recover --site " + dir + "/src" + src + " --migration m1 --libvirt " + nowhere,  // no --source-libvirt
        "recover --site " + dir + "/src" + src + " --migration 'bad id' --libvirt a --source-libvirt b",
        "migrate-domain a a --from x --to y --site " + dir + "/src --dest-site " + dir + "/src"}) {
    CliRun r = run_kvmig(bad);
    EXPECT_EQ(r.status, 125) << bad << ": " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  CliRun r = run_kvmig("status --json --site " + dir + "/missing" + src + " --migration m1 --libvirt " + nowhere +
                       " --source-libvirt " + nowhere + " --vm 5e0a7c1d-2b3f-4a6e-8d9c-0f1e2d3c4b61");
  EXPECT_EQ(r.status, 3) << r.err;
  auto j = nlohmann::json::parse(r.out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << r.out << r.err;
  ASSERT_EQ(j["vms"].size(), 1u) << r.out;
  EXPECT_EQ(j["vms"][0]["verdict"], "in-doubt") << r.out;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace kvmig::test
