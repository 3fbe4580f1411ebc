#include "kvm/memory_image.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14
#endif

namespace kvmig::kvm {
namespace {

// Zero gaps up to this many pages stay inside a run (fewer, larger writes).
constexpr uint64_t kMaxGapPages = 16;
// Bounds one section, so a checksum failure names a region of reasonable size.
constexpr uint64_t kMaxRunBytes = 256ull << 20;
// Runs this large start their pages on an aligned file offset (after a pad section of at
// most 4 KiB: under 2% here), so a restore reads them straight into guest memory with
// O_DIRECT. Smaller runs come through the reader's buffer anyway.
constexpr uint64_t kAlignRunBytes = 256u << 10;

// Runs at least this large get their pages faulted in ahead of the read (Prefaulter).
constexpr uint64_t kPrefaultMinBytes = 16u << 20;
constexpr uint64_t kPrefaultStep = 2u << 20;

// Fresh guest memory is faulted in, and zeroed by the kernel, when the read first writes to
// it: inside the O_DIRECT submission, in series with the reading. Where zeroing is slow (a
// nested host: 0.4-0.9 s per GiB here) that costs as much as the disk. This thread faults
// the run's pages in ahead of the reader, so both go on at once; the reader faults whatever
// the thread has not reached yet, and the contents are untouched either way.
class Prefaulter {
 public:
  Prefaulter(uint8_t* p, uint64_t len) {
    if (len >= kPrefaultMinBytes) thread_ = std::thread([this, p, len] { run(p, len); });
  }
  ~Prefaulter() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }

 private:
  void run(uint8_t* p, uint64_t len) {
    for (uint64_t at = 0; at < len && !stop_; at += kPrefaultStep) {
      if (::madvise(p + at, std::min(kPrefaultStep, len - at), MADV_POPULATE_WRITE) != 0)
        return;  // an older kernel: the read faults the pages in itself
    }
  }
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%#llx", static_cast<unsigned long long>(v));
  return buf;
}

Result<void> write_run(StateFileWriter& w, const MemoryRange& r, uint64_t first_page,
                       uint64_t pages, MemoryImageStats& stats) {
  uint64_t gpa = r.gpa + first_page * kPageSize;
  iovec parts[2] = {{&gpa, sizeof(gpa)},
                    {r.host + first_page * kPageSize, pages * kPageSize}};
  KVMIG_TRY(w.write_section(kMemoryRunId, kMemoryRunVersion, parts,
                            pages * kPageSize >= kAlignRunBytes ? sizeof(gpa) : kUnaligned));
  stats.data_bytes += pages * kPageSize;
  ++stats.runs;
  return ok();
}

}  // namespace

bool is_zero_page(const uint8_t* p) {
  const auto* w = reinterpret_cast<const uint64_t*>(p);
  // 8 blocks of 512 bytes: the OR over a block vectorizes; the branch per block lets a
  // non-zero page stop early without making the all-zero case slower.
  for (int block = 0; block < 8; ++block, w += 64) {
    uint64_t acc = 0;
    for (int i = 0; i < 64; ++i) acc |= w[i];
    if (acc != 0) return false;
  }
  return true;
}

StateSection memory_layout_section(std::span<const MemoryRange> ranges) {
  PayloadWriter w;
  w.put(static_cast<uint32_t>(ranges.size()));
  w.put(uint32_t{0});
  for (const MemoryRange& r : ranges) {
    w.put(r.slot);
    w.put(uint32_t{0});
    w.put(r.gpa);
    w.put(r.size);
  }
  return StateSection{kMemoryLayoutId, kMemoryLayoutVersion, w.take()};
}

Result<void> check_memory_layout(const StateSection& s, std::span<const MemoryRange> ranges) {
  if (s.id != kMemoryLayoutId) return Error{"expected section 'memory.layout', got '" + s.id + "'"};
  if (s.version != kMemoryLayoutVersion)
    return Error{"section 'memory.layout': unsupported version " + std::to_string(s.version)};
  PayloadReader r(s);
  uint32_t count = 0, zero = 0;
  KVMIG_TRY(r.get(count, "region count"));
  KVMIG_TRY(r.get(zero, "reserved"));
  if (count != ranges.size())
    return Error{"memory layout: saved machine has " + std::to_string(count) +
                 " memory regions, this one " + std::to_string(ranges.size())};
  for (const MemoryRange& m : ranges) {
    uint32_t slot = 0, pad = 0;
    uint64_t gpa = 0, size = 0;
    KVMIG_TRY(r.get(slot, "slot"));
    KVMIG_TRY(r.get(pad, "reserved"));
    KVMIG_TRY(r.get(gpa, "gpa"));
    KVMIG_TRY(r.get(size, "size"));
    if (slot != m.slot || gpa != m.gpa || size != m.size)
      return Error{"memory layout: saved region slot " + std::to_string(slot) + " at " + hex(gpa) +
                   " size " + hex(size) + " differs from this machine's slot " +
                   std::to_string(m.slot) + " at " + hex(m.gpa) + " size " + hex(m.size)};
  }
  return r.expect_end();
}

Result<MemoryImageStats> save_memory(StateFileWriter& w, std::span<const MemoryRange> ranges) {
  MemoryImageStats stats;
  KVMIG_TRY(w.write_section(memory_layout_section(ranges)));
  for (const MemoryRange& r : ranges) {
    stats.guest_bytes += r.size;
    const uint64_t pages = r.size / kPageSize;
    uint64_t page = 0;
    while (page < pages) {
      while (page < pages && is_zero_page(r.host + page * kPageSize)) ++page;
      if (page == pages) break;
      // A run: non-zero pages, possibly with short zero gaps, ending on a non-zero page.
      uint64_t start = page, end = page + 1, gap = 0;
      for (page = end; page < pages && (page - start) * kPageSize < kMaxRunBytes; ++page) {
        if (is_zero_page(r.host + page * kPageSize)) {
          if (++gap > kMaxGapPages) break;
        } else {
          gap = 0;
          end = page + 1;
        }
      }
      page = end;
      KVMIG_TRY(write_run(w, r, start, end - start, stats));
    }
  }
  return stats;
}

Result<void> restore_memory_run(StateFileReader& reader, std::span<const MemoryRange> ranges,
                                MemoryImageStats* stats) {
  const SectionInfo& info = reader.current();
  if (info.id != kMemoryRunId)
    return Error{"expected section 'memory.run', got '" + info.id + "'"};
  if (info.version != kMemoryRunVersion)
    return Error{"section 'memory.run' at offset " + std::to_string(info.offset) +
                 ": unsupported version " + std::to_string(info.version)};
  if (info.length <= sizeof(uint64_t) || (info.length - sizeof(uint64_t)) % kPageSize != 0)
    return Error{"section 'memory.run' at offset " + std::to_string(info.offset) +
                 ": length " + std::to_string(info.length) + " is not 8 + whole pages"};
  uint64_t gpa = 0;
  KVMIG_TRY(reader.read_payload(reinterpret_cast<uint8_t*>(&gpa), sizeof(gpa)));
  const uint64_t len = info.length - sizeof(uint64_t);
  // The one check standing between a file and this process's memory: the whole run must lie
  // in one range (written so that gpa + len cannot overflow past the test).
  const MemoryRange* target = nullptr;
  for (const MemoryRange& r : ranges) {
    if (gpa >= r.gpa && gpa - r.gpa <= r.size && len <= r.size - (gpa - r.gpa)) {
      target = &r;
      break;
    }
  }
  if (target == nullptr || gpa % kPageSize != 0)
    return Error{"section 'memory.run' at offset " + std::to_string(info.offset) + ": pages " +
                 hex(gpa) + "+" + hex(len) + " are not inside guest memory"};
  uint8_t* dst = target->host + (gpa - target->gpa);
  {
    Prefaulter prefault(dst, len);
    KVMIG_TRY(reader.read_payload(dst, len));
  }
  KVMIG_TRY(reader.finish_payload());
  if (stats != nullptr) {
    stats->data_bytes += len;
    ++stats->runs;
  }
  return ok();
}

}  // namespace kvmig::kvm
