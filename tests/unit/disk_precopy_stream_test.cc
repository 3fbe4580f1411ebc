// Live disk pre-copy without a VM: a thread writes into an image (and marks its
// BlockWriteLog, as the block device does) while DiskPrecopySender streams it over a
// socketpair to DiskPrecopyReceiver, which writes its copy with io_uring. After the writer
// stops (the "pause") and the final round, the copy must be byte-identical (XXH3).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <random>
#include <string>
#include <thread>

#include "base/fd.h"
#include "helper/disk_extents.h"
#include "helper/disk_precopy_receiver.h"
#include "helper/disk_precopy_sender.h"
#include "helper/messages.h"
#include "kvm/block_write_log.h"
#include "test_util.h"

namespace kvmig::helper {
namespace {

using test::make_temp_dir;
using test::read_file;
using test::run_shell;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kBlock = 64 << 10;

struct Pair {
  std::unique_ptr<FdStream> source, dest;
};
Pair stream_pair() {
  int sv[2];
  EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  return {std::make_unique<FdStream>(Fd(sv[0]), "source"), std::make_unique<FdStream>(Fd(sv[1]), "dest")};
}

void fill(int fd, uint64_t offset, uint64_t len, uint32_t seed) {
  std::vector<uint8_t> buf(len);
  std::mt19937 rng(seed);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  ASSERT_EQ(::pwrite(fd, buf.data(), len, static_cast<off_t>(offset)), static_cast<ssize_t>(len));
}

// The destination's half as a migration session runs it: DISKS, DISK_BLOCKS..., and (here)
// COMMIT standing for "the source is done": finish() and answer DONE.
struct Destination {
  std::thread thread;
  std::string error;
  DiskReceiverStats stats;
  void start(Stream& control, std::vector<std::string> paths) {
    thread = std::thread([this, &control, paths] {
      std::unique_ptr<DiskPrecopyReceiver> rx;
      auto fail = [&](const Error& e) {
        error = e.message;
        if (rx) rx->discard();
        control.shutdown();
      };
      for (;;) {
        auto m = read_message(control, kWireVersion, WireLimits{});
        if (!m.ok()) return fail(m.error());
        if (m->type() == MsgType::disks) {
          auto r = accept_disks(control, kWireVersion, m->payload, paths, {});
          if (!r.ok()) return fail(r.error());
          rx = std::move(*r);
        } else if (m->type() == MsgType::disk_blocks && rx) {
          if (auto r = rx->on_blocks(m->payload); !r.ok()) return fail(r.error());
        } else if (m->type() == MsgType::commit && rx) {
          if (auto r = rx->finish(); !r.ok()) return fail(r.error());
          stats = rx->stats();
          (void)send_message(control, kWireVersion, MsgType::done);
          return;
        } else {
          return fail(Error{std::string("unexpected ") + msg_type_name(m->type())});
        }
      }
    });
  }
};

uint64_t file_hash(const std::string& path, uint64_t size) {
  Fd fd(::open(path.c_str(), O_RDONLY));
  auto h = hash_file(fd.get(), size);
  EXPECT_TRUE(h.ok());
  return h.ok() ? *h : 0;
}

TEST(DiskPrecopyStream, LiveWritesWithHotBlocksEndByteIdentical) {
  std::string dir = make_temp_dir("kvmig-diskpre");
  const uint64_t size = 64 * kMiB;
  std::string src_path = dir + "/src.raw", dst_path = dir + "/dst.raw";
  Fd src(::open(src_path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644));
  ASSERT_TRUE(src.valid());
  ASSERT_EQ(::ftruncate(src.get(), static_cast<off_t>(size)), 0);
  fill(src.get(), 0, 16 * kMiB, 1);            // data
  std::vector<uint8_t> zeros(4 * kMiB, 0);     // data extent that is all zeros
  ASSERT_EQ(::pwrite(src.get(), zeros.data(), zeros.size(), 20 * kMiB), static_cast<ssize_t>(zeros.size()));
  fill(src.get(), 40 * kMiB, 8 * kMiB, 2);     // more data; the rest are holes

  kvm::BlockWriteLog log(size, kBlock);
  DiskSenderOptions opt;
  opt.plan.hot_rounds = 2;
  auto sender = DiskPrecopySender::create({{src.get(), -1, &log}}, opt);
  ASSERT_TRUE(sender.ok()) << sender.error().message;
  DiskPrecopySender& tx = **sender;
  EXPECT_TRUE(log.tracking());
  EXPECT_GE(tx.declaration().disks[0].data_bytes, 28 * kMiB);
  EXPECT_LT(tx.declaration().disks[0].data_bytes, size) << "holes are not data";

  Pair p = stream_pair();
  Destination dest;
  dest.start(*p.dest, {dst_path});
  ASSERT_TRUE(tx.declare(*p.source, kWireVersion).ok());

  // The guest: 16 KiB writes, a third of them to 4 hot blocks, the rest spread over the disk
  // (holes included); mark() after the write completes, as the device does. It is paced by
  // the rounds, not by the clock: each round lets it make kWritesPerRound more writes, which
  // race with that round's reads, and the round ends only once they are made. Each round then
  // sees the same guest writing however loaded the machine is (a clock-paced writer wrote
  // more per round whenever this thread was descheduled, while the measured bandwidth fell,
  // and the copy could not converge in 60 rounds).
  constexpr uint64_t kWritesPerRound = 8;
  std::mutex mu;
  std::condition_variable cv;
  uint64_t allowed = 0, made = 0;  // guarded by mu
  bool stop = false;
  std::thread writer([&] {
    std::mt19937_64 rng(7);
    std::vector<uint8_t> buf(16 << 10);
    for (;;) {
      {
        std::unique_lock lock(mu);
        cv.wait(lock, [&] { return stop || made < allowed; });
        if (stop) return;
      }
      uint64_t off = rng() % 3 == 0 ? (rng() % 4) * kBlock * 100 + (rng() % 4) * buf.size()
                                    : (rng() % (size / buf.size())) * buf.size();
      for (auto& b : buf) b = static_cast<uint8_t>(rng());
      if (::pwrite(src.get(), buf.data(), buf.size(), static_cast<off_t>(off)) != static_cast<ssize_t>(buf.size()))
        return;
      log.mark(off, buf.size());
      std::lock_guard lock(mu);
      ++made;
      cv.notify_all();
    }
  });
  auto guest_writes = [&] {  // one round's worth, racing with whatever runs meanwhile
    std::lock_guard lock(mu);
    allowed += kWritesPerRound;
    cv.notify_all();
  };
  auto guest_done = [&] {  // bounded by the writer's progress; the minute only catches a hang
    std::unique_lock lock(mu);
    return cv.wait_for(lock, std::chrono::seconds(60), [&] { return made == allowed; });
  };

  uint64_t deferred_seen = 0, deferred_now = 0;
  bool converged = false;
  auto last = std::chrono::steady_clock::now();
  for (int rounds = 0; rounds < 60 && !converged; ++rounds) {
    ASSERT_TRUE(guest_done()) << "the writer stalled";
    uint64_t dirty = tx.observe();
    auto now = std::chrono::steady_clock::now();
    double seconds = std::max(1e-3, std::chrono::duration<double>(now - last).count());
    last = now;
    // Converged once bulk and backlog are through and what is owed fits the pause budget
    // (after a few rounds so hot blocks are recognised).
    converged = rounds >= 8 && tx.convergence(dirty / seconds).converged;
    if (converged) break;
    guest_writes();
    auto r = tx.send_round(*p.source, kWireVersion, 8 * kMiB);
    ASSERT_TRUE(r.ok()) << r.error().message << " / destination: " << dest.error;
    deferred_seen = std::max(deferred_seen, r->deferred_blocks);
    deferred_now = r->deferred_blocks;
  }
  EXPECT_TRUE(converged) << "owed " << tx.pending_bytes() << " bytes at " << tx.bandwidth() << " B/s";
  // The bulk copy went out live, but for a hot block of it that the rule holds for the pause
  // (a block written round after round before its first copy: deferring it is the rule, not a
  // miss; whether that happens depends on when the writer reaches it).
  EXPECT_TRUE(tx.bulk_done() || deferred_now > 0);
  EXPECT_GT(tx.bandwidth(), 0);
  EXPECT_GT(deferred_seen, 0u) << "blocks written every round are held for the switch-over";

  // The pause: the guest's last writes after the deciding harvest complete (and are marked),
  // then it stops; the final round must carry them.
  guest_writes();
  ASSERT_TRUE(guest_done()) << "the writer stalled";
  uint64_t total_writes = 0;
  {
    std::lock_guard lock(mu);
    stop = true;
    total_writes = made;
    cv.notify_all();
  }
  writer.join();
  EXPECT_GE(total_writes, 9 * kWritesPerRound) << "the guest wrote during the pre-copy";
  auto fin = tx.send_final(*p.source, kWireVersion);
  ASSERT_TRUE(fin.ok()) << fin.error().message;
  EXPECT_GT(fin->blocks, 0u);
  EXPECT_EQ(tx.pending_bytes(), 0u);
  EXPECT_TRUE(tx.bulk_done());
  ASSERT_TRUE(send_message(*p.source, kWireVersion, MsgType::commit).ok());
  auto done = read_message(*p.source, kWireVersion, WireLimits{});
  dest.thread.join();
  ASSERT_TRUE(done.ok()) << done.error().message << " / destination: " << dest.error;
  EXPECT_EQ(done->type(), MsgType::done);
  EXPECT_TRUE(dest.error.empty()) << dest.error;
  EXPECT_GT(dest.stats.zero_bytes, 0u) << "the all-zero extent went as markers";

  struct stat st {};
  ASSERT_EQ(::stat(dst_path.c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), size);
  EXPECT_EQ(file_hash(dst_path, size), file_hash(src_path, size));
  run_shell("rm -rf " + dir);
}

TEST(DiskPrecopyStream, DestinationRefusesAnExistingNonEmptyFileAndAWrongCount) {
  std::string dir = make_temp_dir("kvmig-diskpre");
  std::string taken = dir + "/taken.raw";
  { Fd f(::open(taken.c_str(), O_RDWR | O_CREAT, 0644)); fill(f.get(), 0, 4096, 3); }
  DisksMsg declared;
  declared.disks.push_back({8 * kMiB, 0, static_cast<uint32_t>(kBlock)});
  std::vector<std::string> one{taken};
  auto r = DiskPrecopyReceiver::open(declared, one, {});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("not empty"), std::string::npos) << r.error().message;
  EXPECT_EQ(file_hash(taken, 4096) != 0, true) << "the existing file is left alone";

  std::vector<std::string> two{dir + "/a.raw", dir + "/b.raw"};
  auto count = DiskPrecopyReceiver::open(declared, two, {});
  ASSERT_FALSE(count.ok());
  EXPECT_EQ(wire_code_of(count.error()), WireCode::config_mismatch);
  EXPECT_NE(::access((dir + "/a.raw").c_str(), F_OK), 0) << "nothing created on refusal";
  run_shell("rm -rf " + dir);
}

TEST(DiskPrecopyStream, BadBlocksAreRefusedBeforeAnythingIsWrittenAndDiscardRemovesTheCopy) {
  std::string dir = make_temp_dir("kvmig-diskpre");
  DisksMsg declared;
  declared.disks.push_back({1 * kMiB, 0, static_cast<uint32_t>(kBlock)});
  std::vector<std::string> paths{dir + "/d.raw"};
  auto rx = DiskPrecopyReceiver::open(declared, paths, {});
  ASSERT_TRUE(rx.ok()) << rx.error().message;
  std::vector<uint8_t> data(kBlock, 0xab);
  // One good run and one past the disk's end: nothing of the message may land.
  std::vector<DiskRun> runs{{0, static_cast<uint32_t>(kBlock), DiskRunKind::data},
                            {1 * kMiB, static_cast<uint32_t>(kBlock), DiskRunKind::data}};
  std::vector<uint8_t> payload = encode_disk_blocks_head(0, 1, runs);
  payload.insert(payload.end(), data.begin(), data.end());
  payload.insert(payload.end(), data.begin(), data.end());
  auto r = (*rx)->on_blocks(payload);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(wire_code_of(r.error()), WireCode::malformed);
  ASSERT_TRUE((*rx)->finish().ok());
  std::string written = read_file(paths[0]);
  EXPECT_EQ(written.size(), 1 * kMiB);
  EXPECT_EQ(written.find_first_not_of('\0'), std::string::npos) << "the good run was not written either";
  (*rx)->discard();
  EXPECT_NE(::access(paths[0].c_str(), F_OK), 0) << "a discarded copy is removed";
  run_shell("rm -rf " + dir);
}

}  // namespace
}  // namespace kvmig::helper
