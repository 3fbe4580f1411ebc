// `kvmig disk copy` against real `kvmig disk serve` processes on loopback: sparse copies,
// a broken connection resumed, a hand-off between two servers, and each bad input refused
// with one clear line while the source stays untouched. Every copy is checked byte for byte
// (XXH3 of both files, computed here, independently of the tool's own check).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "base/fd.h"
#include "helper/disk_extents.h"
#include "disk_serve_fixture.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace {

constexpr uint64_t kMiB = 1 << 20;

using kvmig::test::read_file;
using kvmig::test::allocated;
using kvmig::test::hash_of;
using kvmig::test::Server;

using CliRun = kvmig::test::JsonRun;
using kvmig::test::line_count;

class DiskCopy : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = kvmig::test::make_temp_dir("kvmig-diskcopy");
    ASSERT_FALSE(dir_.empty());
    fs::create_directories(dir_ / "root");
  }
  void TearDown() override {
    if (!mounted_.empty()) ::umount2(mounted_.c_str(), MNT_DETACH);
    fs::remove_all(dir_);
  }

  // An image: random data extents, an all-zero allocated region and holes between.
  fs::path make_image(const std::string& name, uint64_t size, uint64_t data_mib, uint64_t zero_mib) {
    fs::path p = dir_ / name;
    kvmig::Fd fd(::open(p.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644));
    EXPECT_EQ(::ftruncate(fd.get(), static_cast<off_t>(size)), 0);
    std::mt19937_64 rng(size ^ data_mib);
    std::vector<uint64_t> buf(kMiB / 8);
    for (uint64_t i = 0; i < data_mib; ++i) {
      for (auto& w : buf) w = rng();
      uint64_t off = (i * 2) * kMiB % size;  // every other MiB: data, hole, data...
      EXPECT_EQ(::pwrite(fd.get(), buf.data(), kMiB, static_cast<off_t>(off)), static_cast<ssize_t>(kMiB));
    }
    std::vector<uint8_t> zeros(kMiB, 0);
    for (uint64_t i = 0; i < zero_mib; ++i)
      EXPECT_EQ(::pwrite(fd.get(), zeros.data(), kMiB, static_cast<off_t>(size - (i + 1) * kMiB)),
                static_cast<ssize_t>(kMiB));
    ::fsync(fd.get());
    return p;
  }

  CliRun kvmig(const std::string& args) { return kvmig::test::run_kvmig_json(args); }

  fs::path dir_;
  std::string mounted_;
};

TEST_F(DiskCopy, HolesStaySparseAndZeroBlocksTravelAsMarkers) {
  fs::path img = make_image("img", 40 * kMiB, 12, 4);
  Server server(dir_ / "root", dir_ / "serve.log");
  ASSERT_GT(server.port(), 0) << server.log();
  CliRun r = kvmig("disk copy " + img.string() + " " + server.at("copy.img") + " --json");
  ASSERT_EQ(r.status, 0) << r.err;
  auto j = r.json();
  ASSERT_FALSE(j.is_discarded()) << r.out;
  EXPECT_EQ(j["data_bytes"].get<uint64_t>(), 12 * kMiB);
  EXPECT_EQ(j["zero_bytes"].get<uint64_t>(), 4 * kMiB);
  EXPECT_GT(j["hole_bytes"].get<uint64_t>(), 20 * kMiB);
  fs::path copy = dir_ / "root" / "copy.img";
  EXPECT_EQ(fs::file_size(copy), 40 * kMiB);
  EXPECT_EQ(hash_of(copy), hash_of(img));
  EXPECT_EQ(j["xxh3"].get<uint64_t>(), hash_of(img));
  // Only the data is allocated: neither holes nor the zero blocks.
  EXPECT_LE(allocated(copy), 12 * kMiB + 64 * 1024);
  EXPECT_GE(allocated(img), 16 * kMiB);
  EXPECT_FALSE(fs::exists(dir_ / "root" / "copy.img.kvmig-partial"));
}

TEST_F(DiskCopy, BrokenConnectionResumesFromTheAcknowledgedOffset) {
  fs::path img = make_image("img", 64 * kMiB, 30, 0);
  uint64_t before = hash_of(img);
  Server server(dir_ / "root", dir_ / "serve.log");
  ASSERT_GT(server.port(), 0);
  CliRun broken = kvmig("disk copy " + img.string() + " " + server.at("r.img") +
                     " --fault-drop-after 20M --retries 0");
  EXPECT_NE(broken.status, 0);
  EXPECT_EQ(line_count(broken.err), 1) << broken.err;
  EXPECT_NE(broken.err.find("fault injection"), std::string::npos) << broken.err;
  // Give the server a moment to notice the broken connection and record its progress: the
  // marker is final once the server has logged the failed copy (an ACK point's marker, written
  // in the background, may show up before that and be overtaken).
  nlohmann::json marker;
  for (int i = 0; i < 500; ++i) {
    if (server.log().find("copy failed") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  marker = nlohmann::json::parse(read_file(dir_ / "root" / "r.img.kvmig-partial"), nullptr, false);
  ASSERT_FALSE(marker.is_discarded());
  uint64_t acked = marker["acked"].get<uint64_t>();
  EXPECT_GE(acked, 20 * kMiB);

  CliRun resumed = kvmig("disk copy " + img.string() + " " + server.at("r.img") + " --json");
  ASSERT_EQ(resumed.status, 0) << resumed.err;
  auto j = resumed.json();
  EXPECT_EQ(j["connections"][0]["resumed_from"].get<uint64_t>(), acked);
  EXPECT_LT(j["data_bytes"].get<uint64_t>(), 30 * kMiB);  // only the rest was sent
  EXPECT_EQ(hash_of(dir_ / "root" / "r.img"), hash_of(img));
  EXPECT_EQ(hash_of(img), before);
}

TEST_F(DiskCopy, DroppedConnectionIsResumedWithinOneRun) {
  fs::path img = make_image("img", 48 * kMiB, 20, 2);
  Server server(dir_ / "root", dir_ / "serve.log");
  ASSERT_GT(server.port(), 0);
  CliRun r = kvmig("disk copy " + img.string() + " " + server.at("r.img") +
                " --fault-drop-after 12M --retry-delay-ms 100 --json");
  ASSERT_EQ(r.status, 0) << r.err;
  auto j = r.json();
  EXPECT_EQ(j["attempts"].get<int>(), 2);
  EXPECT_GT(j["connections"][0]["resumed_from"].get<uint64_t>(), 0u);
  EXPECT_EQ(hash_of(dir_ / "root" / "r.img"), hash_of(img));
}

// The destination makes progress durable in the background every --ack-every (8M here)
// bytes *written*: holes cost no fdatasync. 24 MiB of data spread over a 96 MiB image gives
// 2-3 ACKs (the last may be overtaken by DONE); counting offsets, as before, gave 6 or more.
// --max-rate spaces the messages so each sync gets its turn before the copy ends.
TEST_F(DiskCopy, OnlyWrittenBytesAreSyncedAndAcknowledgedWhileTheCopyGoesOn) {
  fs::path img = make_image("img", 96 * kMiB, 24, 0);
  Server server(dir_ / "root", dir_ / "serve.log");
  ASSERT_GT(server.port(), 0);
  CliRun r = kvmig("disk copy " + img.string() + " " + server.at("a.img") + " --max-rate 48M --json");
  ASSERT_EQ(r.status, 0) << r.err;
  auto j = r.json();
  ASSERT_EQ(j["connections"].size(), 1u);
  EXPECT_EQ(j["data_bytes"].get<uint64_t>(), 24 * kMiB);
  uint64_t acks = j["connections"][0]["acks"].get<uint64_t>();
  EXPECT_GE(acks, 2u);
  EXPECT_LE(acks, 3u);
  EXPECT_EQ(hash_of(dir_ / "root" / "a.img"), hash_of(img));
  EXPECT_FALSE(fs::exists(dir_ / "root" / "a.img.kvmig-partial"));
}

TEST_F(DiskCopy, HandOffMovesTheCopyToASecondServer) {
  fs::path img = make_image("img", 64 * kMiB, 30, 2);
  // Two servers over the same storage: the first is stopped, the second copies the rest.
  Server a(dir_ / "root", dir_ / "a.log");
  Server b(dir_ / "root", dir_ / "b.log");
  ASSERT_GT(a.port(), 0);
  ASSERT_GT(b.port(), 0);
  CliRun r = kvmig("disk copy " + img.string() + " " + a.at("h.img") + " --handoff 127.0.0.1:" +
                std::to_string(b.port()) + " --handoff-after 16M --json");
  ASSERT_EQ(r.status, 0) << r.err;
  auto j = r.json();
  ASSERT_TRUE(j["handed_off"].get<bool>());
  ASSERT_EQ(j["connections"].size(), 2u);
  auto first = j["connections"][0], second = j["connections"][1];
  EXPECT_EQ(first["outcome"], "stopped");
  EXPECT_EQ(first["endpoint"], "127.0.0.1:" + std::to_string(a.port()));
  uint64_t at = first["end_offset"].get<uint64_t>();
  EXPECT_GE(at, 16 * kMiB);
  EXPECT_EQ(j["handoff_at"].get<uint64_t>(), at);
  EXPECT_EQ(second["endpoint"], "127.0.0.1:" + std::to_string(b.port()));
  EXPECT_EQ(second["resumed_from"].get<uint64_t>(), at);  // B copies only the rest
  EXPECT_EQ(second["outcome"], "verified");
  EXPECT_EQ(first["data_bytes"].get<uint64_t>() + second["data_bytes"].get<uint64_t>(), 30 * kMiB);
  EXPECT_EQ(hash_of(dir_ / "root" / "h.img"), hash_of(img));
  EXPECT_NE(a.log().find("h.img stopped"), std::string::npos) << a.log();
  EXPECT_NE(b.log().find("h.img verified"), std::string::npos) << b.log();
}

TEST_F(DiskCopy, BadInputIsRefusedWithOneLineAndTheSourceUntouched) {
  fs::path img = make_image("img", 8 * kMiB, 2, 0);
  uint64_t before = hash_of(img);
  auto mtime = fs::last_write_time(img);
  fs::create_directories(dir_ / "outside");
  fs::create_symlink(dir_ / "outside", dir_ / "root" / "link");
  {
    std::ofstream odd(dir_ / "odd");
    odd << std::string(1000, 'x');
  }
  std::ofstream(dir_ / "root" / "exists.img") << "keep me";
  Server server(dir_ / "root", dir_ / "serve.log");
  ASSERT_GT(server.port(), 0);
  struct Case {
    std::string args, expect;
  } cases[] = {
      {(dir_ / "missing").string() + " " + server.at("m.img"), "No such file"},
      {img.string() + " " + server.at("s.img") + " --expect-size 16M", "shorter than declared"},
      {(dir_ / "odd").string() + " " + server.at("o.img"), "not aligned"},
      {img.string() + " " + server.at("../escape.img"), "must be relative"},
      {img.string() + " " + server.at("link/escape.img"), "escapes the served root"},
      {img.string() + " " + server.at("exists.img"), "exists"},
      {img.string() + " " + server.at("x.img") + " --block-size 12K", "block size"},
      {img.string() + " 127.0.0.1:" + std::to_string(server.port()), "HOST:PORT:DST"},
  };
  for (const Case& c : cases) {
    CliRun r = kvmig("disk copy " + c.args + " --retries 0");
    EXPECT_EQ(r.status, 1) << c.args << ": " << r.err;
    EXPECT_EQ(line_count(r.err), 1) << c.args << ": " << r.err;
    EXPECT_NE(r.err.find(c.expect), std::string::npos) << c.args << ": " << r.err;
  }
  EXPECT_TRUE(fs::is_empty(dir_ / "outside"));
  EXPECT_FALSE(fs::exists(dir_ / "escape.img"));
  EXPECT_EQ(read_file(dir_ / "root" / "exists.img"), "keep me");
  EXPECT_EQ(hash_of(img), before);
  EXPECT_EQ(fs::last_write_time(img), mtime);
  // The server survives all of it and still copies.
  CliRun ok = kvmig("disk copy " + img.string() + " " + server.at("fine.img"));
  EXPECT_EQ(ok.status, 0) << ok.err;
  EXPECT_EQ(hash_of(dir_ / "root" / "fine.img"), before);
}

TEST_F(DiskCopy, FullDestinationDiskIsAClearError) {
  fs::path small = dir_ / "small";
  fs::create_directories(small);
  if (::mount("tmpfs", small.c_str(), "tmpfs", 0, "size=4m") != 0)
    GTEST_SKIP() << "cannot mount a small tmpfs (needs root): " << std::strerror(errno);
  mounted_ = small.string();
  fs::path img = make_image("img", 16 * kMiB, 8, 0);
  Server server(small, dir_ / "serve.log");
  ASSERT_GT(server.port(), 0);
  CliRun r = kvmig("disk copy " + img.string() + " " + server.at("full.img") + " --retries 0");
  EXPECT_EQ(r.status, 1);
  EXPECT_EQ(line_count(r.err), 1) << r.err;
  EXPECT_NE(r.err.find("disk full"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(small / "full.img"));  // refused before a byte: nothing left
}

TEST_F(DiskCopy, DiskFullMidWriteFailsCleanlyAndAResumeCompletesAfterSpaceIsFreed) {
  fs::path small = dir_ / "small";
  fs::create_directories(small);
  if (::mount("tmpfs", small.c_str(), "tmpfs", 0, "size=40m") != 0)
    GTEST_SKIP() << "cannot mount a small tmpfs (needs root): " << std::strerror(errno);
  mounted_ = small.string();
  fs::path img = make_image("img", 48 * kMiB, 24, 0);
  uint64_t before = hash_of(img);
  auto mtime = fs::last_write_time(img);
  Server server(small, dir_ / "serve.log");
  ASSERT_GT(server.port(), 0);
  // 24 MiB of data fits the 40 MiB file system when the copy starts; --max-rate keeps it
  // going long enough for another writer to take the room halfway.
  CliRun failed;
  std::thread copy([&] {
    failed = kvmig("disk copy " + img.string() + " " + server.at("full.img") + " --max-rate 12M --retries 0");
  });
  uint64_t acked = 0;
  for (int i = 0; i < 1000 && acked < 8 * kMiB; ++i) {
    auto marker = nlohmann::json::parse(read_file(small / "full.img.kvmig-partial"), nullptr, false);
    if (!marker.is_discarded()) acked = marker.value("acked", uint64_t{0});
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  {
    kvmig::Fd filler(::open((small / "filler").c_str(), O_WRONLY | O_CREAT, 0644));
    std::vector<char> mib(kMiB, 'f');
    while (::write(filler.get(), mib.data(), mib.size()) > 0) {}
  }
  copy.join();
  ASSERT_GE(acked, 8 * kMiB);
  EXPECT_EQ(failed.status, 1) << failed.err;
  EXPECT_EQ(line_count(failed.err), 1) << failed.err;
  EXPECT_NE(failed.err.find("disk full"), std::string::npos) << failed.err;
  EXPECT_EQ(hash_of(img), before);
  EXPECT_EQ(fs::last_write_time(img), mtime);
  auto marker = nlohmann::json::parse(read_file(small / "full.img.kvmig-partial"), nullptr, false);
  ASSERT_FALSE(marker.is_discarded());
  uint64_t durable = marker["acked"].get<uint64_t>();
  EXPECT_GE(durable, 8 * kMiB);
  EXPECT_LT(durable, 48 * kMiB);

  fs::remove(small / "filler");
  CliRun resumed = kvmig("disk copy " + img.string() + " " + server.at("full.img") + " --json");
  ASSERT_EQ(resumed.status, 0) << resumed.err << server.log();
  EXPECT_EQ(resumed.json()["connections"][0]["resumed_from"].get<uint64_t>(), durable);
  EXPECT_EQ(hash_of(small / "full.img"), before);
  EXPECT_FALSE(fs::exists(small / "full.img.kvmig-partial"));
}

}  // namespace
