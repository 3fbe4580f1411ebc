// libvirt domains moved by kvmig between two real libvirtd (scripts/testbed, two hosts in
// their own namespaces): the test guest runs under QEMU (TCG) as a libvirt domain on host 1,
// `kvmig migrate-domain` moves it peer to peer to host 2 (control over host 2's libvirt socket,
// memory over the veth link), and both sites, the placeholder, the hook's records and
// `kvmig status` must say so. The hook is also fed XML on stdin directly, good and bad.
#include <signal.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>

#include "host/domain_xml.h"
#include "host/libvirt_conn.h"
#include "host/libvirt_hook.h"
#include "host/libvirt_placeholder.h"
#include "host/site_db.h"
#include "host/site_records.h"
#include "libvirt_testbed.h"
#include "test_util.h"

namespace {

using namespace kvmig::host;
namespace fs = std::filesystem;

using Output = kvmig::test::ShellRun;
using kvmig::test::have_program;
Output run(const std::string& cmd) { return kvmig::test::run_shell(cmd); }
bool have(const char* prog) { return have_program(prog); }

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

int count(const std::string& text, const std::string& what) {
  int n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

// The test guest as a libvirt domain: TCG (no 7 s of emulated firmware on kvm-pvm, and the
// same on hardware KVM), direct kernel boot, its port 0xe9 console appended to a file that
// both hosts see, so the lines the destination's QEMU writes follow the source's.
std::string guest_domain_xml(const std::string& name, const std::string& uuid, const std::string& kernel,
                             const std::string& console) {
  return kvmig::test::guest_domain_xml(name, uuid, kernel, console, "ws=8M rate=8 report_ms=100", 128, false);
}

// One testbed for the suite: bringing it up and probing QEMU's capabilities is the slow part.
class LibvirtTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (::geteuid() != 0) return skip("the testbed needs root (namespaces, mounts, veth)");
    for (const char* prog : {"libvirtd", "virsh", "ip", "unshare", "nsenter", "qemu-system-x86_64"})
      if (!have(prog)) return skip(std::string(prog) + " is not installed");
    name_ = "kvmig-lvt" + std::to_string(::getpid());
    state_ = "/run/" + name_;
    env_ = "KVMIG=" KVMIG_BINARY " KVMIG_TESTBED_NAME=" + name_ + " " KVMIG_SOURCE_DIR "/scripts/testbed ";
    Output up = run(env_ + "up 2");
    if (up.status != 0) return skip("libvirtd cannot start in the testbed: " + up.out);
    // The hook at both hosts; libvirtd reads hooks when it starts, so restart it (by its pid).
    // (QEMU runs as root in testbed hosts: scripts/testbed says why.)
    for (int h : {1, 2}) {
      std::string hd = host_dir(h);
      Output inst = run(std::string(KVMIG_BINARY) + " hook install --dir " + hd + "/etc/libvirt/hooks");
      if (inst.status != 0) return fail_setup("hook install: " + inst.out);
      std::ifstream pidf(hd + "/run/libvirt/libvirtd.pid");
      pid_t pid = 0;
      pidf >> pid;
      if (pid <= 1 || fs::read_symlink("/proc/" + std::to_string(pid) + "/exe").filename() != "libvirtd")
        return fail_setup("host " + std::to_string(h) + ": no libvirtd pid");
      ::kill(pid, SIGTERM);
      for (int i = 0; i < 100 && ::kill(pid, 0) == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
      Output again = run(env_ + "exec " + std::to_string(h) +
                         " libvirtd --daemon --pid-file /run/libvirt/libvirtd.pid --config /etc/libvirt/libvirtd.conf");
      if (again.status != 0) return fail_setup("restarting libvirtd: " + again.out);
    }
    for (int h : {1, 2}) {
      bool up_again = false;
      for (int i = 0; i < 100 && !up_again; ++i) {
        up_again = run(env_ + "exec " + std::to_string(h) + " virsh -c qemu:///system uri").status == 0;
        if (!up_again) std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
      if (!up_again) return fail_setup("libvirtd of host " + std::to_string(h) + " does not answer after restart");
    }
    // Kernel and console outside the hosts' private mounts: the same path on both hosts.
    shared_ = "/var/tmp/" + name_;
    fs::create_directories(shared_);
    fs::permissions(shared_, fs::perms(0755));
    fs::copy_file(KVMIG_GUEST, shared_ + "/guest.elf", fs::copy_options::overwrite_existing);
    fs::permissions(shared_ + "/guest.elf", fs::perms(0644));
  }
  static void TearDownTestSuite() {
    if (!name_.empty() && fs::exists(state_)) (void)run(env_ + "down");
    if (!shared_.empty()) fs::remove_all(shared_);
  }
  static void skip(const std::string& why) { skip_ = why; }
  static void fail_setup(const std::string& why) { setup_error_ = why; }
  void SetUp() override {
    if (!skip_.empty()) GTEST_SKIP() << skip_;
    ASSERT_TRUE(setup_error_.empty()) << setup_error_;
  }

  static std::string host_dir(int h) { return state_ + "/h" + std::to_string(h); }
  static std::string uri(int h) { return "qemu+unix:///system?socket=" + host_dir(h) + "/run/libvirt/libvirt-sock"; }
  static std::string site(int h) { return host_dir(h) + "/var/lib/kvmig/site"; }

  // Defines and starts the guest at host 1; returns its console file.
  std::string start_guest(const LibvirtConn& conn, const std::string& name, const std::string& uuid) {
    std::string console = shared_ + "/" + name + ".console";
    std::ofstream(console).close();
    fs::permissions(console, fs::perms(0666));  // whichever user libvirt runs QEMU as
    auto dom = conn.define(guest_domain_xml(name, uuid, shared_ + "/guest.elf", console));
    EXPECT_TRUE(dom.ok()) << dom.error().message;
    if (!dom.ok()) return console;
    EXPECT_EQ(virDomainCreate(dom->get()), 0) << libvirt_error("virDomainCreate").message;
    return console;
  }

  static bool wait_for(const std::function<bool()>& cond, int seconds) {
    for (int i = 0; i < seconds * 10; ++i) {
      if (cond()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return cond();
  }

  static inline std::string name_, state_, env_, shared_, skip_, setup_error_;
};

TEST_F(LibvirtTest, MigrateDomainRecordsBothSitesTagsThePlaceholderAndStatusSaysMigrated) {
  auto h1 = LibvirtConn::open(uri(1));
  ASSERT_TRUE(h1.ok()) << h1.error().message;
  auto h2 = LibvirtConn::open(uri(2));
  ASSERT_TRUE(h2.ok()) << h2.error().message;
  const std::string uuid = "6b1c4a8e-3f5d-4e2a-9c7b-1d2e3f4a5b61";
  std::string console = start_guest(*h1, "lvt-guest", uuid);
  ASSERT_TRUE(wait_for([&] { return count(slurp(console), "kvmig-guest: pass") >= 2; }, 60)) << slurp(console);

  Output moved = run(std::string(KVMIG_BINARY) + " migrate-domain lvt-guest --from '" + uri(1) + "' --to '" + uri(2) +
                     "' --site " + site(1) + " --dest-site " + site(2) +
                     " --migrate-uri tcp://10.77.12.2 --migration lvt-1");
  ASSERT_EQ(moved.status, 0) << moved.out;
  EXPECT_NE(moved.out.find("migrated lvt-guest (" + uuid + "), migration lvt-1"), std::string::npos) << moved.out;
  EXPECT_NE(moved.out.find("Job type:         Completed"), std::string::npos) << moved.out;
  EXPECT_NE(moved.out.find("Memory total:"), std::string::npos) << moved.out;
  EXPECT_NE(moved.out.find("Total downtime:"), std::string::npos) << moved.out;

  // The domain runs at host 2 only; host 1 no longer knows it.
  auto there = h2->by_uuid(uuid);
  ASSERT_TRUE(there.ok() && *there) << "no domain " << uuid << " at host 2";
  EXPECT_EQ(*there->state(), VIR_DOMAIN_RUNNING);
  auto here = h1->by_uuid(uuid);
  ASSERT_TRUE(here.ok());
  EXPECT_FALSE(*here) << "the source still defines the domain";
  // ... and the guest goes on, without a lost page, written by host 2's QEMU now.
  int passes = count(slurp(console), "kvmig-guest: pass");
  EXPECT_TRUE(wait_for([&] { return count(slurp(console), "kvmig-guest: pass") >= passes + 2; }, 30)) << slurp(console);
  EXPECT_EQ(count(slurp(console), "errors=0"), count(slurp(console), "kvmig-guest: pass")) << slurp(console);

  // Destination records, in order; the source's release.
  auto dst_db = SiteDb::open(site(2), false);
  ASSERT_TRUE(dst_db.ok()) << dst_db.error().message;
  SiteRecords dst(**dst_db);
  auto recs = dst.for_migration("lvt-1");
  ASSERT_TRUE(recs.ok()) << recs.error().message;
  ASSERT_EQ(recs->size(), 3u);
  EXPECT_EQ((*recs)[0].kind, RecordKind::migration_started);
  EXPECT_EQ((*recs)[1].kind, RecordKind::placeholder_created);
  EXPECT_EQ((*recs)[1].detail, "libvirt");
  EXPECT_EQ((*recs)[2].kind, RecordKind::migration_completed);
  for (const Record& r : *recs) EXPECT_EQ(r.vm_uuid, uuid);
  auto src_db = SiteDb::open(site(1), false);
  ASSERT_TRUE(src_db.ok());
  SiteRecords src(**src_db);
  auto released = src.has(RecordKind::source_released, "lvt-1", uuid);
  ASSERT_TRUE(released.ok());
  EXPECT_TRUE(*released);

  // The placeholder is the arrived domain: same UUID, kvmig's mark with the completed event,
  // in the live and the persistent definition.
  LibvirtPlaceholders store(*h2);
  auto p = store.find(uuid);
  ASSERT_TRUE(p.ok()) << p.error().message;
  ASSERT_TRUE(p->has_value());
  EXPECT_EQ((*p)->migration_id, "lvt-1");
  EXPECT_TRUE((*p)->completed());
  EXPECT_GE((*p)->completed_ms, (*p)->created_ms);
  auto persistent = there->xml(VIR_DOMAIN_XML_INACTIVE);
  ASSERT_TRUE(persistent.ok());
  auto d = read_domain_xml(*persistent);
  ASSERT_TRUE(d.ok()) << d.error().message;
  ASSERT_TRUE(d->mark.has_value()) << *persistent;
  EXPECT_TRUE(d->mark->has("completed"));
  EXPECT_EQ(count(*persistent, kKvmigXmlns), 1) << "one kvmig element only";

  // The hook, run by host 2's libvirtd during the incoming migration, recorded its steps.
  auto events = hook_events(**dst_db, "lvt-1");
  ASSERT_TRUE(events.ok()) << events.error().message;
  std::string ops;
  for (const HookEvent& e : *events) ops += e.op + "/" + e.subop + " ";
  EXPECT_NE(ops.find("migrate/begin"), std::string::npos) << ops;
  EXPECT_NE(ops.find("prepare/begin"), std::string::npos) << ops;
  EXPECT_NE(ops.find("started/begin"), std::string::npos) << ops;

  // `kvmig status`, asking host 2's site and its libvirtd.
  Output status = run(std::string(KVMIG_BINARY) + " status --json --site " + site(2) + " --libvirt '" + uri(2) +
                      "' --migration lvt-1");
  ASSERT_EQ(status.status, 0) << status.out;
  auto j = nlohmann::json::parse(status.out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << status.out;
  ASSERT_EQ(j["vms"].size(), 1u) << status.out;
  EXPECT_EQ(j["vms"][0]["verdict"], "migrated") << status.out;
  // Without the libvirtd, the site alone cannot find the placeholder: not "migrated".
  Output blind = run(std::string(KVMIG_BINARY) + " status --site " + site(2) + " --migration lvt-1");
  EXPECT_EQ(blind.out.find(" migrated "), std::string::npos) << blind.out;

  EXPECT_EQ(virDomainDestroy(there->get()), 0);
}

TEST_F(LibvirtTest, PlaceholderIsAnInactiveMarkedDomainThatRecoveryCanRemoveUntilTagged) {
  auto h2 = LibvirtConn::open(uri(2));
  ASSERT_TRUE(h2.ok()) << h2.error().message;
  const std::string uuid = "6b1c4a8e-3f5d-4e2a-9c7b-1d2e3f4a5b62";
  LibvirtPlaceholders store(*h2);
  std::string xml = guest_domain_xml("lvt-ph", uuid, shared_ + "/guest.elf", shared_ + "/ph.console");
  EXPECT_FALSE(store.create(uuid, "lvt-ph", "ph-1").ok()) << "no source XML given yet";
  EXPECT_FALSE(store.set_definition("6b1c4a8e-3f5d-4e2a-9c7b-1d2e3f4a5b63", xml).ok()) << "XML of another UUID";
  ASSERT_TRUE(store.set_definition(uuid, xml).ok());
  auto made = store.create(uuid, "lvt-ph", "ph-1");
  ASSERT_TRUE(made.ok()) << made.error().message;
  EXPECT_TRUE(store.create(uuid, "lvt-ph", "ph-1").ok()) << "repeating create for the same migration";
  EXPECT_FALSE(store.create(uuid, "lvt-ph", "ph-2").ok()) << "a second migration must not share the UUID";

  auto dom = h2->by_uuid(uuid);
  ASSERT_TRUE(dom.ok() && *dom);
  EXPECT_FALSE(*dom->active());
  EXPECT_EQ(dom->name(), "lvt-ph");
  auto p = store.find(uuid);
  ASSERT_TRUE(p.ok() && p->has_value());
  EXPECT_EQ((*p)->state, VmEntryState::placeholder);
  EXPECT_EQ((*p)->migration_id, "ph-1");
  auto all = store.list();
  ASSERT_TRUE(all.ok()) << all.error().message;
  bool listed = false;
  for (const Placeholder& q : *all) listed |= q.uuid == uuid;
  EXPECT_TRUE(listed);

  EXPECT_FALSE(store.mark_completed(uuid, "ph-2").ok()) << "tagging another migration's placeholder";
  auto removed = store.remove(uuid, "ph-2");
  ASSERT_TRUE(removed.ok());
  EXPECT_FALSE(*removed) << "removing another migration's placeholder";
  removed = store.remove(uuid, "ph-1");
  ASSERT_TRUE(removed.ok()) << removed.error().message;
  EXPECT_TRUE(*removed);
  EXPECT_FALSE(*h2->by_uuid(uuid)) << "the placeholder domain is still defined";
  EXPECT_FALSE(store.mark_completed(uuid, "ph-1").ok()) << "a removed placeholder must stop a late completion";

  // Tagged: never removed.
  ASSERT_TRUE(store.create(uuid, "lvt-ph", "ph-3").ok());
  ASSERT_TRUE(store.mark_completed(uuid, "ph-3").ok());
  EXPECT_TRUE(store.mark_completed(uuid, "ph-3").ok()) << "repeating the tag";
  p = store.find(uuid);
  ASSERT_TRUE(p.ok() && p->has_value());
  EXPECT_TRUE((*p)->completed());
  EXPECT_FALSE(store.remove(uuid, "ph-3").ok());
  auto left = h2->by_uuid(uuid);
  ASSERT_TRUE(left.ok() && *left);
  EXPECT_EQ(virDomainUndefine(left->get()), 0);
}

// The hook as libvirt runs it, fed by hand: a marked domain is recorded, an unmarked one is
// not, bad XML or arguments give one line on stderr, a non-zero exit and nothing written.
TEST_F(LibvirtTest, HookRecordsMarkedDomainsAndRefusesBadInputWithoutWriting) {
  std::string dir = shared_ + "/hook-site";
  ASSERT_EQ(run(std::string(KVMIG_BINARY) + " site init " + dir).status, 0);
  const std::string uuid = "6b1c4a8e-3f5d-4e2a-9c7b-1d2e3f4a5b64";
  std::string plain = guest_domain_xml("lvt-hook", uuid, "/k", "/c");
  auto marked = with_mark(plain, KvmigMark{"hook-1", {{"placeholder", 5}}});
  ASSERT_TRUE(marked.ok()) << marked.error().message;
  std::ofstream(shared_ + "/marked.xml") << *marked;
  std::ofstream(shared_ + "/plain.xml") << plain;
  std::ofstream(shared_ + "/bad.xml") << "<domain><name>lvt-hook</name><uuid>" + uuid + "</uuid>";
  std::ofstream(shared_ + "/baduuid.xml") << "<domain><name>lvt-hook</name><uuid>not-a-uuid</uuid></domain>";
  std::string hook = std::string(KVMIG_BINARY) + " hook qemu --site " + dir + " -- ";

  // The installed script runs the same command.
  Output inst = run(std::string(KVMIG_BINARY) + " hook install --dir " + shared_ + "/hooks --site " + dir);
  ASSERT_EQ(inst.status, 0) << inst.out;
  std::string script = shared_ + "/hooks/qemu.d/kvmig";
  EXPECT_NE(fs::status(script).permissions() & fs::perms::owner_exec, fs::perms::none);
  Output via_script = run(script + " lvt-hook prepare begin - <" + shared_ + "/marked.xml");
  EXPECT_EQ(via_script.status, 0) << via_script.out;
  EXPECT_EQ(via_script.out, "") << "the hook must print nothing (libvirt reads a migrate hook's stdout as XML)";
  Output mig = run(hook + "lvt-hook migrate begin - <" + shared_ + "/marked.xml");
  EXPECT_EQ(mig.status, 0) << mig.out;
  EXPECT_EQ(run(hook + "lvt-hook start begin - <" + shared_ + "/marked.xml").status, 0);  // not recorded
  EXPECT_EQ(run(hook + "lvt-hook stopped end - <" + shared_ + "/plain.xml").status, 0);   // not kvmig's

  for (const std::string& bad : {hook + "lvt-hook started begin - <" + shared_ + "/bad.xml",
                                 hook + "lvt-hook started begin - <" + shared_ + "/baduuid.xml",
                                 hook + "lvt-hook started begin - </dev/null",
                                 hook + "other-name started begin - <" + shared_ + "/marked.xml",
                                 hook + "lvt-hook explode begin - <" + shared_ + "/marked.xml",
                                 hook + "lvt-hook started <" + shared_ + "/marked.xml"}) {
    Output o = run(bad);
    EXPECT_NE(o.status, 0) << bad;
    EXPECT_EQ(count(o.out, "\n"), 1) << "one line: " << o.out;
    EXPECT_EQ(o.out.rfind("kvmig: hook: ", 0), 0u) << o.out;
  }

  auto db = SiteDb::open(dir, false);
  ASSERT_TRUE(db.ok());
  auto events = hook_events(**db, "");
  ASSERT_TRUE(events.ok()) << events.error().message;
  ASSERT_EQ(events->size(), 2u);
  EXPECT_EQ((*events)[0].op, "prepare");
  EXPECT_EQ((*events)[1].op, "migrate");
  for (const HookEvent& e : *events) {
    EXPECT_EQ(e.migration_id, "hook-1");
    EXPECT_EQ(e.vm_uuid, uuid);
    EXPECT_EQ(e.domain, "lvt-hook");
  }

  // Once `kvmig recover` fenced this migration here (aborted recorded), the hook refuses the
  // incoming domain, so libvirt cannot bring it in late; other steps and migrations pass.
  SiteRecords records(**db);
  ASSERT_TRUE(records.append(RecordKind::aborted, "hook-1", uuid, "recovered: not migrated").ok());
  for (const char* op : {"migrate", "prepare"}) {
    Output refused = run(hook + "lvt-hook " + op + " begin - <" + shared_ + "/marked.xml");
    EXPECT_EQ(refused.status, 1) << refused.out;
    EXPECT_NE(refused.out.find("refusing the incoming domain"), std::string::npos) << refused.out;
    EXPECT_EQ(count(refused.out, "\n"), 1) << refused.out;
  }
  EXPECT_EQ(run(hook + "lvt-hook release end - <" + shared_ + "/marked.xml").status, 0);
  auto other = with_mark(plain, KvmigMark{"hook-2", {{"placeholder", 6}}});
  ASSERT_TRUE(other.ok());
  std::ofstream(shared_ + "/other.xml") << *other;
  EXPECT_EQ(run(hook + "lvt-hook migrate begin - <" + shared_ + "/other.xml").status, 0);
}

}  // namespace
