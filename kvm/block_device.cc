#include "kvm/block_device.h"

#include <unistd.h>

#include <atomic>
#include <bit>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "kvm/device_dirty.h"
#include "kvm/guest_memory.h"
#include "kvm/state_file.h"

namespace kvmig::kvm {

namespace {

bool should_log(uint64_t n) { return n <= 5 || (n & (n - 1)) == 0; }

bool valid_entries(uint32_t n) {
  return n >= kBlkMinEntries && n <= kBlkMaxEntries && std::has_single_bit(n);
}

}  // namespace

BlockDevice::BlockDevice(int index, uint64_t block_bytes, uint64_t disk_bytes, GuestMemory& memory,
                         DeviceDirty& dirty)
    : index_(index), memory_(memory), dirty_(dirty), log_(disk_bytes, block_bytes) {}

Result<std::unique_ptr<BlockDevice>> BlockDevice::open(int index, const std::string& path, uint64_t block_bytes,
                                                       GuestMemory& memory, DeviceDirty& dirty) {
  if (index < 0 || index >= kBlkMaxDisks) return Error{"at most " + std::to_string(kBlkMaxDisks) + " disks"};
  if (block_bytes < 4096 || block_bytes > 2 * kMiB || !std::has_single_bit(block_bytes))
    return Error{"disk " + path + ": block size " + std::to_string(block_bytes) + " is not a power of two in 4K..2M"};
  // The backend's completions call into the device, which needs the disk size first: open
  // the backend with a forwarding callback, then build the device around it.
  auto target = std::make_shared<std::atomic<BlockDevice*>>(nullptr);
  KVMIG_ASSIGN(std::unique_ptr<BlockBackend> backend,
               BlockBackend::open(path, kBlkMaxEntries, [target](uint64_t tag, int64_t result) {
                 target->load(std::memory_order_acquire)->on_completion(tag, result);
               }));
  std::unique_ptr<BlockDevice> d(new BlockDevice(index, block_bytes, backend->size(), memory, dirty));
  d->backend_ = std::move(backend);
  if (const char* hold = std::getenv("KVMIG_DISK_HOLD")) d->hold_path_ = hold;
  target->store(d.get(), std::memory_order_release);  // no request can complete before this: none was sent
  return d;
}

BlockDevice::~BlockDevice() {
  // Unbounded on purpose: the kernel may still write into guest memory and call back into
  // this object; neither may outlive it.
  {
    std::unique_lock lock(mu_);
    idle_.wait(lock, [&] { return in_flight_ == 0; });
  }
  backend_.reset();
}

BlockDeviceStats BlockDevice::stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

uint32_t BlockDevice::in_flight() const {
  std::lock_guard lock(mu_);
  return in_flight_;
}

Result<void> BlockDevice::drain(std::chrono::milliseconds limit) {
  std::unique_lock lock(mu_);
  if (idle_.wait_for(lock, limit, [&] { return in_flight_ == 0; })) return ok();
  return Error{"disk " + std::to_string(index_) + " (" + backend_->path() + "): " + std::to_string(in_flight_) +
               " guest request(s) still in flight on the host after " + std::to_string(limit.count()) +
               " ms (host I/O hung?)"};
}

void BlockDevice::handle_port(uint16_t offset, bool out, uint8_t size, uint8_t* data) {
  if (size != 4 || offset % 4 != 0) {
    if (!out) std::memset(data, 0xff, size);
    std::lock_guard lock(mu_);
    status_ |= kBlkStatusBadAccess;
    return;
  }
  uint32_t value = 0;
  if (out) {
    std::memcpy(&value, data, 4);
    write_register(offset, value);
  } else {
    value = read_register(offset);
    std::memcpy(data, &value, 4);
  }
}

uint32_t BlockDevice::read_register(uint16_t offset) {
  std::lock_guard lock(mu_);
  uint64_t sectors = log_.disk_bytes() / kBlkSector;
  switch (offset) {
    case kBlkRegMagic: return kBlkMagic;
    case kBlkRegVersion: return kBlkVersion;
    case kBlkRegCapacityLo: return static_cast<uint32_t>(sectors);
    case kBlkRegCapacityHi: return static_cast<uint32_t>(sectors >> 32);
    case kBlkRegRingLo: return static_cast<uint32_t>(staged_ring_);
    case kBlkRegRingHi: return static_cast<uint32_t>(staged_ring_ >> 32);
    case kBlkRegRingSize: return entries_;
    case kBlkRegDoorbell: return status_;
    default: status_ |= kBlkStatusBadAccess; return 0xffffffff;
  }
}

void BlockDevice::write_register(uint16_t offset, uint32_t value) {
  std::unique_lock lock(mu_);
  switch (offset) {
    case kBlkRegRingLo: staged_ring_ = (staged_ring_ & ~0xffffffffull) | value; break;
    case kBlkRegRingHi: staged_ring_ = (staged_ring_ & 0xffffffffull) | (uint64_t{value} << 32); break;
    case kBlkRegRingSize: set_ring_locked(lock, staged_ring_, value); break;
    case kBlkRegDoorbell: doorbell_locked(value); break;
    default: status_ |= kBlkStatusBadAccess; break;
  }
}

void BlockDevice::set_ring_locked(std::unique_lock<std::mutex>& lock, uint64_t gpa, uint32_t entries) {
  // Requests in flight point into the old ring: let them finish before it goes away.
  idle_.wait(lock, [&] { return in_flight_ == 0; });
  entries_ = 0;
  slots_.clear();
  avail_ = cons_ = used_ = 0;
  if (entries == 0) return;
  if (!valid_entries(entries) || gpa % kPageSize != 0 || !memory_.host_ptr(gpa, blk_ring_bytes(entries))) {
    status_ |= kBlkStatusRingError;
    ++stats_.ring_errors;
    note_bad("ring address or size rejected", 0);
    return;
  }
  ring_gpa_ = gpa;
  entries_ = entries;
  slots_.assign(entries, Slot{});
  std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(ring_host())).store(0, std::memory_order_release);
  dirty_.mark(ring_gpa_, sizeof(uint32_t));
}

uint8_t* BlockDevice::ring_host() const { return memory_.host_ptr(ring_gpa_, blk_ring_bytes(entries_)); }

void BlockDevice::doorbell_locked(uint32_t avail) {
  // Free-running indices: the guest may not publish more than the ring holds beyond what the
  // device has taken (and not go backwards, which wraps to a huge distance).
  if (entries_ == 0 || avail - cons_ > entries_) {
    status_ |= kBlkStatusRingError;
    ++stats_.ring_errors;
    note_bad(entries_ == 0 ? "doorbell without a ring" : "doorbell index overruns the ring", avail);
    return;
  }
  avail_ = avail;
  pump_locked();
}

const char* BlockDevice::invalid_reason(const BlkDescriptor& d) const {
  if (d.op == kBlkOpFlush) return nullptr;
  if (d.len == 0 || d.len % kBlkSector != 0 || d.len > kBlkMaxRequestBytes) return "length not a multiple of 512 in 512..1M";
  if (d.addr % kBlkSector != 0) return "buffer not 512-byte aligned";
  if (!memory_.host_ptr(d.addr, d.len)) return "buffer outside guest RAM";
  uint64_t sectors = log_.disk_bytes() / kBlkSector;
  if (d.sector >= sectors || d.len / kBlkSector > sectors - d.sector) return "sectors beyond the end of the disk";
  return nullptr;
}

void BlockDevice::pump_locked() {
  uint8_t* ring = ring_host();
  while (entries_ != 0 && cons_ != avail_) {
    uint32_t slot = cons_ & (entries_ - 1);
    // A slot still in flight: the guest reused it early. Wait for its completion, which
    // pumps again, rather than overwrite a request the kernel is working on.
    if (slots_[slot].busy) return;
    BlkDescriptor d;
    // One copy, then only the copy is checked and used: the guest cannot change a field
    // between validation and use.
    std::memcpy(&d, ring + kBlkRingHeaderBytes + uint64_t{slot} * sizeof(BlkDescriptor), sizeof d);
    ++cons_;
    if (d.op != kBlkOpRead && d.op != kBlkOpWrite && d.op != kBlkOpFlush) {
      ++stats_.bad_requests;
      note_bad("unknown op", slot);
      complete_locked(slot, kBlkUnsupported);
      continue;
    }
    if (const char* why = invalid_reason(d)) {
      ++stats_.bad_requests;
      note_bad(why, slot);
      complete_locked(slot, kBlkBadRequest);
      continue;
    }
    slots_[slot].desc = d;
    slots_[slot].busy = true;
    ++in_flight_;
    BlockBackend::Op op = d.op == kBlkOpRead    ? BlockBackend::Op::kRead
                          : d.op == kBlkOpWrite ? BlockBackend::Op::kWrite
                                                : BlockBackend::Op::kFlush;
    uint8_t* buf = d.op == kBlkOpFlush ? nullptr : memory_.host_ptr(d.addr, d.len);
    uint32_t len = d.op == kBlkOpFlush ? 0 : d.len;
    auto res = backend_->submit(op, d.sector * kBlkSector, buf, len, slot);
    if (!res.ok()) {
      std::fprintf(stderr, "kvmig: disk %d: %s\n", index_, res.error().message.c_str());
      slots_[slot].busy = false;
      --in_flight_;
      ++stats_.io_errors;
      complete_locked(slot, kBlkIoError);
    }
  }
}

void BlockDevice::complete_locked(uint32_t slot, uint8_t status) {
  uint8_t* ring = ring_host();
  uint64_t off = kBlkRingHeaderBytes + uint64_t{slot} * sizeof(BlkDescriptor) + offsetof(BlkDescriptor, status);
  // Status first, then the counter: a guest that sees the counter move sees the status.
  std::atomic_ref<uint8_t>(ring[off]).store(status, std::memory_order_release);
  ++used_;
  std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(ring)).store(used_, std::memory_order_release);
  dirty_.mark(ring_gpa_ + off, 1);
  dirty_.mark(ring_gpa_, sizeof(uint32_t));
}

void BlockDevice::hold_if_asked() {
  if (hold_path_.empty()) return;
  bool said = false;
  while (::access(hold_path_.c_str(), F_OK) == 0) {
    if (!said) {
      std::fprintf(stderr, "kvmig: disk %d: KVMIG_DISK_HOLD: holding completions while %s exists\n", index_,
                   hold_path_.c_str());
      said = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

void BlockDevice::on_completion(uint64_t slot, int64_t result) {
  hold_if_asked();  // outside the lock: a hung host I/O does not hold the device's mutex either
  std::lock_guard lock(mu_);
  Slot& s = slots_[slot];
  const BlkDescriptor& d = s.desc;
  uint8_t status = kBlkOk;
  if (result < 0) {
    status = kBlkIoError;
    ++stats_.io_errors;
    std::fprintf(stderr, "kvmig: disk %d (%s): %s at sector %llu: %s\n", index_, backend_->path().c_str(),
                 d.op == kBlkOpRead ? "read" : d.op == kBlkOpWrite ? "write" : "flush",
                 static_cast<unsigned long long>(d.sector), std::strerror(static_cast<int>(-result)));
  } else if (d.op == kBlkOpRead) {
    // The data is in guest RAM now; mark after the write, as DeviceDirty asks.
    dirty_.mark(d.addr, d.len);
    ++stats_.reads;
    stats_.bytes_read += d.len;
  } else if (d.op == kBlkOpWrite) {
    log_.mark(d.sector * kBlkSector, d.len);
    ++stats_.writes;
    stats_.bytes_written += d.len;
  } else {
    ++stats_.flushes;
  }
  s.busy = false;
  --in_flight_;
  complete_locked(static_cast<uint32_t>(slot), status);
  pump_locked();
  if (in_flight_ == 0) idle_.notify_all();
}

void BlockDevice::note_bad(const char* what, uint32_t detail) {
  uint64_t n = stats_.bad_requests + stats_.ring_errors;
  if (should_log(n))
    std::fprintf(stderr, "kvmig: disk %d: guest request rejected (%s; slot/index %u), %llu so far\n", index_, what,
                 detail, static_cast<unsigned long long>(n));
}

Result<StateSection> BlockDevice::save() {
  KVMIG_TRY(drain());
  std::lock_guard lock(mu_);
  PayloadWriter w;
  w.put(ring_gpa_);
  w.put(entries_);
  w.put(cons_);
  w.put(used_);
  w.put(status_);
  w.put(staged_ring_);
  return StateSection{snapshot_id(), kBlkSectionVersion, w.take()};
}

Result<void> BlockDevice::restore(const StateSection& s) {
  if (s.version != kBlkSectionVersion)
    return Error{"section '" + s.id + "': unsupported version " + std::to_string(s.version)};
  PayloadReader r(s);
  uint64_t gpa = 0, staged = 0;
  uint32_t entries = 0, cons = 0, used = 0, status = 0;
  KVMIG_TRY(r.get(gpa, "ring"));
  KVMIG_TRY(r.get(entries, "entries"));
  KVMIG_TRY(r.get(cons, "consumed"));
  KVMIG_TRY(r.get(used, "used"));
  KVMIG_TRY(r.get(status, "status"));
  KVMIG_TRY(r.get(staged, "staged ring"));
  KVMIG_TRY(r.expect_end());
  if (entries != 0 && (!valid_entries(entries) || gpa % kPageSize != 0 || !memory_.host_ptr(gpa, blk_ring_bytes(entries))))
    return Error{"section '" + s.id + "': ring at " + std::to_string(gpa) + " with " + std::to_string(entries) +
                 " entries is not inside guest RAM"};
  // Saved drained, so every consumed request has completed: used == consumed.
  if (used != cons) return Error{"section '" + s.id + "': saved with requests in flight"};
  std::unique_lock lock(mu_);
  idle_.wait(lock, [&] { return in_flight_ == 0; });
  ring_gpa_ = gpa;
  entries_ = entries;
  slots_.assign(entries, Slot{});
  cons_ = avail_ = cons;
  used_ = used;
  status_ = status;
  staged_ring_ = staged;
  return ok();
}

namespace {
class BlockDevicePart final : public Snapshottable {
 public:
  explicit BlockDevicePart(BlockDevice& d) : d_(d) {}
  std::string snapshot_id() const override { return d_.snapshot_id(); }
  Result<StateSection> save() override { return d_.save(); }
  Result<void> restore(const StateSection& s) override { return d_.restore(s); }

 private:
  BlockDevice& d_;
};
}  // namespace

std::unique_ptr<Snapshottable> block_device_part(BlockDevice& device) {
  return std::make_unique<BlockDevicePart>(device);
}

}  // namespace kvmig::kvm
