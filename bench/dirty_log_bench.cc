// Cost of write tracing on a 1 GiB slot: harvest and rearm in each mode, rearm per 4 KiB
// page vs per 2 MiB granule, and the guest's slowdown with tracing on. The guest is the
// table-driven writer of tests/integration/dirty_test_vm.h (32-bit, CPL0): on kvm-pvm that
// code is emulated, so guest times there measure the emulator more than the tracing; run
// it on hardware KVM for numbers that mean something for real guests.
#include <chrono>
#include <cstdio>
#include <functional>

#include "dirty_test_vm.h"

using namespace kvmig::kvm;
using testing::DirtyTestVm;
using testing::kSlot1Gpa;

namespace {

constexpr uint64_t kSlot = 1ull << 30;

double ms(const std::function<void()>& f) {
  auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

void check(const kvmig::Result<void>& r, const char* what) {
  if (!r.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, r.error().message.c_str());
    std::exit(1);
  }
}

std::vector<uint64_t> every(uint64_t stride_pages) {
  std::vector<uint64_t> v;
  for (uint64_t off = 0; off < kSlot; off += stride_pages * 4096) v.push_back(kSlot1Gpa + off);
  return v;
}

uint64_t count(const std::vector<DirtyBitmap>& maps) {
  uint64_t n = 0;
  for (const auto& m : maps)
    for (uint64_t w : m.bits) n += __builtin_popcountll(w);
  return n;
}

void run(const char* name, uint32_t ring_entries, bool manual, uint64_t granularity) {
  auto vm = DirtyTestVm::create(ring_entries, kSlot);
  check(vm.ok() ? kvmig::ok() : kvmig::Result<void>(vm.error()), "create VM");
  DeviceDirty device((*vm)->ranges());
  DirtyTracker::Config config{(*vm)->slots(), granularity};
  config.use_manual_protect = manual;
  auto t = DirtyTracker::create((*vm)->vm_fd(), config, (*vm)->ring(), &device);
  check(t.ok() ? kvmig::ok() : kvmig::Result<void>(t.error()), "create tracker");
  DirtyTracker& tr = **t;
  const auto sparse = every(16);  // 16384 pages, 1 in 16: 64 MiB of a 1 GiB slot dirtied
  // Fault everything in first, so rearm has real mappings to write-protect.
  check((*vm)->guest_write(every(1), 1), "touch all");
  double off = ms([&] { check((*vm)->guest_write(sparse, 2), "write off"); });
  double start = ms([&] { check(tr.start_tracking(), "start"); });
  std::vector<DirtyBitmap> h;
  double harvest_all = ms([&] { h = *tr.harvest(); });
  double rearm_all = ms([&] {
    check(tr.rearm(0, testing::kSlot0Size), "rearm");
    check(tr.rearm(kSlot1Gpa, kSlot), "rearm");
  });
  double harvest_clean = ms([&] { h = *tr.harvest(); });
  double on = ms([&] { check((*vm)->guest_write(sparse, 3), "write on"); });
  double harvest_sparse = ms([&] { h = *tr.harvest(); });
  const uint64_t dirty = count(h);
  // Rearm as a sender would: each dirty granule on its own, just before sending it.
  uint64_t calls = 0;
  double rearm_each = ms([&] {
    for (const DirtyBitmap& m : h)
      for (uint64_t p = 0; p < m.pages; p += granularity / 4096)
        if (m.bits[p / 64] & (1ull << (p % 64))) {
          check(tr.rearm(m.gpa + p * 4096, granularity), "rearm granule");
          ++calls;
        }
  });
  std::printf("%-26s %8.2f %8.2f %8.2f %8.2f %8.2f %7llu %8.2f %7llu %8.1f %8.1f\n", name, start, harvest_all,
              rearm_all, harvest_clean, harvest_sparse, (unsigned long long)dirty, rearm_each,
              (unsigned long long)calls, off, on);
}

}  // namespace

int main() {
  if (::access("/dev/kvm", R_OK | W_OK) != 0) {
    std::fprintf(stderr, "dirty_log_bench: /dev/kvm is not available\n");
    return 1;
  }
  std::printf("1 GiB slot (+16 MiB); guest dirties 16384 pages (1 in 16); times in ms\n");
  std::printf("%-26s %8s %8s %8s %8s %8s %7s %8s %7s %8s %8s\n", "mode", "start", "harv-all", "rearm-1G",
              "harv-0", "harv-16K", "dirty", "rearm-ea", "calls", "guest-off", "guest-on");
  run("bitmap manual 4K", 0, true, 4096);
  run("bitmap manual 2M", 0, true, 2 << 20);
  run("bitmap classic 4K", 0, false, 4096);
  run("ring 65536 4K", 65536, true, 4096);
  run("ring 65536 2M", 65536, true, 2 << 20);
}
