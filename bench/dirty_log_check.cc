// dirty_log_check: does KVM's dirty log lose a guest write, with kvmig's network,
// compression and destination out of the picture?
//
// A live migration was seen (rarely, on a loaded host) to end with pages at the destination
// holding their last-live-round copy while the source had a newer one that the paused
// harvest never reported. This program runs the same memory "migration" against an
// in-memory shadow of guest RAM instead of a destination: the test guest writes on N vCPUs;
// tracking starts as helper/migration_source_setup.cc starts it (bitmap, manual protect +
// initially set, or the dirty ring); each round harvests, then per 2 MiB chunk re-arms
// exactly the harvested bits (DirtyTracker::rearm_bits, as helper/page_sender.cc does)
// and only then copies those pages into the shadow, chunks spread over --streams threads
// as kvmig's streams spread them. Then the VM is paused (through helper::VcpuThrottle's
// stop_paused, as the switch-over does), the last harvest is copied, and the shadow must
// equal guest RAM. A page that differs was written after its rearm and never logged.
// Pages written while paused (which would make a difference meaningless) are counted too.
//
// --copy-first swaps copy and rearm (a known-wrong order) to show the check catches a loss.
//
// Exit status: 0 no page lost in any iteration, 1 some lost, 125 setup error.
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <linux/kvm.h>

#include "helper/vcpu_throttle.h"
#include "kvm/dirty_tracker.h"
#include "kvm/machine.h"

using namespace kvmig;
using Clock = std::chrono::steady_clock;

namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kChunkPages = (2ull << 20) / kPage;  // helper/page_sender.h's kChunkSize
constexpr uint64_t kSerialRoundPages = 4096;           // page_sender: smaller rounds use one thread
constexpr uint64_t kTagMagic = 0x6b76;                  // tests/guests/guest.h PAGE_TAG's top 16 bits

struct Options {
  int iterations = 100;
  int per_vm = 10;  // iterations on one VM (tracking stopped and restarted) before a fresh one
  int rounds = 3;
  int delay_ms = 20;
  int vcpus = 2;
  int streams = 4;  // kvmig migrate's default
  std::string memory = "256M";
  std::string cmdline;  // default: "ws=64M pattern=hotcold vcpus=<--vcpus> passes=0 report_ms=50"
  std::string guest = KVMIG_GUEST64;
  uint32_t ring = 0;  // dirty ring entries; 0 = bitmap
  int busy = 0;
  double throttle = 0;
  int max_report = 32;
  bool copy_first = false;  // negative control: the wrong order, which must lose writes
};

// What the guest says on its console: its layout, progress, and any fault it detects.
struct GuestWatch {
  std::mutex mu;
  uint64_t ws_pages = 0;
  int vcpus = 0;
  std::vector<uint64_t> passes = std::vector<uint64_t>(64, 0);
  uint64_t bad_lines = 0;

  void feed(std::string_view view) {
    std::string line(view);
    std::lock_guard lock(mu);
    unsigned long long a = 0;
    int v = 0, n = 0;
    if (std::sscanf(line.c_str(), "kvmig-guest: start vcpus=%d ws_pages=%llu", &v, &a) == 2) {
      vcpus = v;
      ws_pages = a;
    } else if (std::sscanf(line.c_str(), "kvmig-guest: pass vcpu=%d n=%d", &v, &n) == 2) {
      if (v >= 0 && v < 64) passes[v] = n;
    } else if (line.find("corrupt") != std::string::npos || line.find("error") == 13 ||
               line.find("fault") == 13 || line.find("done") == 13) {
      ++bad_lines;
      std::fprintf(stderr, "guest: %s\n", line.c_str());
    }
  }
  bool warmed_up() {
    std::lock_guard lock(mu);
    if (vcpus == 0) return false;
    for (int i = 0; i < vcpus; ++i)
      if (passes[i] < 1) return false;
    return true;
  }
  // The vCPU whose slice holds working-set page P (docs/guest.md: vCPU i owns [i*P/N, (i+1)*P/N)).
  int owner(uint64_t page) {
    std::lock_guard lock(mu);
    for (int i = 0; i < vcpus; ++i)
      if (page >= i * ws_pages / vcpus && page < (i + 1) * ws_pages / vcpus) return i;
    return -1;
  }
};

// K processes doing what `yes >/dev/null` does: the load of the failing runs. Processes,
// not threads: each switch between them and a vCPU thread is a switch of address space
// (CR3, PCID) on the host CPU, as with the real `yes` loops, which threads would not do.
class Busy {
 public:
  explicit Busy(int k) {
    for (int i = 0; i < k; ++i) {
      pid_t pid = ::fork();
      if (pid == 0) {
        int fd = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
        char buf[8192];
        for (size_t j = 0; j < sizeof buf; j += 2) buf[j] = 'y', buf[j + 1] = '\n';
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the check
        for (;;) (void)!::write(fd, buf, sizeof buf);
      }
      if (pid > 0) pids_.push_back(pid);
    }
  }
  ~Busy() {
    for (pid_t pid : pids_) ::kill(pid, SIGKILL);
    for (pid_t pid : pids_) ::waitpid(pid, nullptr, 0);
  }

 private:
  std::vector<pid_t> pids_;
};

// The destination, reduced to a copy of guest RAM, and which round last copied each page.
struct Shadow {
  uint64_t gpa = 0, pages = 0;
  const uint8_t* host = nullptr;
  std::vector<uint8_t> copy;
  std::vector<uint8_t> last_round;
};

struct Tally {
  uint64_t copied = 0, lost = 0, paused_writes = 0, final_pages = 0;
  double ms = 0;
};

uint64_t popcount(const std::vector<uint64_t>& bits) {
  uint64_t n = 0;
  for (uint64_t w : bits) n += __builtin_popcountll(w);
  return n;
}

// One round's work on chunks `chunk % nstreams == s`: rearm the chunk's harvested bits (if
// REARM), then copy its dirty pages, exactly page_sender's order.
Result<uint64_t> copy_stream(kvm::DirtyTracker& tr, const kvm::DirtyBitmap& b, Shadow& sh, uint8_t round, bool rearm,
                             bool copy_first, size_t s, size_t nstreams) {
  uint64_t copied = 0;
  for (uint64_t first = 0; first < b.pages; first += kChunkPages) {
    if (((b.gpa / kPage + first) / kChunkPages) % nstreams != s) continue;
    const uint64_t end = std::min(first + kChunkPages, b.pages);
    std::span<const uint64_t> words(b.bits.data() + first / 64, (end - first + 63) / 64);
    if (std::all_of(words.begin(), words.end(), [](uint64_t w) { return w == 0; })) continue;
    if (rearm && !copy_first) KVMIG_TRY(tr.rearm_bits(b.gpa + first * kPage, end - first, words));
    for (uint64_t p = first; p < end; ++p) {
      if (!((b.bits[p / 64] >> (p % 64)) & 1)) continue;
      std::memcpy(sh.copy.data() + p * kPage, sh.host + p * kPage, kPage);
      sh.last_round[p] = round;
      ++copied;
    }
    if (rearm && copy_first) KVMIG_TRY(tr.rearm_bits(b.gpa + first * kPage, end - first, words));
  }
  return copied;
}

Result<uint64_t> copy_round(kvm::DirtyTracker& tr, const std::vector<kvm::DirtyBitmap>& dirty,
                            std::vector<Shadow>& shadows, uint8_t round, bool rearm, bool copy_first, int streams) {
  if (dirty.size() != shadows.size()) return Error{"harvest returned " + std::to_string(dirty.size()) + " slots"};
  uint64_t pages = 0;
  for (const auto& b : dirty) pages += popcount(b.bits);
  const size_t n = pages <= kSerialRoundPages ? 1 : static_cast<size_t>(streams);
  std::mutex mu;
  std::optional<Error> first;
  uint64_t copied = 0;
  auto run = [&](size_t s) {
    for (size_t i = 0; i < dirty.size(); ++i) {
      auto r = copy_stream(tr, dirty[i], shadows[i], round, rearm, copy_first, s, n);
      std::lock_guard lock(mu);
      if (!r.ok()) {
        if (!first) first = r.error();
        return;
      }
      copied += *r;
    }
  };
  std::vector<std::thread> threads;
  for (size_t s = 1; s < n; ++s) threads.emplace_back(run, s);
  run(0);
  for (auto& t : threads) t.join();
  if (first) return *first;
  return copied;
}

void print_page(const Shadow& sh, uint64_t p, GuestWatch& gw) {
  const uint8_t* src = sh.host + p * kPage;
  const uint8_t* dst = sh.copy.data() + p * kPage;
  uint64_t tag;
  std::memcpy(&tag, src, 8);
  char owner[48] = "vcpu ?";
  if ((tag >> 48) == kTagMagic) {
    const uint64_t wp = tag & ((1ull << 48) - 1);
    std::snprintf(owner, sizeof owner, "ws page %llu vcpu %d", static_cast<unsigned long long>(wp), gw.owner(wp));
  }
  const uint64_t gpa = sh.gpa + p * kPage;
  std::printf("  lost gpa 0x%llx chunk %llu (%s) last copied in round %u\n    guest :",
              static_cast<unsigned long long>(gpa), static_cast<unsigned long long>(gpa >> 21), owner,
              sh.last_round[p]);
  for (int i = 0; i < 16; ++i) std::printf(" %02x", src[i]);
  std::printf("\n    shadow:");
  for (int i = 0; i < 16; ++i) std::printf(" %02x", dst[i]);
  std::printf("\n");
}

// One migration of memory into the shadows. The VM runs on entry and on a clean return.
Result<Tally> migrate_once(kvm::Machine& vm, kvm::DirtyTracker& tr, std::vector<Shadow>& shadows, const Options& o,
                          GuestWatch& gw) {
  const auto t0 = Clock::now();
  Tally t;
  helper::VcpuThrottle throttle(vm);
  KVMIG_TRY(tr.start_tracking());
  if (o.throttle > 0) throttle.set(o.throttle);
  for (int r = 1; r <= o.rounds; ++r) {
    KVMIG_ASSIGN(std::vector<kvm::DirtyBitmap> dirty, tr.harvest());
    KVMIG_ASSIGN(uint64_t n, copy_round(tr, dirty, shadows, static_cast<uint8_t>(r), true, o.copy_first, o.streams));
    t.copied += n;
    std::this_thread::sleep_for(std::chrono::milliseconds(o.delay_ms));
  }
  KVMIG_TRY(throttle.stop_paused());
  // The switch-over: last harvest while paused, copied without a rearm (tracker == nullptr
  // in page_sender's final round).
  KVMIG_ASSIGN(std::vector<kvm::DirtyBitmap> fin, tr.harvest());
  KVMIG_ASSIGN(t.final_pages, copy_round(tr, fin, shadows, static_cast<uint8_t>(o.rounds + 1), false, false, o.streams));
  t.copied += t.final_pages;
  // Rearm everything, so that the harvest after the comparison shows any write made while
  // "paused": a difference is only a lost logged write if nothing wrote then.
  for (const Shadow& sh : shadows) KVMIG_TRY(tr.rearm(sh.gpa, sh.pages * kPage));
  int reported = 0;
  for (Shadow& sh : shadows)
    for (uint64_t p = 0; p < sh.pages; ++p) {
      if (std::memcmp(sh.copy.data() + p * kPage, sh.host + p * kPage, kPage) == 0) continue;
      ++t.lost;
      if (reported++ < o.max_report) print_page(sh, p, gw);
    }
  KVMIG_ASSIGN(std::vector<kvm::DirtyBitmap> after, tr.harvest());
  for (const auto& b : after) t.paused_writes += popcount(b.bits);
  KVMIG_TRY(tr.stop_tracking());
  KVMIG_TRY(vm.resume());
  t.ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  return t;
}

struct Totals {
  int iterations = 0, with_lost = 0, with_paused_writes = 0;
  uint64_t lost = 0, paused_writes = 0, copied = 0, guest_bad = 0;
};

// A fresh VM, booted and warmed up (pass 1 done on every vCPU), then `count` iterations.
Result<void> run_vm(const Options& o, int first_iter, int count, Totals& tot) {
  // Before the machine: its vCPU threads call the console listener until it is destroyed.
  GuestWatch gw;
  KVMIG_ASSIGN(uint64_t mem, kvm::parse_size(o.memory));
  kvm::MachineConfig mc;
  mc.memory = mem;
  mc.vcpus = o.vcpus;
  mc.dirty_ring_entries = o.ring;
  mc.console_path = "/dev/null";
  KVMIG_ASSIGN(std::unique_ptr<kvm::Machine> m, kvm::Machine::create(mc));
  kvm::Machine& vm = *m;
  vm.set_console_listener([&gw](std::string_view l) { gw.feed(l); });
  KVMIG_TRY(vm.load_kernel(o.guest, o.cmdline));
  // As helper/migration_source_setup.cc: the tracker (and in bitmap mode manual protect)
  // before any logging is on.
  kvm::DirtyTracker::Config tc;
  tc.granularity = 4096;
  std::vector<Shadow> shadows;
  for (const auto& r : vm.memory().regions()) {
    tc.slots.push_back({r.slot, r.gpa, r.size, r.host, vm.memory().slot_flags(r.slot) & ~uint32_t{KVM_MEM_LOG_DIRTY_PAGES}});
    Shadow sh;
    sh.gpa = r.gpa;
    sh.pages = r.size / kPage;
    sh.host = r.host;
    sh.copy.assign(r.size, 0);
    sh.last_round.assign(sh.pages, 0);
    shadows.push_back(std::move(sh));
  }
  kvm::DirtyRingLog* ring = o.ring ? vm.dirty_ring() : nullptr;
  if (o.ring && !ring) return Error{"the VM has no dirty ring"};
  KVMIG_ASSIGN(std::unique_ptr<kvm::DirtyTracker> tr, kvm::DirtyTracker::create(vm.vm_fd(), tc, ring, &vm.device_dirty()));
  KVMIG_TRY(vm.start());
  const auto boot = Clock::now();
  while (!gw.warmed_up()) {
    if (Clock::now() - boot > std::chrono::seconds(180)) return Error{"the guest did not finish its first pass in 180 s"};
    {
      std::lock_guard lock(gw.mu);
      if (gw.bad_lines) return Error{"the guest failed before its first pass (its console line is above)"};
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  std::printf("vm: %s, booted and warm in %.1f s\n", tr->mode_name().c_str(),
              std::chrono::duration<double>(Clock::now() - boot).count());
  for (int i = 0; i < count; ++i) {
    for (Shadow& sh : shadows) std::fill(sh.last_round.begin(), sh.last_round.end(), 0);
    KVMIG_ASSIGN(Tally t, migrate_once(vm, *tr, shadows, o, gw));
    ++tot.iterations;
    tot.copied += t.copied;
    tot.lost += t.lost;
    tot.paused_writes += t.paused_writes;
    if (t.lost) ++tot.with_lost;
    if (t.paused_writes) ++tot.with_paused_writes;
    std::printf("iter %d: copied %llu pages (final %llu), lost %llu, written while paused %llu, %.0f ms\n",
                first_iter + i, static_cast<unsigned long long>(t.copied), static_cast<unsigned long long>(t.final_pages),
                static_cast<unsigned long long>(t.lost), static_cast<unsigned long long>(t.paused_writes), t.ms);
    std::fflush(stdout);
    std::this_thread::sleep_for(std::chrono::milliseconds(o.delay_ms));
  }
  vm.stop(0);
  auto status = vm.wait();
  if (!status.ok()) return Error{"the VM ended with an error: " + status.error().message};
  tot.guest_bad += gw.bad_lines;
  return ok();
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"Checks KVM's dirty log: pre-copy rounds into an in-memory shadow, pause, compare"};
  app.add_option("--iterations", o.iterations, "migrations to check")->check(CLI::Range(1, 1000000));
  app.add_option("--per-vm", o.per_vm, "iterations on one VM before a fresh one")->check(CLI::Range(1, 1000000));
  app.add_option("--rounds", o.rounds, "live rounds before the pause")->check(CLI::Range(1, 250));
  app.add_option("--delay-ms", o.delay_ms, "guest run time after each round")->check(CLI::Range(0, 60000));
  app.add_option("--vcpus", o.vcpus, "vCPUs (the guest's vcpus= should match)")->check(CLI::Range(1, 32));
  app.add_option("--streams", o.streams, "threads rearming and copying, one per kvmig stream")->check(CLI::Range(1, 64));
  app.add_option("--memory", o.memory, "guest RAM (K/M/G)");
  app.add_option("--cmdline", o.cmdline, "test guest command line (docs/guest.md); its vcpus= must match");
  app.add_option("--guest", o.guest, "guest ELF")->check(CLI::ExistingFile);
  app.add_option("--ring", o.ring, "use the dirty ring with N entries per vCPU (power of two)");
  app.add_option("--busy", o.busy, "host load: K processes writing to /dev/null like yes")->check(CLI::Range(0, 256));
  app.add_option("--throttle", o.throttle, "stun fraction during rounds (helper::VcpuThrottle)")->check(CLI::Range(0.0, 0.95));
  app.add_option("--max-report", o.max_report, "lost pages printed per iteration")->check(CLI::Range(0, 1 << 30));
  app.add_flag("--copy-first", o.copy_first,
               "negative control: copy each chunk BEFORE its rearm, so writes in between are lost");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "dirty_log_check: %s\n", e.what());
    return 125;
  }
  if (o.cmdline.empty())
    o.cmdline = "ws=64M pattern=hotcold vcpus=" + std::to_string(o.vcpus) + " passes=0 report_ms=50";
  if (o.ring && (o.ring & (o.ring - 1))) {
    std::fprintf(stderr, "dirty_log_check: --ring %u is not a power of two\n", o.ring);
    return 125;
  }
  if (::access("/dev/kvm", R_OK | W_OK) != 0) {
    std::fprintf(stderr, "dirty_log_check: /dev/kvm is not available\n");
    return 125;
  }
  std::printf("dirty_log_check: %d iterations, %d per VM, %d rounds %d ms apart, %d vCPUs, %d streams, %s, busy %d, "
              "throttle %.2f, cmdline \"%s\"\n",
              o.iterations, o.per_vm, o.rounds, o.delay_ms, o.vcpus, o.streams,
              o.ring ? ("ring " + std::to_string(o.ring)).c_str() : "bitmap", o.busy, o.throttle, o.cmdline.c_str());
  Busy busy(o.busy);
  Totals tot;
  for (int i = 0; i < o.iterations; i += o.per_vm) {
    auto r = run_vm(o, i + 1, std::min(o.per_vm, o.iterations - i), tot);
    if (!r.ok()) {
      std::fprintf(stderr, "dirty_log_check: %s\n", r.error().message.c_str());
      return 125;
    }
  }
  std::printf("summary: iterations %d, with lost pages %d (%llu pages), with writes while paused %d (%llu pages), "
              "pages copied %llu, guest error lines %llu\n",
              tot.iterations, tot.with_lost, static_cast<unsigned long long>(tot.lost), tot.with_paused_writes,
              static_cast<unsigned long long>(tot.paused_writes), static_cast<unsigned long long>(tot.copied),
              static_cast<unsigned long long>(tot.guest_bad));
  return tot.lost ? 1 : 0;
}
