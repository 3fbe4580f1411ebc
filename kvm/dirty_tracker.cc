#include "kvm/dirty_tracker.h"

#include <algorithm>
#include <cstdio>
#include <string>

namespace kvmig::kvm {
namespace {

std::string hex(uint64_t v) {
  char buf[24];
  snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

void round_to_granules(std::vector<uint64_t>& bits, uint64_t pages, uint64_t granule_pages) {
  const uint64_t words = (pages + 63) / 64;
  if (bits.size() < words) bits.resize(words, 0);
  if (granule_pages > 1 && granule_pages < 64) {
    const uint64_t m = (1ull << granule_pages) - 1;
    for (uint64_t i = 0; i < words; ++i) {
      const uint64_t w = bits[i];
      if (w == 0) continue;
      uint64_t r = 0;
      for (uint64_t k = 0; k < 64; k += granule_pages)
        if ((w >> k) & m) r |= m << k;
      bits[i] = r;
    }
  } else if (granule_pages >= 64) {
    const uint64_t per = granule_pages / 64;
    for (uint64_t g = 0; g < words; g += per) {
      const uint64_t end = std::min(g + per, words);
      bool any = false;
      for (uint64_t i = g; i < end && !any; ++i) any = bits[i] != 0;
      if (any) std::fill(bits.begin() + g, bits.begin() + end, ~0ull);
    }
  }
  if (pages % 64 && words > 0) bits[words - 1] &= (1ull << (pages % 64)) - 1;
}

Result<std::unique_ptr<DirtyTracker>> DirtyTracker::create(int vm_fd, Config config, DirtyRingLog* ring,
                                                           DeviceDirty* device) {
  const uint64_t g = config.granularity;
  if (g < kMinTraceGranularity || g > kMaxTraceGranularity || (g & (g - 1)) != 0)
    return Error{"trace granularity " + std::to_string(g) + ": must be a power of two from 4096 to 2097152"};
  if (config.slots.empty()) return Error{"dirty tracker: no memory slots to track"};
  std::unique_ptr<DirtyTracker> t(new DirtyTracker(vm_fd, g, ring, device));
  for (const LoggedSlot& s : config.slots) {
    if (s.size == 0 || s.size % kDirtyPageSize != 0 || s.gpa % g != 0)
      return Error{"dirty tracker: slot " + std::to_string(s.slot) + " at " + hex(s.gpa) + " size " +
                   hex(s.size) + " is not aligned to the trace granularity " + std::to_string(g)};
    Slot slot{s, std::make_unique<std::atomic<uint64_t>[]>(s.words()), std::vector<uint64_t>(s.words())};
    for (uint64_t i = 0; i < s.words(); ++i) slot.pending[i].store(0, std::memory_order_relaxed);
    t->slots_.push_back(std::move(slot));
  }
  if (!ring) {
    KVMIG_ASSIGN(DirtyBitmapLog log, DirtyBitmapLog::create(vm_fd, config.allow_classic_bitmap, config.use_manual_protect));
    t->bitmap_.emplace(log);
  }
  return t;
}

DirtyTracker::~DirtyTracker() {
  if (tracking()) (void)stop_tracking();
  if (ring_) ring_->set_sink(nullptr);
}

std::string DirtyTracker::mode_name() const {
  if (ring_) return "ring " + std::to_string(ring_->entries());
  return std::string("bitmap ") + DirtyBitmapLog::mode_name(bitmap_->mode());
}

bool DirtyTracker::tracking() const {
  std::lock_guard lock(mu_);
  return tracking_;
}

void DirtyTracker::on_ring_entry(uint32_t kvm_slot, uint64_t page_offset) {
  if ((kvm_slot >> 16) != 0) return;  // address space 1 is SMM; the VMM has no SMM memory
  const uint32_t id = kvm_slot & 0xffff;
  for (Slot& s : slots_) {
    if (s.slot.slot != id) continue;
    if (page_offset < s.slot.pages())
      s.pending[page_offset / 64].fetch_or(1ull << (page_offset % 64), std::memory_order_relaxed);
    return;
  }
}

Result<void> DirtyTracker::set_logging(bool on) {
  for (const Slot& s : slots_) KVMIG_TRY(set_slot_logging(vm_fd_, s.slot, on));
  return ok();
}

Result<void> DirtyTracker::start_tracking() {
  std::lock_guard lock(mu_);
  if (tracking_) return Error{"start_tracking: dirty tracking is already on"};
  // Every page starts dirty: the first pass must send all of guest memory.
  for (Slot& s : slots_) {
    for (uint64_t i = 0; i < s.slot.words(); ++i) s.pending[i].store(~0ull, std::memory_order_relaxed);
    if (s.slot.pages() % 64)
      s.pending[s.slot.words() - 1].store((1ull << (s.slot.pages() % 64)) - 1, std::memory_order_relaxed);
    if (device_) device_->drain(s.slot.gpa, s.slot.pages(), s.scratch.data());  // already covered
  }
  if (ring_) ring_->set_sink([this](uint32_t slot, uint64_t off) { on_ring_entry(slot, off); });
  auto r = set_logging(true);
  if (!r.ok()) {
    (void)set_logging(false);
    if (ring_) ring_->set_sink(nullptr);
    return std::move(r.error().prefix("start_tracking"));
  }
  tracking_ = true;
  return ok();
}

Result<void> DirtyTracker::stop_tracking() {
  std::lock_guard lock(mu_);
  if (!tracking_) return ok();
  tracking_ = false;
  auto r = set_logging(false);
  if (ring_) {
    // Entries pushed before logging went off would hold ring space forever.
    auto c = ring_->collect();
    ring_->set_sink(nullptr);
    if (r.ok() && !c.ok()) return std::move(c.error().prefix("stop_tracking"));
  }
  if (!r.ok()) return std::move(r.error().prefix("stop_tracking"));
  return ok();
}

Result<std::vector<DirtyBitmap>> DirtyTracker::harvest() {
  std::lock_guard lock(mu_);
  if (!tracking_) return Error{"harvest: dirty tracking is not started"};
  if (ring_) KVMIG_TRY(ring_->collect());
  std::vector<DirtyBitmap> out;
  out.reserve(slots_.size());
  for (Slot& s : slots_) {
    const uint64_t words = s.slot.words();
    if (bitmap_) {
      KVMIG_TRY(bitmap_->fetch(s.slot, s.scratch.data()));
    } else {
      std::fill(s.scratch.begin(), s.scratch.end(), 0);
    }
    if (device_) device_->drain(s.slot.gpa, s.slot.pages(), s.scratch.data());
    DirtyBitmap bm{s.slot.slot, s.slot.gpa, s.slot.pages(), std::vector<uint64_t>(words)};
    for (uint64_t i = 0; i < words; ++i) {
      const uint64_t add = s.scratch[i];
      bm.bits[i] = add ? s.pending[i].fetch_or(add, std::memory_order_relaxed) | add
                       : s.pending[i].load(std::memory_order_relaxed);
    }
    round_to_granules(bm.bits, bm.pages, granularity_ / kDirtyPageSize);
    out.push_back(std::move(bm));
  }
  return out;
}

Result<void> DirtyTracker::rearm(uint64_t gpa, uint64_t len) {
  std::lock_guard lock(mu_);
  const std::string what = "rearm [" + hex(gpa) + ", +" + hex(len) + ")";
  if (!tracking_) return Error{what + ": dirty tracking is not started"};
  if (len == 0) return ok();
  if (gpa + len < gpa) return Error{what + ": range wraps around"};
  bool touched = false;
  for (Slot& s : slots_) {
    const uint64_t slot_end = s.slot.gpa + s.slot.size;
    const uint64_t lo = std::max(gpa, s.slot.gpa), hi = std::min(gpa + len, slot_end);
    if (lo >= hi) continue;
    // A partial granule would clear pages the sender is not about to send: refuse it.
    if ((lo - s.slot.gpa) % granularity_ != 0 || ((hi - s.slot.gpa) % granularity_ != 0 && hi != slot_end))
      return Error{what + ": not aligned to the trace granularity " + std::to_string(granularity_) +
                   " in slot " + std::to_string(s.slot.slot)};
    touched = true;
    const uint64_t first = (lo - s.slot.gpa) / kDirtyPageSize, end = (hi - s.slot.gpa) / kDirtyPageSize;
    if (bitmap_) KVMIG_TRY(bitmap_->clear(s.slot, first, end - first));
    for (uint64_t p = first; p < end;) {
      const uint64_t bit = p % 64, n = std::min<uint64_t>(64 - bit, end - p);
      const uint64_t m = (n == 64 ? ~0ull : ((1ull << n) - 1)) << bit;
      s.pending[p / 64].fetch_and(~m, std::memory_order_relaxed);
      p += n;
    }
  }
  if (!touched) return Error{what + ": not in guest RAM"};
  return ok();
}

Result<void> DirtyTracker::rearm_bits(uint64_t gpa, uint64_t pages, std::span<const uint64_t> bits) {
  std::lock_guard lock(mu_);
  const std::string what = "rearm bits [" + hex(gpa) + ", " + std::to_string(pages) + " pages)";
  if (!tracking_) return Error{what + ": dirty tracking is not started"};
  if (pages == 0) return ok();
  if (bits.size() < (pages + 63) / 64) return Error{what + ": bitmap shorter than the range"};
  for (Slot& s : slots_) {
    if (gpa < s.slot.gpa || gpa >= s.slot.gpa + s.slot.size) continue;
    const uint64_t first = (gpa - s.slot.gpa) / kDirtyPageSize;
    if ((gpa - s.slot.gpa) % kDirtyPageSize != 0 || first % 64 != 0 ||
        (gpa - s.slot.gpa) % granularity_ != 0)
      return Error{what + ": must start on a 64-page word and a granule of slot " +
                   std::to_string(s.slot.slot)};
    if (pages > s.slot.pages() - first) return Error{what + ": runs past the end of slot " + std::to_string(s.slot.slot)};
    const uint64_t end = first + pages;
    if (pages % 64 != 0 && end != s.slot.pages())
      return Error{what + ": must span whole 64-page words or end at the slot's end"};
    if (bitmap_) KVMIG_TRY(bitmap_->clear_mask(s.slot, first, pages, bits.data()));
    for (uint64_t w = 0; w < (pages + 63) / 64; ++w)
      if (bits[w]) s.pending[first / 64 + w].fetch_and(~bits[w], std::memory_order_relaxed);
    return ok();
  }
  return Error{what + ": not in guest RAM"};
}

}  // namespace kvmig::kvm
