#include "kvm/guest_memory.h"

#include "kvm/kvm_uapi.h"
#include <sys/mman.h>

#include <cctype>
#include <fstream>
#include <sstream>
#include <utility>

#include "kvm/ioctl.h"

namespace kvmig::kvm {

namespace {

std::string mib(uint64_t bytes) { return std::to_string(bytes / kMiB) + " MiB"; }

// Value of "Key:   N kB" (or a bare count for HugePages_*) from /proc/meminfo text; -1 if absent.
int64_t meminfo_value(const std::string& meminfo, const std::string& key) {
  std::istringstream in(meminfo);
  std::string line;
  while (std::getline(in, line)) {
    if (line.compare(0, key.size() + 1, key + ":") != 0) continue;
    std::istringstream fields(line.substr(key.size() + 1));
    int64_t v = -1;
    std::string unit;
    fields >> v >> unit;
    return unit == "kB" ? v * 1024 : v;
  }
  return -1;
}

}  // namespace

std::vector<SlotPlan> plan_memory_layout(uint64_t ram) {
  std::vector<SlotPlan> plan;
  uint64_t low = ram < kLowRamEnd ? ram : kLowRamEnd;
  plan.push_back({0, 0, low});
  if (ram > low) plan.push_back({1, kHighRamStart, ram - low});
  return plan;
}

Result<void> check_host_memory(uint64_t ram, bool hugepages, const std::string& meminfo) {
  if (ram < kMinRam) return Error{"guest memory " + std::to_string(ram) + " bytes is too small (minimum " + mib(kMinRam) + ")"};
  uint64_t align = hugepages ? kHugePageSize : kPageSize;
  if (ram % align != 0)
    return Error{"guest memory " + std::to_string(ram) + " bytes is not a multiple of " +
                 (hugepages ? std::string("2 MiB (needed with --hugepages)") : std::string("4 KiB"))};
  if (hugepages) {
    int64_t free_pages = meminfo_value(meminfo, "HugePages_Free");
    int64_t rsvd = meminfo_value(meminfo, "HugePages_Rsvd");
    int64_t size = meminfo_value(meminfo, "Hugepagesize");
    if (free_pages < 0 || size < 0) return Error{"--hugepages: cannot read HugePages_Free/Hugepagesize from /proc/meminfo"};
    if (static_cast<uint64_t>(size) != kHugePageSize)
      return Error{"--hugepages: the default huge page size is " + std::to_string(size / 1024) + " kB, kvmig uses 2 MiB pages"};
    uint64_t need = ram / kHugePageSize;
    uint64_t have = static_cast<uint64_t>(free_pages - (rsvd > 0 ? rsvd : 0));
    if (have < need)
      return Error{"--hugepages: need " + std::to_string(need) + " free 2 MiB huge pages for " + mib(ram) + ", only " +
                   std::to_string(have) + " available (reserve them: echo " + std::to_string(need) +
                   " > /proc/sys/vm/nr_hugepages)"};
    return ok();
  }
  int64_t avail = meminfo_value(meminfo, "MemAvailable");
  if (avail < 0) return ok();  // very old kernels: cannot judge, let mmap decide
  if (ram > static_cast<uint64_t>(avail))
    return Error{"guest memory " + mib(ram) + " exceeds the host's available memory (" + mib(avail) + " MemAvailable)"};
  return ok();
}

Result<uint64_t> parse_size(const std::string& text) {
  if (text.empty() || !std::isdigit(static_cast<unsigned char>(text[0]))) return Error{"bad size '" + text + "' (use e.g. 512M, 1G)"};
  size_t pos = 0;
  unsigned long long v = 0;
  try {
    v = std::stoull(text, &pos, 10);
  } catch (...) {
    return Error{"bad size '" + text + "' (use e.g. 512M, 1G)"};
  }
  std::string suffix = text.substr(pos);
  uint64_t mult = 1;
  if (suffix == "" || suffix == "B") mult = 1;
  else if (suffix == "K" || suffix == "k" || suffix == "KiB") mult = kKiB;
  else if (suffix == "M" || suffix == "m" || suffix == "MiB") mult = kMiB;
  else if (suffix == "G" || suffix == "g" || suffix == "GiB") mult = kGiB;
  else if (suffix == "T" || suffix == "t" || suffix == "TiB") mult = 1024 * kGiB;
  else return Error{"bad size '" + text + "': unknown suffix '" + suffix + "' (use K, M, G or T)"};
  if (v > UINT64_MAX / mult) return Error{"bad size '" + text + "': too large"};
  return static_cast<uint64_t>(v * mult);
}

Result<GuestMemory> GuestMemory::create(int vm_fd, uint64_t ram, bool hugepages) {
  std::string meminfo;
  {
    std::ifstream f("/proc/meminfo");
    std::stringstream ss;
    ss << f.rdbuf();
    meminfo = ss.str();
  }
  KVMIG_TRY(check_host_memory(ram, hugepages, meminfo));

  GuestMemory mem;
  mem.vm_fd_ = vm_fd;
  mem.ram_size_ = ram;
  mem.hugepages_ = hugepages;
  for (const SlotPlan& p : plan_memory_layout(ram)) {
    // Anonymous RAM is MAP_NORESERVE so an 8 GiB guest starts in microseconds; the
    // MemAvailable check above stands in for the commit check the kernel skips. Huge pages
    // are reserved by mmap itself, so a shortage fails here and not at the guest's first touch.
    int flags = MAP_PRIVATE | MAP_ANONYMOUS;
    flags |= hugepages ? (MAP_HUGETLB | (21 << MAP_HUGE_SHIFT)) : MAP_NORESERVE;
    void* host = ::mmap(nullptr, p.size, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (host == MAP_FAILED) {
      Error e = Error::from_errno("mmap guest RAM slot " + std::to_string(p.slot) + " (" + mib(p.size) + ")");
      if (hugepages) e.message += " (not enough free 2 MiB huge pages?)";
      return e;
    }
    mem.regions_.push_back({p.slot, p.gpa, p.size, static_cast<uint8_t*>(host)});
    mem.flags_.push_back(0);
    // Transparent huge pages cut TLB and shadow-paging cost; failure only costs speed.
    if (!hugepages) ::madvise(host, p.size, MADV_HUGEPAGE);
    // Guest RAM must not leak into core dumps of a crashed VMM.
    ::madvise(host, p.size, MADV_DONTDUMP);
    KVMIG_TRY(mem.set_slot_flags(p.slot, 0));
  }
  return mem;
}

GuestMemory::GuestMemory(GuestMemory&& other) noexcept
    : vm_fd_(other.vm_fd_),
      ram_size_(other.ram_size_),
      hugepages_(other.hugepages_),
      regions_(std::move(other.regions_)),
      flags_(std::move(other.flags_)) {
  other.regions_.clear();
}

GuestMemory& GuestMemory::operator=(GuestMemory&& other) noexcept {
  if (this != &other) {
    unmap();
    vm_fd_ = other.vm_fd_;
    ram_size_ = other.ram_size_;
    hugepages_ = other.hugepages_;
    regions_ = std::move(other.regions_);
    flags_ = std::move(other.flags_);
    other.regions_.clear();
  }
  return *this;
}

GuestMemory::~GuestMemory() { unmap(); }

void GuestMemory::unmap() {
  for (const Region& r : regions_) ::munmap(r.host, r.size);
  regions_.clear();
}

uint8_t* GuestMemory::host_ptr(uint64_t gpa, uint64_t len) const {
  for (const Region& r : regions_) {
    if (gpa >= r.gpa && gpa - r.gpa <= r.size && len <= r.size - (gpa - r.gpa)) return r.host + (gpa - r.gpa);
  }
  return nullptr;
}

Result<void> GuestMemory::set_slot_flags(uint32_t slot, uint32_t flags) {
  for (size_t i = 0; i < regions_.size(); ++i) {
    const Region& r = regions_[i];
    if (r.slot != slot) continue;
    kvm_userspace_memory_region region{};
    region.slot = r.slot;
    region.flags = flags;
    region.guest_phys_addr = r.gpa;
    region.memory_size = r.size;
    region.userspace_addr = reinterpret_cast<uint64_t>(r.host);
    auto res = kvm_ioctl(vm_fd_, KVM_SET_USER_MEMORY_REGION, "KVM_SET_USER_MEMORY_REGION", &region);
    if (!res.ok()) return std::move(res.error().prefix("slot " + std::to_string(slot)));
    flags_[i] = flags;
    return ok();
  }
  return Error{"no memory slot " + std::to_string(slot)};
}

uint32_t GuestMemory::slot_flags(uint32_t slot) const {
  for (size_t i = 0; i < regions_.size(); ++i)
    if (regions_[i].slot == slot) return flags_[i];
  return 0;
}

}  // namespace kvmig::kvm
