// DirtyTracker on real KVM: bitmap (manual protect and classic) and ring modes, device
// writes, trace granularity, ring-full exits. The guest is the table-driven writer of
// dirty_test_vm.h, so the expected dirty set is exactly what the test asked it to write.
#include <fcntl.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>

#include "dirty_test_vm.h"

namespace kvmig::kvm {
namespace {

using testing::DirtyTestVm;
using testing::kSlot0Size;
using testing::kSlot1Gpa;
using testing::kSlot1Size;

enum class Mode { manual, classic, ring };

std::set<uint64_t> dirty_pages(const std::vector<DirtyBitmap>& maps) {
  std::set<uint64_t> out;
  for (const DirtyBitmap& m : maps) {
    EXPECT_EQ(m.bits.size(), (m.pages + 63) / 64);
    for (uint64_t p = 0; p < m.pages; ++p)
      if (m.bits[p / 64] & (1ull << (p % 64))) out.insert(m.gpa + p * 4096);
  }
  return out;
}

std::set<uint64_t> pages_of(const std::vector<uint64_t>& gpas, uint64_t granule = 4096) {
  std::set<uint64_t> out;
  for (uint64_t gpa : gpas) {
    const uint64_t base = gpa & ~(granule - 1);
    const uint64_t end = base < kSlot1Gpa ? std::min(base + granule, kSlot0Size) : base + granule;
    for (uint64_t p = base; p < end; p += 4096) out.insert(p);
  }
  return out;
}

// Distinct random page addresses in both slots, away from the code and table pages.
std::vector<uint64_t> random_pages(std::mt19937_64& rng, size_t n) {
  std::set<uint64_t> pages;
  while (pages.size() < n) {
    uint64_t gpa = rng() % 2 ? (1 << 20) + (rng() % ((kSlot0Size - (1 << 20)) / 4096)) * 4096
                             : kSlot1Gpa + (rng() % (kSlot1Size / 4096)) * 4096;
    pages.insert(gpa);
  }
  std::vector<uint64_t> v;
  for (uint64_t p : pages) v.push_back(p + (rng() % 1024) * 4);  // anywhere in the page
  std::shuffle(v.begin(), v.end(), rng);
  return v;
}

struct Rig {
  std::unique_ptr<DirtyTestVm> vm;
  std::unique_ptr<DeviceDirty> device;
  std::unique_ptr<DirtyTracker> tracker;
};

Rig make_rig(Mode mode, uint64_t granularity = 4096, uint32_t ring_entries = 4096) {
  Rig rig;
  auto vm = DirtyTestVm::create(mode == Mode::ring ? ring_entries : 0);
  EXPECT_TRUE(vm.ok()) << vm.error().message;
  if (!vm.ok()) return rig;
  rig.vm = std::move(*vm);
  rig.device = std::make_unique<DeviceDirty>(rig.vm->ranges());
  DirtyTracker::Config config{rig.vm->slots(), granularity};
  config.use_manual_protect = mode != Mode::classic;
  auto t = DirtyTracker::create(rig.vm->vm_fd(), config, mode == Mode::ring ? rig.vm->ring() : nullptr,
                                rig.device.get());
  EXPECT_TRUE(t.ok()) << t.error().message;
  if (t.ok()) rig.tracker = std::move(*t);
  return rig;
}

std::set<uint64_t> harvest(DirtyTracker& t) {
  auto h = t.harvest();
  EXPECT_TRUE(h.ok()) << h.error().message;
  return h.ok() ? dirty_pages(*h) : std::set<uint64_t>{};
}

void rearm_all(DirtyTracker& t) {
  ASSERT_TRUE(t.rearm(0, kSlot0Size).ok());
  ASSERT_TRUE(t.rearm(kSlot1Gpa, kSlot1Size).ok());
}

class DirtyTrackerTest : public ::testing::TestWithParam<Mode> {
 protected:
  void SetUp() override {
    if (::access("/dev/kvm", R_OK | W_OK) != 0) GTEST_SKIP() << "/dev/kvm is not available";
  }
};

TEST_P(DirtyTrackerTest, EverythingDirtyAtStartThenCleanAfterRearm) {
  Rig rig = make_rig(GetParam());
  ASSERT_TRUE(rig.tracker);
  ASSERT_TRUE(rig.tracker->start_tracking().ok());
  EXPECT_EQ(harvest(*rig.tracker).size(), (kSlot0Size + kSlot1Size) / 4096);
  rearm_all(*rig.tracker);
  EXPECT_TRUE(harvest(*rig.tracker).empty());
}

TEST_P(DirtyTrackerTest, PagesWrittenByGuestShowUpInHarvest) {
  Rig rig = make_rig(GetParam());
  ASSERT_TRUE(rig.tracker);
  ASSERT_TRUE(rig.tracker->start_tracking().ok());
  rearm_all(*rig.tracker);
  std::mt19937_64 rng(1);
  auto writes = random_pages(rng, 300);
  ASSERT_TRUE(rig.vm->guest_write(writes, 0xabcd).ok());
  EXPECT_EQ(harvest(*rig.tracker), pages_of(writes));
  EXPECT_EQ(harvest(*rig.tracker), pages_of(writes)) << "harvest must not forget until rearm";
}

TEST_P(DirtyTrackerTest, test_not_losing_dirty_pages_after_rearm) {
  Rig rig = make_rig(GetParam());
  ASSERT_TRUE(rig.tracker);
  ASSERT_TRUE(rig.tracker->start_tracking().ok());
  rearm_all(*rig.tracker);
  std::mt19937_64 rng(2);
  auto first = random_pages(rng, 200);
  ASSERT_TRUE(rig.vm->guest_write(first, 1).ok());
  ASSERT_EQ(harvest(*rig.tracker), pages_of(first));
  // Rearm half of them (as a sender would before sending), leave the rest dirty.
  std::vector<uint64_t> sent(first.begin(), first.begin() + 100), kept(first.begin() + 100, first.end());
  for (uint64_t gpa : sent) ASSERT_TRUE(rig.tracker->rearm(gpa & ~4095ull, 4096).ok());
  EXPECT_EQ(harvest(*rig.tracker), pages_of(kept));
  // Written again after their rearm: they must come back, together with new pages.
  auto fresh = random_pages(rng, 50);
  std::vector<uint64_t> again(sent.begin(), sent.begin() + 40);
  again.insert(again.end(), fresh.begin(), fresh.end());
  ASSERT_TRUE(rig.vm->guest_write(again, 2).ok());
  std::set<uint64_t> want = pages_of(kept);
  for (uint64_t p : pages_of(again)) want.insert(p);
  EXPECT_EQ(harvest(*rig.tracker), want);
  // Several rounds: each round's writes, and nothing else, after a full rearm.
  for (int round = 0; round < 3; ++round) {
    rearm_all(*rig.tracker);
    auto w = random_pages(rng, 120);
    ASSERT_TRUE(rig.vm->guest_write(w, 3 + round).ok());
    EXPECT_EQ(harvest(*rig.tracker), pages_of(w)) << "round " << round;
  }
}

// rearm_bits re-protects exactly the harvested pages of a 64-page-aligned range in one
// call: scattered pages of the mask come back clean, pages outside it (dirty, or written
// after the harvest) stay dirty, and a masked page written after the rearm comes back.
TEST_P(DirtyTrackerTest, RearmBitsClearsExactlyTheMaskedPages) {
  Rig rig = make_rig(GetParam());
  ASSERT_TRUE(rig.tracker);
  ASSERT_TRUE(rig.tracker->start_tracking().ok());
  rearm_all(*rig.tracker);
  const uint64_t chunk = 0x200000;  // 512 pages, 64-page aligned in slot 0
  std::vector<uint64_t> masked, unmasked;
  for (uint64_t p = 1; p < 512; p += 37) (p % 2 ? masked : unmasked).push_back(chunk + p * 4096);
  std::vector<uint64_t> all = masked;
  all.insert(all.end(), unmasked.begin(), unmasked.end());
  ASSERT_TRUE(rig.vm->guest_write(all, 0x11).ok());
  auto h = rig.tracker->harvest();
  ASSERT_TRUE(h.ok());
  std::vector<uint64_t> mask(8, 0);
  for (uint64_t gpa : masked) mask[(gpa - chunk) / 4096 / 64] |= 1ull << ((gpa - chunk) / 4096 % 64);
  ASSERT_TRUE(rig.tracker->rearm_bits(chunk, 512, mask).ok());
  EXPECT_EQ(harvest(*rig.tracker), pages_of(unmasked));
  ASSERT_TRUE(rig.vm->guest_write({masked[0]}, 0x22).ok());
  std::set<uint64_t> want = pages_of(unmasked);
  want.insert(masked[0]);
  EXPECT_EQ(harvest(*rig.tracker), want);
  // Misaligned or partial ranges are refused before anything is cleared.
  EXPECT_FALSE(rig.tracker->rearm_bits(chunk + 4096, 64, mask).ok());
  EXPECT_FALSE(rig.tracker->rearm_bits(chunk, 100, mask).ok());
  EXPECT_FALSE(rig.tracker->rearm_bits(chunk, 512, std::span<const uint64_t>(mask).first(2)).ok());
  EXPECT_EQ(harvest(*rig.tracker), want);
}

TEST_P(DirtyTrackerTest, DeviceWritesAreMerged) {
  Rig rig = make_rig(GetParam());
  ASSERT_TRUE(rig.tracker);
  ASSERT_TRUE(rig.tracker->start_tracking().ok());
  rearm_all(*rig.tracker);
  // A "block read" of 3 pages starting mid-page touches 4 pages; another writes one byte
  // at the start of slot 1. Neither goes through the guest, so KVM never sees them.
  std::memset(rig.vm->host(0x300800), 0x5a, 3 * 4096);
  EXPECT_TRUE(rig.device->mark(0x300800, 3 * 4096));
  EXPECT_TRUE(rig.device->mark(kSlot1Gpa, 1));
  EXPECT_FALSE(rig.device->mark(kSlot0Size - 4096, 8192)) << "half outside guest RAM";
  ASSERT_TRUE(rig.vm->guest_write({0x500000}, 7).ok());
  std::set<uint64_t> want{0x300000, 0x301000, 0x302000, 0x303000, kSlot1Gpa, kSlot0Size - 4096, 0x500000};
  EXPECT_EQ(harvest(*rig.tracker), want);
  rearm_all(*rig.tracker);
  EXPECT_TRUE(harvest(*rig.tracker).empty());
}

TEST_P(DirtyTrackerTest, GranularityRoundsToWholeGranules) {
  for (uint64_t g : {uint64_t{64} << 10, uint64_t{2} << 20}) {
    Rig rig = make_rig(GetParam(), g);
    ASSERT_TRUE(rig.tracker);
    EXPECT_EQ(rig.tracker->granularity(), g);
    ASSERT_TRUE(rig.tracker->start_tracking().ok());
    rearm_all(*rig.tracker);
    std::vector<uint64_t> w{0x412345 & ~3ull, kSlot1Gpa + 0x7ff000, kSlot1Gpa + 0x200000 + 5 * 4096};
    ASSERT_TRUE(rig.vm->guest_write(w, 9).ok());
    EXPECT_EQ(harvest(*rig.tracker), pages_of(w, g)) << "granule " << g;
    auto bad = rig.tracker->rearm(0x412000, 4096);
    EXPECT_FALSE(bad.ok()) << "a partial granule must be refused";
    if (!bad.ok()) {
      EXPECT_NE(bad.error().message.find("granularity"), std::string::npos) << bad.error().message;
    }
    ASSERT_TRUE(rig.tracker->rearm(0x412345 & ~(g - 1), g).ok());
    std::vector<uint64_t> rest(w.begin() + 1, w.end());
    EXPECT_EQ(harvest(*rig.tracker), pages_of(rest, g));
  }
}

TEST_P(DirtyTrackerTest, StopAndRestart) {
  Rig rig = make_rig(GetParam());
  ASSERT_TRUE(rig.tracker);
  EXPECT_FALSE(rig.tracker->harvest().ok()) << "harvest before start";
  ASSERT_TRUE(rig.tracker->start_tracking().ok());
  EXPECT_FALSE(rig.tracker->start_tracking().ok());
  ASSERT_TRUE(rig.tracker->stop_tracking().ok());
  ASSERT_TRUE(rig.vm->guest_write({0x200000}, 1).ok());
  ASSERT_TRUE(rig.tracker->start_tracking().ok());
  EXPECT_EQ(harvest(*rig.tracker).size(), (kSlot0Size + kSlot1Size) / 4096);
  rearm_all(*rig.tracker);
  ASSERT_TRUE(rig.vm->guest_write({0x200000}, 2).ok());
  EXPECT_EQ(harvest(*rig.tracker), std::set<uint64_t>{0x200000});
}

INSTANTIATE_TEST_SUITE_P(Modes, DirtyTrackerTest, ::testing::Values(Mode::manual, Mode::classic, Mode::ring),
                         [](const auto& info) {
                           return std::string(info.param == Mode::manual    ? "bitmap_manual"
                                              : info.param == Mode::classic ? "bitmap_classic"
                                                                            : "ring");
                         });

class DirtyRingTest : public DirtyTrackerTest {};

TEST_F(DirtyRingTest, RingHarvestEqualsBitmapHarvest) {
  Rig bitmap = make_rig(Mode::manual), ring = make_rig(Mode::ring);
  ASSERT_TRUE(bitmap.tracker && ring.tracker);
  ASSERT_TRUE(bitmap.tracker->start_tracking().ok());
  ASSERT_TRUE(ring.tracker->start_tracking().ok());
  rearm_all(*bitmap.tracker);
  rearm_all(*ring.tracker);
  std::mt19937_64 rng(3);
  for (int round = 0; round < 3; ++round) {
    auto w = random_pages(rng, 400);
    w.insert(w.end(), w.begin(), w.begin() + 100);  // pages written twice
    ASSERT_TRUE(bitmap.vm->guest_write(w, round).ok());
    ASSERT_TRUE(ring.vm->guest_write(w, round).ok());
    auto a = bitmap.tracker->harvest(), b = ring.tracker->harvest();
    ASSERT_TRUE(a.ok() && b.ok());
    ASSERT_EQ(a->size(), b->size());
    for (size_t i = 0; i < a->size(); ++i) EXPECT_EQ((*a)[i].bits, (*b)[i].bits) << "slot " << i;
    EXPECT_EQ(dirty_pages(*b), pages_of(w));
    rearm_all(*bitmap.tracker);
    rearm_all(*ring.tracker);
  }
}

TEST_F(DirtyRingTest, RingFullExitsLoseNothing) {
  // The smallest ring KVM takes (one page of entries, more where PML reserves entries).
  Rig rig;
  for (uint32_t entries = 256; entries <= 4096 && !rig.tracker; entries *= 2) {
    auto vm = DirtyTestVm::create(entries);
    if (!vm.ok()) continue;
    rig = make_rig(Mode::ring, 4096, entries);
  }
  ASSERT_TRUE(rig.tracker);
  ASSERT_TRUE(rig.tracker->start_tracking().ok());
  rearm_all(*rig.tracker);
  std::mt19937_64 rng(4);
  auto w = random_pages(rng, rig.vm->ring()->entries() * 3);
  auto r = rig.vm->guest_write(w, 11, /*exit_each=*/true);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_GE(rig.vm->ring_full_exits(), 2u);
  EXPECT_EQ(rig.vm->ring()->ring_full_count(), rig.vm->ring_full_exits());
  EXPECT_EQ(harvest(*rig.tracker), pages_of(w));
}

TEST_F(DirtyRingTest, BadRingSizesAreRefusedClearly) {
  auto vm = DirtyTestVm::create(0);
  ASSERT_TRUE(vm.ok()) << vm.error().message;
  auto r = DirtyRingLog::enable((*vm)->vm_fd(), 1000);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("power of two"), std::string::npos) << r.error().message;
  // The VM already has its vCPU: KVM refuses a ring now, and the error says why.
  auto late = DirtyRingLog::enable((*vm)->vm_fd(), 4096);
  ASSERT_FALSE(late.ok());
  EXPECT_NE(late.error().message.find("KVM_ENABLE_CAP"), std::string::npos) << late.error().message;
}

}  // namespace
}  // namespace kvmig::kvm
