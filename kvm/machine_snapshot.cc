#include "kvm/machine_snapshot.h"

#include <chrono>
#include <map>
#include <mutex>
#include <set>

#include "kvm/block_device.h"
#include "kvm/vcpu_state.h"
#include "kvm/vm_state.h"

namespace kvmig::kvm {
namespace {

using Clock = std::chrono::steady_clock;
constexpr uint32_t kFlagHugepages = 1;
// Caps on what a file may ask this host to build (the reader trusts nothing).
constexpr uint64_t kMaxMemory = 1ull << 42;  // 4 TiB
constexpr uint32_t kMaxVcpus = 1024;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// The MSR list KVM_GET_MSRS accepts, per /dev/kvm fd of this process. It depends on KVM's
// index list and on the vCPU's CPUID, which this VMM always derives from that same fd's
// KVM_GET_SUPPORTED_CPUID: probed once, it holds for every machine built on the fd. This
// matters because the probe is a vCPU ioctl, and a vCPU ioctl on a vCPU inside KVM_RUN
// waits for its next exit (seconds for a guest that rarely exits).
std::mutex msr_cache_mu;
std::map<int, std::vector<uint32_t>> msr_cache;

std::vector<MemoryRange> ranges_of(Machine& m) {
  const auto& regions = m.memory().regions();
  return {regions.begin(), regions.end()};
}

}  // namespace

StateSection machine_config_section(const MachineConfig& config) {
  PayloadWriter w;
  w.put(config.memory);
  w.put(static_cast<uint32_t>(config.vcpus));
  w.put(config.hugepages ? kFlagHugepages : 0u);
  return StateSection{kMachineSectionId, kMachineSectionVersion, w.take()};
}

Result<MachineConfig> parse_machine_config(const StateSection& s) {
  if (s.id != kMachineSectionId)
    return Error{"first section is '" + s.id + "', expected 'machine'"};
  if (s.version != kMachineSectionVersion)
    return Error{"section 'machine': unsupported version " + std::to_string(s.version)};
  PayloadReader r(s);
  MachineConfig c;
  uint32_t vcpus = 0, flags = 0;
  KVMIG_TRY(r.get(c.memory, "memory"));
  KVMIG_TRY(r.get(vcpus, "vcpus"));
  KVMIG_TRY(r.get(flags, "flags"));
  KVMIG_TRY(r.expect_end());
  if (c.memory == 0 || c.memory > kMaxMemory || c.memory % kPageSize != 0)
    return Error{"section 'machine': implausible memory size " + std::to_string(c.memory)};
  if (vcpus == 0 || vcpus > kMaxVcpus)
    return Error{"section 'machine': implausible vCPU count " + std::to_string(vcpus)};
  if ((flags & ~kFlagHugepages) != 0)
    return Error{"section 'machine': unknown flags " + std::to_string(flags)};
  c.vcpus = static_cast<int>(vcpus);
  c.hugepages = (flags & kFlagHugepages) != 0;
  return c;
}

Result<MachineSnapshot> MachineSnapshot::of(Machine& machine) {
  MachineSnapshot snap;
  std::vector<Vcpu*> vcpus = machine.vcpus();
  if (vcpus.empty()) return Error{"machine has no vCPUs"};
  KVMIG_ASSIGN(VcpuStateCaps caps, probe_vcpu_state_caps(machine.vm_fd()));
  std::vector<uint32_t> msrs;
  {
    std::lock_guard lock(msr_cache_mu);
    auto it = msr_cache.find(machine.kvm().fd());
    if (it == msr_cache.end()) {
      KVMIG_ASSIGN(std::vector<uint32_t> probed, migratable_msrs(machine.kvm().fd(), vcpus[0]->fd()));
      it = msr_cache.emplace(machine.kvm().fd(), std::move(probed)).first;
    }
    msrs = it->second;
  }
  for (Vcpu* v : vcpus)
    snap.parts_.push_back(std::make_unique<VcpuState>(v->fd(), v->index(), msrs, caps));
  snap.parts_.push_back(std::make_unique<IrqchipState>(machine.vm_fd()));
  snap.parts_.push_back(std::make_unique<PitState>(machine.vm_fd()));
  for (size_t i = 0; i < machine.disks().size(); ++i) snap.parts_.push_back(block_device_part(machine.disk(i)));
  snap.parts_.push_back(std::make_unique<VmClockState>(machine.vm_fd()));
  return snap;
}

bool MachineSnapshot::probed(Machine& machine) {
  std::lock_guard lock(msr_cache_mu);
  return msr_cache.count(machine.kvm().fd()) > 0;
}

std::vector<std::string> MachineSnapshot::part_ids() const {
  std::vector<std::string> ids;
  for (const auto& p : parts_) ids.push_back(p->snapshot_id());
  return ids;
}

Result<std::vector<StateSection>> MachineSnapshot::save_parts() {
  std::vector<StateSection> out;
  for (const auto& p : parts_) {
    auto s = p->save();
    if (!s) return std::move(s.error().prefix("save " + p->snapshot_id()));
    out.push_back(std::move(*s));
  }
  return out;
}

Result<void> MachineSnapshot::restore_parts(const std::vector<StateSection>& sections) {
  std::map<std::string, const StateSection*> by_id;
  for (const StateSection& s : sections) {
    if (!by_id.emplace(s.id, &s).second) return Error{"duplicate state section '" + s.id + "'"};
  }
  for (const auto& p : parts_) {
    if (!by_id.count(p->snapshot_id())) {
      if (p->snapshot_id().starts_with("dev.blk."))
        return Error{"the state has no " + p->snapshot_id() + ": it was saved with fewer disks than are attached"};
      return Error{"state has no section '" + p->snapshot_id() + "' (saved with fewer vCPUs?)"};
    }
  }
  if (by_id.size() != parts_.size()) {
    std::set<std::string> known;
    for (const auto& p : parts_) known.insert(p->snapshot_id());
    for (const auto& [id, s] : by_id)
      if (!known.count(id)) {
        if (id.starts_with("dev.blk."))
          return Error{"the state has a disk (" + id + ") that is not attached: give the same disks as when saved"};
        return Error{"unknown state section '" + id + "'"};
      }
  }
  for (const auto& p : parts_) {
    auto r = p->restore(*by_id[p->snapshot_id()]);
    if (!r) return std::move(r.error().prefix("restore " + p->snapshot_id()));
  }
  return ok();
}

Result<SnapshotStats> save_machine(Machine& machine, const std::string& path, bool sync) {
  auto begin = Clock::now();
  KVMIG_ASSIGN(MachineSnapshot snap, MachineSnapshot::of(machine));
  KVMIG_ASSIGN(StateFileWriter w, StateFileWriter::create(path, sync));
  KVMIG_TRY(w.write_section(machine_config_section(machine.config())));
  std::vector<MemoryRange> ranges = ranges_of(machine);
  KVMIG_ASSIGN(MemoryImageStats mem, save_memory(w, ranges));
  KVMIG_ASSIGN(std::vector<StateSection> parts, snap.save_parts());
  for (const StateSection& s : parts) KVMIG_TRY(w.write_section(s));
  uint64_t file_bytes = w.bytes_written() + sizeof(FrameHeader);
  KVMIG_TRY(w.finish());
  SnapshotStats stats;
  stats.guest_bytes = mem.guest_bytes;
  stats.data_bytes = mem.data_bytes;
  stats.file_bytes = file_bytes;
  stats.seconds = seconds_since(begin);
  return stats;
}

Result<MachineConfig> read_machine_config(StateFileReader& reader) {
  KVMIG_ASSIGN(SectionInfo info, reader.next());
  if (info.id != kMachineSectionId)
    return Error{"state file " + reader.name() + ": first section is '" + info.id +
                 "', expected 'machine'"};
  KVMIG_ASSIGN(StateSection s, reader.read_section(4096));
  auto c = parse_machine_config(s);
  if (!c) return std::move(c.error().prefix("state file " + reader.name()));
  return c;
}

Result<SnapshotStats> restore_machine(StateFileReader& reader, Machine& machine) {
  auto begin = Clock::now();
  KVMIG_ASSIGN(MachineSnapshot snap, MachineSnapshot::of(machine));
  std::vector<MemoryRange> ranges = ranges_of(machine);
  const std::string where = "state file " + reader.name();
  bool layout_seen = false;
  MemoryImageStats mem;
  std::vector<StateSection> parts;
  for (;;) {
    KVMIG_ASSIGN(SectionInfo info, reader.next());
    if (info.id == kEndSectionId) break;
    if (info.id == kMemoryRunId) {
      if (!layout_seen) return Error{where + ": memory pages before the memory layout"};
      auto r = restore_memory_run(reader, ranges, &mem);
      if (!r) return std::move(r.error().prefix(where));
      continue;
    }
    KVMIG_ASSIGN(StateSection s, reader.read_section());
    if (s.id == kMemoryLayoutId) {
      if (layout_seen) return Error{where + ": duplicate memory layout"};
      auto r = check_memory_layout(s, ranges);
      if (!r) return std::move(r.error().prefix(where));
      layout_seen = true;
      continue;
    }
    if (s.id == kMachineSectionId) return Error{where + ": duplicate 'machine' section"};
    parts.push_back(std::move(s));
  }
  if (!layout_seen) return Error{where + ": no memory layout section"};
  auto r = snap.restore_parts(parts);
  if (!r) return std::move(r.error().prefix(where));
  SnapshotStats stats;
  stats.guest_bytes = machine.memory().ram_size();
  stats.data_bytes = mem.data_bytes;
  stats.seconds = seconds_since(begin);
  return stats;
}

}  // namespace kvmig::kvm
