// Chain copies (docs/disk-chains.md) against a real `kvmig disk serve` on loopback: qcow2
// chains made and checked with qemu-img, kvmig base + delta chains, layers the destination
// already holds skipped without a byte, a destination layer corrupted behind a stale cached
// content ID caught and copied again, and each bad chain refused with one line while the
// source stays untouched.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "base/fd.h"
#include "disk_serve_fixture.h"
#include "helper/disk_extents.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace {

constexpr uint64_t kMiB = 1 << 20;

using kvmig::test::hash_of;
using kvmig::test::read_file;
using kvmig::test::Server;

using KRun = kvmig::test::JsonRun;
using kvmig::test::line_count;

void fill(const fs::path& p, uint64_t offset, uint64_t length, int pattern) {
  kvmig::Fd fd(::open(p.c_str(), O_WRONLY));
  ASSERT_TRUE(fd.valid()) << p;
  std::mt19937_64 rng(offset * 31 + static_cast<uint64_t>(pattern));
  std::vector<uint64_t> buf(length / 8);
  for (auto& w : buf) w = pattern < 0 ? 0 : rng();
  ASSERT_EQ(::pwrite(fd.get(), buf.data(), length, static_cast<off_t>(offset)), static_cast<ssize_t>(length));
  ::fsync(fd.get());
}

void make_raw(const fs::path& p, uint64_t size) {
  kvmig::Fd fd(::open(p.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644));
  ASSERT_EQ(::ftruncate(fd.get(), static_cast<off_t>(size)), 0);
}

std::vector<kvmig::helper::Extent> data_extents(const fs::path& p) {
  kvmig::Fd fd(::open(p.c_str(), O_RDONLY));
  auto e = kvmig::helper::scan_extents(fd.get(), fs::file_size(p), 4096);
  std::vector<kvmig::helper::Extent> out;
  if (e.ok())
    for (const auto& x : *e)
      if (x.data) out.push_back(x);
  return out;
}

// The disk a kvmig base + delta chain shows: the delta's allocated blocks, else the base's.
std::string virtual_disk(const fs::path& base, const fs::path& delta) {
  std::string disk = read_file(base), top = read_file(delta);
  for (const auto& e : data_extents(delta)) disk.replace(e.offset, e.length, top.substr(e.offset, e.length));
  return disk;
}

kvmig::test::ShellRun sh(const std::string& cmd) { return kvmig::test::run_shell(cmd); }

class DiskChain : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = kvmig::test::make_temp_dir("kvmig-diskchain");
    ASSERT_FALSE(dir_.empty());
    fs::create_directories(dir_ / "src");
    fs::create_directories(dir_ / "root" / "vm");
  }
  void TearDown() override { fs::remove_all(dir_); }

  KRun kvmig(const std::string& args) { return kvmig::test::run_kvmig_json(args); }

  // base.raw (32 MiB, data at 0..8M and 16..20M), pre-copied or not, then a delta on top
  // that overrides 2..3M with new data and 17..18M with zeros.
  fs::path make_raw_chain() {
    fs::path base = dir_ / "src" / "base.raw";
    make_raw(base, 32 * kMiB);
    fill(base, 0, 8 * kMiB, 1);
    fill(base, 16 * kMiB, 4 * kMiB, 2);
    KRun snap = kvmig("disk snapshot " + base.string());
    EXPECT_EQ(snap.status, 0) << snap.err;
    fs::path delta = dir_ / "src" / "base.delta1.raw";
    EXPECT_EQ(snap.out, delta.string() + "\n");
    fill(delta, 2 * kMiB, kMiB, 3);
    fill(delta, 17 * kMiB, kMiB, -1);
    return delta;
  }

  fs::path dir_;
};

TEST_F(DiskChain, Qcow2ChainOfThreeIsCopiedRelinkedAndComparesEqual) {
  if (!kvmig::test::have_program("qemu-img") || !kvmig::test::have_program("qemu-io"))
    GTEST_SKIP() << "qemu-img / qemu-io (qemu-utils) not installed";
  fs::path src = dir_ / "src";
  // mid names base by an absolute path: the destination must rewrite it.
  ASSERT_EQ(sh("cd " + src.string() + " && qemu-img create -q -f qcow2 base.qcow2 64M && "
               "qemu-io -f qcow2 -c 'write -P 0x11 0 8M' base.qcow2 && "
               "qemu-img create -q -f qcow2 -b " + (src / "base.qcow2").string() + " -F qcow2 mid.qcow2 && "
               "qemu-io -f qcow2 -c 'write -P 0x22 4M 8M' mid.qcow2").status, 0);
  KRun snap = kvmig("disk snapshot " + (src / "mid.qcow2").string() + " --output " + (src / "top.qcow2").string());
  ASSERT_EQ(snap.status, 0) << snap.err;
  EXPECT_EQ((fs::status(src / "mid.qcow2").permissions() & fs::perms::owner_write), fs::perms::none);
  ASSERT_EQ(sh("qemu-io -f qcow2 -c 'write -P 0x33 10M 1M' " + (src / "top.qcow2").string()).status, 0);
  uint64_t top_before = hash_of(src / "top.qcow2");

  Server server(dir_ / "root", dir_ / "serve.log");
  ASSERT_GT(server.port(), 0) << server.log();
  KRun r = kvmig("disk copy " + (src / "top.qcow2").string() + " " + server.at("vm/disk.qcow2") + " --json");
  ASSERT_EQ(r.status, 0) << r.err << server.log();
  auto j = r.json();
  ASSERT_EQ(j["layers"].size(), 3u) << r.out;
  for (const auto& l : j["layers"]) {
    EXPECT_EQ(l["format"], "qcow2");
    EXPECT_EQ(l["status"], "missing");
  }
  fs::path dest = dir_ / "root" / "vm";
  EXPECT_TRUE(fs::exists(dest / "base.qcow2"));
  EXPECT_TRUE(fs::exists(dest / "mid.qcow2"));
  auto compare = sh("qemu-img compare -f qcow2 -F qcow2 " + (src / "top.qcow2").string() + " " +
                    (dest / "disk.qcow2").string());
  EXPECT_EQ(compare.status, 0) << compare.out;
  auto info = nlohmann::json::parse(sh("qemu-img info --output=json " + (dest / "mid.qcow2").string()).out,
                                    nullptr, false);
  EXPECT_EQ(info.value("backing-filename", ""), "base.qcow2");  // re-linked, no longer the source's path
  EXPECT_EQ(hash_of(src / "top.qcow2"), top_before);

  // Again: the destination holds every layer (mid by its own record of the re-link).
  KRun again = kvmig("disk copy " + (src / "top.qcow2").string() + " " + server.at("vm/disk.qcow2") + " --json");
  ASSERT_EQ(again.status, 0) << again.err;
  auto k = again.json();
  for (const auto& l : k["layers"]) EXPECT_EQ(l["status"], "held") << again.out;
  EXPECT_EQ(k["data_bytes"].get<uint64_t>(), 0u);
  EXPECT_EQ(k["connections"].size(), 0u);
}

TEST_F(DiskChain, LayerWithTheSameContentIdIsSkippedWithoutSendingItsBytes) {
  fs::path base = dir_ / "src" / "base.raw";
  make_raw(base, 32 * kMiB);
  fill(base, 0, 8 * kMiB, 1);
  fill(base, 16 * kMiB, 4 * kMiB, 2);
  Server server(dir_ / "root", dir_ / "serve.log");
  ASSERT_GT(server.port(), 0);
  // Pre-copy the base while it is still the top, then snapshot and write to the new top.
  KRun pre = kvmig("disk copy " + base.string() + " " + server.at("vm/base.raw"));
  ASSERT_EQ(pre.status, 0) << pre.err;
  KRun snap = kvmig("disk snapshot " + base.string());
  ASSERT_EQ(snap.status, 0) << snap.err;
  fs::path delta = dir_ / "src" / "base.delta1.raw";
  ASSERT_EQ(snap.out, delta.string() + "\n");
  EXPECT_EQ((fs::status(base).permissions() & fs::perms::owner_write), fs::perms::none);
  fill(delta, 2 * kMiB, kMiB, 3);
  fill(delta, 17 * kMiB, kMiB, -1);  // zeros that hide base data: must stay allocated

  KRun r = kvmig("disk copy " + delta.string() + " " + server.at("vm/disk.raw") + " --json");
  ASSERT_EQ(r.status, 0) << r.err << server.log();
  auto j = r.json();
  ASSERT_EQ(j["layers"].size(), 2u) << r.out;
  EXPECT_EQ(j["layers"][0]["status"], "held");
  EXPECT_EQ(j["layers"][0]["data_bytes"].get<uint64_t>(), 0u);
  EXPECT_EQ(j["layers"][1]["status"], "missing");
  EXPECT_EQ(j["layers"][1]["format"], "kvmig-delta");
  // Only the delta travelled: its 1 MiB of data (its zeros as a marker), over one connection.
  EXPECT_EQ(j["data_bytes"].get<uint64_t>(), kMiB);
  ASSERT_EQ(j["connections"].size(), 1u);
  EXPECT_EQ(j["connections"][0]["path"], "vm/disk.raw");

  fs::path dest = dir_ / "root" / "vm";
  EXPECT_EQ(hash_of(dest / "disk.raw"), hash_of(delta));
  EXPECT_EQ(hash_of(dest / "base.raw"), hash_of(base));
  auto want = data_extents(delta), got = data_extents(dest / "disk.raw");
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i].offset, want[i].offset);
    EXPECT_EQ(got[i].length, want[i].length);
  }
  auto descriptor = nlohmann::json::parse(read_file(dest / "disk.raw.kvmig-delta"), nullptr, false);
  EXPECT_EQ(descriptor.value("parent", ""), "base.raw");
  EXPECT_EQ(descriptor.value("size", uint64_t{0}), 32 * kMiB);
  std::string disk = virtual_disk(dest / "base.raw", dest / "disk.raw");
  EXPECT_EQ(disk, virtual_disk(base, delta));
  EXPECT_EQ(disk.substr(17 * kMiB, kMiB), std::string(kMiB, '\0'));  // not the base's data
}

TEST_F(DiskChain, CorruptedDestinationLayerBehindAStaleCachedIdIsDetectedAndCopied) {
  fs::path delta = make_raw_chain(), base = dir_ / "src" / "base.raw";
  Server server(dir_ / "root", dir_ / "serve.log");
  ASSERT_GT(server.port(), 0);
  std::string copy = "disk copy " + delta.string() + " " + server.at("vm/disk.raw") + " --json";
  KRun first = kvmig(copy);
  ASSERT_EQ(first.status, 0) << first.err << server.log();
  std::string id = first.json()["layers"][0]["content_id"];
  // Past the racy window, the destination's cached IDs count and the source's get cached.
  std::this_thread::sleep_for(std::chrono::milliseconds(3200));
  KRun held = kvmig(copy);
  ASSERT_EQ(held.status, 0) << held.err;
  EXPECT_EQ(held.json()["layers"][0]["status"], "held");
  EXPECT_EQ(held.json()["layers"][1]["status"], "held");
  fs::path dest = dir_ / "root" / "vm" / "base.raw";
  auto sidecar = nlohmann::json::parse(read_file(dest.string() + ".kvmig-id"), nullptr, false);
  ASSERT_FALSE(sidecar.is_discarded());
  EXPECT_EQ(sidecar["id"], id);
  std::this_thread::sleep_for(std::chrono::milliseconds(3200));
  KRun cached = kvmig(copy);
  ASSERT_EQ(cached.status, 0) << cached.err;
  EXPECT_TRUE(cached.json()["layers"][0]["id_cached"].get<bool>()) << cached.out;

  // Flip one byte of the destination's base and put its mtime back: size, inode and mtime
  // match the sidecar, which still claims the source's ID. Only ctime gives it away.
  struct stat st {};
  ASSERT_EQ(::stat(dest.c_str(), &st), 0);
  {
    kvmig::Fd fd(::open(dest.c_str(), O_WRONLY));
    char bad = '\x5a';
    ASSERT_EQ(::pwrite(fd.get(), &bad, 1, 4096), 1);
    timespec times[2] = {st.st_atim, st.st_mtim};
    ASSERT_EQ(::futimens(fd.get(), times), 0);
  }
  EXPECT_EQ(nlohmann::json::parse(read_file(dest.string() + ".kvmig-id"), nullptr, false)["id"], id);
  uint64_t src_base = hash_of(base), src_delta = hash_of(delta);

  KRun refused = kvmig(copy + " --retries 0");
  EXPECT_EQ(refused.status, 1);
  EXPECT_EQ(line_count(refused.err), 1) << refused.err;
  EXPECT_NE(refused.err.find("another content ID"), std::string::npos) << refused.err;

  KRun fixed = kvmig(copy + " --overwrite");
  ASSERT_EQ(fixed.status, 0) << fixed.err << server.log();
  auto j = fixed.json();
  EXPECT_EQ(j["layers"][0]["status"], "differs");
  EXPECT_EQ(j["layers"][0]["data_bytes"].get<uint64_t>(), 12 * kMiB);
  EXPECT_EQ(j["layers"][1]["status"], "held");
  EXPECT_EQ(hash_of(dest), hash_of(base));
  EXPECT_EQ(hash_of(base), src_base);
  EXPECT_EQ(hash_of(delta), src_delta);
}

TEST_F(DiskChain, MismatchedLayerIsCopiedNotTrusted) {
  fs::path delta = make_raw_chain(), base = dir_ / "src" / "base.raw";
  // The destination has a different base under the same name (another image's).
  fs::path other = dir_ / "root" / "vm" / "base.raw";
  make_raw(other, 32 * kMiB);
  fill(other, 0, 8 * kMiB, 7);
  Server server(dir_ / "root", dir_ / "serve.log");
  ASSERT_GT(server.port(), 0);
  KRun r = kvmig("disk copy " + delta.string() + " " + server.at("vm/disk.raw") + " --json --overwrite");
  ASSERT_EQ(r.status, 0) << r.err << server.log();
  auto j = r.json();
  EXPECT_EQ(j["layers"][0]["status"], "differs");
  EXPECT_EQ(j["layers"][0]["data_bytes"].get<uint64_t>(), 12 * kMiB);
  EXPECT_EQ(hash_of(other), hash_of(base));
  EXPECT_EQ(virtual_disk(other, dir_ / "root" / "vm" / "disk.raw"), virtual_disk(base, delta));
}

TEST_F(DiskChain, BrokenConnectionInsideAChainCopyResumesThatLayer) {
  fs::path delta = make_raw_chain(), base = dir_ / "src" / "base.raw";
  Server server(dir_ / "root", dir_ / "serve.log");
  ASSERT_GT(server.port(), 0);
  // The base's first connection drops after 9 MiB (the server acknowledges every 8 MiB).
  KRun r = kvmig("disk copy " + delta.string() + " " + server.at("vm/disk.raw") +
                 " --fault-drop-after 9M --retry-delay-ms 100 --json");
  ASSERT_EQ(r.status, 0) << r.err << server.log();
  auto j = r.json();
  // Three connections: the base's broken one, the base resumed, the delta. The report lists
  // the ones that completed.
  EXPECT_EQ(j["attempts"].get<int>(), 3) << r.out;
  ASSERT_EQ(j["connections"].size(), 2u) << r.out;
  EXPECT_EQ(j["connections"][0]["path"], "vm/base.raw");
  EXPECT_GE(j["connections"][0]["resumed_from"].get<uint64_t>(), 8 * kMiB);
  EXPECT_LT(j["layers"][0]["data_bytes"].get<uint64_t>(), 12 * kMiB);  // the rest only
  fs::path dest = dir_ / "root" / "vm";
  EXPECT_EQ(hash_of(dest / "base.raw"), hash_of(base));
  EXPECT_EQ(virtual_disk(dest / "base.raw", dest / "disk.raw"), virtual_disk(base, delta));
}

TEST_F(DiskChain, BadChainsAreRefusedWithOneLineAndTheSourceUntouched) {
  fs::path src = dir_ / "src";
  auto descriptor = [&](const std::string& delta, const std::string& parent, uint64_t size) {
    std::ofstream(src / (delta + ".kvmig-delta")) << nlohmann::json{{"kvmig_delta", 1}, {"parent", parent}, {"size", size}}.dump();
  };
  make_raw(src / "a.raw", 4 * kMiB);
  make_raw(src / "b.raw", 4 * kMiB);
  descriptor("a.raw", "b.raw", 4 * kMiB);
  descriptor("b.raw", "a.raw", 4 * kMiB);
  make_raw(src / "orphan.raw", 4 * kMiB);
  descriptor("orphan.raw", "gone.raw", 4 * kMiB);
  make_raw(src / "short.raw", 4 * kMiB);
  descriptor("short.raw", "base.raw", 8 * kMiB);
  make_raw(src / "base.raw", 8 * kMiB);
  fill(src / "base.raw", 0, kMiB, 1);
  make_raw(src / "odd.raw", 1000);
  make_raw(src / "oddbase.raw", 1000);
  descriptor("odd.raw", "oddbase.raw", 1000);
  make_raw(src / "wide.raw", 16 * kMiB);
  descriptor("wide.raw", "base.raw", 16 * kMiB);
  struct Case {
    std::string image, expect;
  };
  std::vector<Case> cases = {
      {"a.raw", "chain loops"},
      {"orphan.raw", "missing parent"},
      {"short.raw", "shorter than declared"},
      {"odd.raw", "not aligned"},
      {"wide.raw", "its parent"},
  };
  if (kvmig::test::have_program("qemu-img")) {
    ASSERT_EQ(sh("cd " + src.string() + " && qemu-img create -q -f qcow2 q1.qcow2 16M && "
                 "qemu-img create -q -f qcow2 -b q1.qcow2 -F qcow2 q2.qcow2 && "
                 "qemu-img rebase -u -b q2.qcow2 -F qcow2 q1.qcow2 && "
                 "qemu-img create -q -f qcow2 gone.qcow2 16M && "
                 "qemu-img create -q -f qcow2 -b gone.qcow2 -F qcow2 lost.qcow2 && rm gone.qcow2").status, 0);
    cases.push_back({"q2.qcow2", "infinite loop"});
    cases.push_back({"lost.qcow2", "gone.qcow2"});
  }
  std::vector<uint64_t> before;
  for (const auto& e : fs::directory_iterator(src)) before.push_back(hash_of(e.path()));
  Server server(dir_ / "root", dir_ / "serve.log");
  ASSERT_GT(server.port(), 0);
  for (const Case& c : cases) {
    KRun r = kvmig("disk copy " + (src / c.image).string() + " " + server.at("vm/x.img") + " --retries 0");
    EXPECT_EQ(r.status, 1) << c.image << ": " << r.err;
    EXPECT_EQ(line_count(r.err), 1) << c.image << ": " << r.err;
    EXPECT_NE(r.err.find(c.expect), std::string::npos) << c.image << ": " << r.err;
  }
  std::vector<uint64_t> after;
  for (const auto& e : fs::directory_iterator(src)) after.push_back(hash_of(e.path()));
  EXPECT_EQ(after, before);
  EXPECT_TRUE(fs::is_empty(dir_ / "root" / "vm"));
}

}  // namespace
