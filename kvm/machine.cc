#include "kvm/machine.h"

#include <elf.h>
#include <fcntl.h>

#include "kvm/block_device.h"
#include "kvm/boot_layout.h"
#include "kvm/cpuid.h"
#include "kvm/device_dirty.h"
#include "kvm/dirty_ring_log.h"
#include "kvm/io_devices.h"
#include "kvm/ioctl.h"
#include "kvm/kernel_image.h"
#include "kvm/loader_elf64.h"
#include "kvm/loader_multiboot.h"
#include "kvm/multiboot_info.h"
#include "kvm/vcpu_runner.h"

namespace kvmig::kvm {

namespace {

using Clock = std::chrono::steady_clock;

int64_t us_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration_cast<std::chrono::microseconds>(b - a).count();
}

// xAPIC ids are 8 bits and 0xff is the broadcast id.
constexpr int kMaxVcpus = 254;

}  // namespace

Machine::Machine(const MachineConfig& config, std::unique_ptr<KvmSystem> kvm, Fd vm_fd, GuestMemory memory)
    : config_(config), kvm_(std::move(kvm)), vm_fd_(std::move(vm_fd)), memory_(std::move(memory)),
      ctl_(std::make_unique<RunControl>()) {}

Machine::~Machine() {
  if (ctl_ && ctl_->started) {
    stop(0);
    (void)wait();
  }
}

Result<std::unique_ptr<Machine>> Machine::create(const MachineConfig& in) {
  MachineConfig config = in;
  if (config.start_time == Clock::time_point{}) config.start_time = Clock::now();
  if (config.vcpus < 1 || config.vcpus > kMaxVcpus)
    return Error{"vCPU count " + std::to_string(config.vcpus) + " out of range 1.." + std::to_string(kMaxVcpus)};

  KVMIG_ASSIGN(std::unique_ptr<KvmSystem> kvm, KvmSystem::open());
  if (config.vcpus > kvm->max_vcpus())
    return Error{"KVM allows at most " + std::to_string(kvm->max_vcpus()) + " vCPUs, asked for " + std::to_string(config.vcpus)};
  KVMIG_ASSIGN(int vm, kvm_ioctl(kvm->fd(), KVM_CREATE_VM, "KVM_CREATE_VM", 0UL));
  Fd vm_fd(vm);
  // Both must precede vCPU creation; they live in the 3..4 GiB hole, away from RAM.
  KVMIG_TRY(kvm_ioctl(vm_fd.get(), KVM_SET_TSS_ADDR, "KVM_SET_TSS_ADDR", static_cast<unsigned long>(kTssAddr)));
  if (kvm->has(KVM_CAP_SET_IDENTITY_MAP_ADDR)) {
    uint64_t addr = kIdentityMapAddr;
    KVMIG_TRY(kvm_ioctl(vm_fd.get(), KVM_SET_IDENTITY_MAP_ADDR, "KVM_SET_IDENTITY_MAP_ADDR", &addr));
  }
  KVMIG_ASSIGN(GuestMemory memory, GuestMemory::create(vm_fd.get(), config.memory, config.hugepages));

  std::unique_ptr<Machine> m(new Machine(config, std::move(kvm), std::move(vm_fd), std::move(memory)));
  KVMIG_TRY(m->init_devices_and_vcpus());
  m->create_us_ = us_between(config.start_time, Clock::now());
  return m;
}

Result<void> Machine::init_devices_and_vcpus() {
  KVMIG_TRY(kvm_ioctl(vm_fd(), KVM_CREATE_IRQCHIP, "KVM_CREATE_IRQCHIP"));
  kvm_pit_config pit{};
  pit.flags = KVM_PIT_SPEAKER_DUMMY;  // port 0x61 answered in the kernel, as QEMU's pcspk would
  KVMIG_TRY(kvm_ioctl(vm_fd(), KVM_CREATE_PIT2, "KVM_CREATE_PIT2", &pit));

  int console = 1;
  if (!config_.console_path.empty()) {
    console_fd_.reset(::open(config_.console_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!console_fd_) return Error::from_errno("console file " + config_.console_path);
    console = console_fd_.get();
  }
  io_ = std::make_unique<IoDevices>(console);
  std::vector<DeviceDirty::Range> ranges;
  for (const auto& r : memory_.regions()) ranges.push_back({r.gpa, r.size});
  device_dirty_ = std::make_unique<DeviceDirty>(ranges);

  // The dirty ring can only be enabled while the VM has no vCPUs.
  if (config_.dirty_ring_entries > 0) {
    KVMIG_ASSIGN(dirty_ring_, DirtyRingLog::enable(vm_fd(), config_.dirty_ring_entries));
    DirtyRingLog* ring = dirty_ring_.get();
    ctl_->dirty_ring_full = [ring](Vcpu& vcpu) { return ring->handle_ring_full(vcpu.index()); };
  }
  const auto& supported = kvm_->supported_cpuid();
  for (int i = 0; i < config_.vcpus; ++i) {
    KVMIG_ASSIGN(std::unique_ptr<Vcpu> vcpu, Vcpu::create(vm_fd(), i, kvm_->vcpu_mmap_size()));
    auto res = set_cpuid(vcpu->fd(), cpuid_for_vcpu(supported, i, config_.vcpus));
    if (!res.ok()) return std::move(res.error().prefix("vCPU " + std::to_string(i)));
    if (dirty_ring_) KVMIG_TRY(dirty_ring_->attach_vcpu(vcpu->fd()));
    vcpus_.push_back(std::move(vcpu));
  }
  return ok();
}

Result<void> Machine::load_kernel(const std::string& path, const std::string& cmdline) {
  if (kernel_loaded_) return Error{"a kernel is already loaded"};
  if (ctl_->started) return Error{"cannot load a kernel into a running VM"};
  KVMIG_ASSIGN(std::vector<uint8_t> file, read_kernel_file(path));
  int khz = ::ioctl(vcpus_[0]->fd(), KVM_GET_TSC_KHZ, 0);
  cmdline_ = with_tsc_khz(cmdline, khz > 0 ? static_cast<uint32_t>(khz) : kvm_->tsc_khz());
  Result<void> res = ok();
  if (file.size() > EI_CLASS && std::memcmp(file.data(), ELFMAG, SELFMAG) == 0 && file[EI_CLASS] == ELFCLASS64)
    res = load_elf64(file, cmdline_, memory_, *vcpus_[0]);
  else
    res = load_multiboot(file, cmdline_, memory_, *vcpus_[0]);
  if (!res.ok()) return std::move(res.error().prefix("kernel " + path));
  kernel_loaded_ = true;
  return ok();
}

Result<void> Machine::start() {
  install_kick_handler();
  std::lock_guard lock(ctl_->mu);
  if (ctl_->started) return Error{"VM already started"};
  ctl_->started = true;
  ctl_->alive = static_cast<int>(vcpus_.size());
  for (size_t i = 0; i < vcpus_.size(); ++i) ctl_->threads.emplace_back([this, i] { vcpu_thread(i); });
  return ok();
}

void Machine::vcpu_thread(size_t index) {
  std::string name = "kvmig-vcpu" + std::to_string(index);
  pthread_setname_np(pthread_self(), name.c_str());
  run_vcpu(*vcpus_[index], *ctl_, *io_, [this] { kick_all(); });
  std::lock_guard lock(ctl_->mu);
  --ctl_->alive;
  ctl_->cv.notify_all();
}

void Machine::kick_all() {
  // Under mu with alive > 0, no thread has been joined yet (wait() joins only once all have
  // returned), so every handle is valid; signalling a returned, unjoined thread is harmless.
  std::lock_guard lock(ctl_->mu);
  if (ctl_->alive == 0) return;
  for (auto& t : ctl_->threads) kick_thread(t.native_handle());
}

Result<void> Machine::pause() {
  auto begin = Clock::now();
  {
    std::lock_guard lock(ctl_->mu);
    if (!ctl_->started || ctl_->paused) {
      ctl_->paused = true;
      return ok();
    }
    ctl_->pause_requested.store(true);
  }
  kick_all();
  std::unique_lock lock(ctl_->mu);
  ctl_->cv.wait(lock, [&] { return ctl_->parked == ctl_->alive; });
  // Quiesce the disks: with every vCPU parked nobody rings a doorbell, so once the requests
  // in flight complete, guest memory, the rings and the images stay still until resume.
  // A host I/O that hangs past the drain limit fails the pause and the vCPUs run on: a VM
  // frozen behind a dead disk is worse than a pause (or a migration) refused.
  for (auto& d : disks_) {
    if (auto drained = d->drain(); !drained.ok()) {
      ctl_->pause_requested.store(false);
      ctl_->cv.notify_all();
      return std::move(drained.error().prefix("pause"));
    }
  }
  ctl_->paused = true;
  double us = std::chrono::duration<double, std::micro>(Clock::now() - begin).count();
  if (ctl_->pauses == 0 || us < ctl_->pause_min_us) ctl_->pause_min_us = us;
  if (us > ctl_->pause_max_us) ctl_->pause_max_us = us;
  ctl_->pause_sum_us += us;
  ++ctl_->pauses;
  if (ctl_->ended && ctl_->error) return Error{"VM stopped while pausing: " + ctl_->error->message};
  return ok();
}

Result<void> Machine::resume() {
  std::lock_guard lock(ctl_->mu);
  if (ctl_->ended) return Error{"VM has ended; cannot resume"};
  ctl_->paused = false;
  ctl_->pause_requested.store(false);
  ctl_->cv.notify_all();
  return ok();
}

bool Machine::paused() const {
  std::lock_guard lock(ctl_->mu);
  return ctl_->paused;
}

void Machine::stop(int status) {
  ctl_->finish(status);
  if (ctl_->started) kick_all();
}

Result<int> Machine::wait() {
  std::vector<std::thread> threads;
  {
    std::unique_lock lock(ctl_->mu);
    ctl_->cv.wait(lock, [&] { return ctl_->alive == 0; });
    threads.swap(ctl_->threads);
  }
  for (auto& t : threads) {
    if (t.joinable()) t.join();
  }
  io_->flush();
  std::lock_guard lock(ctl_->mu);
  ctl_->started = false;
  if (ctl_->error) return *ctl_->error;
  return ctl_->status;
}

Result<size_t> Machine::attach_disk(const std::string& path, uint64_t block_bytes) {
  {
    std::lock_guard lock(ctl_->mu);
    if (ctl_->started) return Error{"disk " + path + ": cannot attach a disk to a running VM"};
  }
  int index = static_cast<int>(disks_.size());
  KVMIG_ASSIGN(std::unique_ptr<BlockDevice> d, BlockDevice::open(index, path, block_bytes, memory_, *device_dirty_));
  BlockDevice* raw = d.get();
  io_->add_ports(raw->port_base(), kBlkPortStride,
                 [raw](uint16_t offset, bool out, uint8_t size, uint8_t* data) { raw->handle_port(offset, out, size, data); });
  disks_.push_back(std::move(d));
  return static_cast<size_t>(index);
}

std::vector<Machine::DiskInfo> Machine::disks() const {
  std::vector<DiskInfo> out;
  for (const auto& d : disks_) out.push_back({d->path(), d->fd(), d->size(), &d->write_log()});
  return out;
}

BlockWriteLog& Machine::disk_write_log(size_t index) { return disks_.at(index)->write_log(); }

std::vector<Vcpu*> Machine::vcpus() const {
  std::vector<Vcpu*> out;
  for (const auto& v : vcpus_) out.push_back(v.get());
  return out;
}

MachineStats Machine::stats() const {
  MachineStats s;
  s.exits_io = ctl_->exits_io.load();
  s.exits_mmio = ctl_->exits_mmio.load();
  s.exits_hlt = ctl_->exits_hlt.load();
  s.exits_intr = ctl_->exits_intr.load();
  s.exits_shutdown = ctl_->exits_shutdown.load();
  s.exits_dirty_ring_full = ctl_->exits_dirty_ring_full.load();
  s.exits_other = ctl_->exits_other.load();
  s.unknown_io = io_->unknown_io();
  s.unknown_mmio = io_->unknown_mmio();
  s.console_bytes = io_->console_bytes();
  {
    std::lock_guard lock(ctl_->mu);
    s.pauses = ctl_->pauses;
    s.pause_min_us = ctl_->pause_min_us;
    s.pause_max_us = ctl_->pause_max_us;
    s.pause_avg_us = ctl_->pauses ? ctl_->pause_sum_us / ctl_->pauses : 0;
  }
  s.create_us = create_us_;
  if (s.console_bytes > 0) s.first_console_byte_us = us_between(config_.start_time, io_->first_console_byte());
  return s;
}

void Machine::set_console_listener(std::function<void(std::string_view)> listener) {
  io_->set_console_listener(std::move(listener));
}

void Machine::set_dirty_ring_full_handler(std::function<Result<void>(Vcpu&)> handler) {
  std::lock_guard lock(ctl_->mu);
  ctl_->dirty_ring_full = std::move(handler);
}

}  // namespace kvmig::kvm
