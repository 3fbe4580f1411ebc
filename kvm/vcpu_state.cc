#include "kvm/kvm_uapi.h"  // first: fixes <linux/kvm.h> layouts for C++
#include "kvm/vcpu_state.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>

#include "kvm/ioctl.h"
#include "kvm/state_file.h"

namespace kvmig::kvm {
namespace {

enum Tag : uint32_t {
  kRegs = 1, kSregs, kSregs2, kFpu, kXsave, kXcrs, kMsrs, kLapic, kEvents, kMpState,
  kDebugregs, kTscKhz, kTagLimit
};
const char* const kTagNames[kTagLimit] = {"?",      "regs",   "sregs",    "sregs2", "fpu",
                                          "xsave",  "xcrs",   "msrs",     "lapic",  "events",
                                          "mp_state", "debugregs", "tsc_khz"};

constexpr uint32_t kMsrTscDeadline = 0x6e0;
constexpr uint32_t kMaxMsrs = 16384;
constexpr uint32_t kMaxXsave = 1u << 20;

struct MsrEntry {
  uint32_t index;
  uint32_t zero;
  uint64_t data;
};
static_assert(sizeof(MsrEntry) == sizeof(kvm_msr_entry));

KVMIG_CHECK_KVM_UAPI_LAYOUT();
constexpr size_t kXsaveLegacySize = 4096;  // KVM_GET_XSAVE's fixed area; XSAVE2 may be larger

// struct kvm_msrs with room for n entries (uint32 nmsrs, uint32 pad, entries at offset 8),
// in uint64 words so the entries are aligned.
class MsrBuffer {
 public:
  explicit MsrBuffer(size_t n) : words_(1 + 2 * n, 0) {
    static_assert(sizeof(kvm_msr_entry) == 16);
    *reinterpret_cast<uint32_t*>(words_.data()) = static_cast<uint32_t>(n);
  }
  void* ioctl_arg() { return words_.data(); }
  kvm_msr_entry* entries() { return reinterpret_cast<kvm_msr_entry*>(words_.data() + 1); }
  void set_count(uint32_t n) { *reinterpret_cast<uint32_t*>(words_.data()) = n; }

 private:
  std::vector<uint64_t> words_;
};

template <class T>
void put_record(PayloadWriter& w, Tag tag, const T& value) {
  w.put(static_cast<uint32_t>(tag));
  w.put(static_cast<uint32_t>(sizeof(T)));
  w.put(value);
}

void put_record_bytes(PayloadWriter& w, Tag tag, const void* p, size_t n) {
  w.put(static_cast<uint32_t>(tag));
  w.put(static_cast<uint32_t>(n));
  w.put_bytes(p, n);
}

Result<std::vector<uint32_t>> msr_list(int kvm_fd, unsigned long request, const char* name) {
  uint32_t count = 0;  // a kvm_msr_list with room for no indices
  // E2BIG with nmsrs filled in is the documented way to learn the size.
  if (::ioctl(kvm_fd, request, &count) < 0 && errno != E2BIG) {
    if (errno == EINVAL || errno == ENOTTY) return std::vector<uint32_t>{};  // old kernel
    return Error::from_errno(name);
  }
  if (count > kMaxMsrs) return Error{std::string(name) + ": implausible MSR count"};
  // struct kvm_msr_list: uint32 nmsrs, then the indices.
  std::vector<uint32_t> buf(1 + count);
  buf[0] = count;
  KVMIG_TRY(kvm_ioctl(kvm_fd, request, name, buf.data()));
  if (buf[0] > count) return Error{std::string(name) + ": list grew while read"};
  return std::vector<uint32_t>(buf.begin() + 1, buf.begin() + 1 + buf[0]);
}

// Every record of a parsed section, checked, before anything is applied.
struct ParsedVcpu {
  const uint8_t* rec[kTagLimit] = {};
  uint32_t len[kTagLimit] = {};
};

Result<ParsedVcpu> parse(const StateSection& s) {
  if (s.version != kVcpuSectionVersion)
    return Error{"section '" + s.id + "': unsupported version " + std::to_string(s.version)};
  ParsedVcpu p;
  PayloadReader r(s);
  while (r.remaining() > 0) {
    uint32_t tag = 0, len = 0;
    KVMIG_TRY(r.get(tag, "record tag"));
    KVMIG_TRY(r.get(len, "record length"));
    if (tag == 0 || tag >= kTagLimit)
      return Error{"section '" + s.id + "': unknown record tag " + std::to_string(tag)};
    if (p.rec[tag] != nullptr)
      return Error{"section '" + s.id + "': duplicate record " + kTagNames[tag]};
    KVMIG_ASSIGN(p.rec[tag], r.view(len, kTagNames[tag]));
    p.len[tag] = len;
  }
  auto expect = [&](Tag tag, size_t size, bool required) -> Result<void> {
    if (p.rec[tag] == nullptr) {
      if (!required) return ok();
      return Error{"section '" + s.id + "': missing record " + kTagNames[tag]};
    }
    if (size != 0 && p.len[tag] != size)
      return Error{"section '" + s.id + "': record " + kTagNames[tag] + " is " +
                   std::to_string(p.len[tag]) + " bytes, expected " + std::to_string(size)};
    return ok();
  };
  KVMIG_TRY(expect(kRegs, sizeof(kvm_regs), true));
  KVMIG_TRY(expect(kSregs, sizeof(kvm_sregs), false));
  KVMIG_TRY(expect(kSregs2, sizeof(kvm_sregs2), false));
  if ((p.rec[kSregs] == nullptr) == (p.rec[kSregs2] == nullptr))
    return Error{"section '" + s.id + "': needs exactly one of sregs, sregs2"};
  KVMIG_TRY(expect(kFpu, sizeof(kvm_fpu), true));
  KVMIG_TRY(expect(kXcrs, sizeof(kvm_xcrs), false));
  KVMIG_TRY(expect(kMsrs, 0, true));
  KVMIG_TRY(expect(kLapic, sizeof(kvm_lapic_state), true));
  KVMIG_TRY(expect(kEvents, sizeof(kvm_vcpu_events), true));
  KVMIG_TRY(expect(kMpState, sizeof(kvm_mp_state), true));
  KVMIG_TRY(expect(kDebugregs, sizeof(kvm_debugregs), true));
  KVMIG_TRY(expect(kTscKhz, sizeof(uint32_t), true));
  if (p.len[kMsrs] % sizeof(MsrEntry) != 0 || p.len[kMsrs] / sizeof(MsrEntry) > kMaxMsrs)
    return Error{"section '" + s.id + "': msrs record has a bad length " +
                 std::to_string(p.len[kMsrs])};
  if (p.rec[kXsave] != nullptr &&
      (p.len[kXsave] < kXsaveLegacySize || p.len[kXsave] > kMaxXsave))
    return Error{"section '" + s.id + "': xsave record has a bad length " +
                 std::to_string(p.len[kXsave])};
  return p;
}

template <class T>
T record_as(const ParsedVcpu& p, Tag tag) {
  T v;
  std::memcpy(&v, p.rec[tag], sizeof(T));
  return v;
}

Result<void> set_msrs(int vcpu_fd, const std::vector<MsrEntry>& entries, const std::string& id) {
  if (entries.empty()) return ok();
  MsrBuffer buf(entries.size());
  std::memcpy(buf.entries(), entries.data(), entries.size() * sizeof(MsrEntry));
  KVMIG_ASSIGN(int n, kvm_ioctl(vcpu_fd, KVM_SET_MSRS, "KVM_SET_MSRS", buf.ioctl_arg()));
  // KVM_SET_MSRS stops at the first MSR it refuses and returns how many it set.
  if (static_cast<size_t>(n) != entries.size()) {
    char hex[16];
    std::snprintf(hex, sizeof(hex), "%#x", entries[n].index);
    return Error{id + ": KVM_SET_MSRS refused MSR " + hex + " (value " +
                 std::to_string(entries[n].data) + ")"};
  }
  return ok();
}

}  // namespace

std::string vcpu_section_id(int index) { return "vcpu." + std::to_string(index); }

Result<VcpuStateCaps> probe_vcpu_state_caps(int vm_fd) {
  VcpuStateCaps caps;
  auto check = [&](int cap) {
    int r = ::ioctl(vm_fd, KVM_CHECK_EXTENSION, cap);
    return r < 0 ? 0 : r;
  };
  caps.sregs2 = check(KVM_CAP_SREGS2) > 0;
  caps.xcrs = check(KVM_CAP_XCRS) > 0;
  caps.tsc_control = check(KVM_CAP_TSC_CONTROL) > 0;
  int xsave2 = check(KVM_CAP_XSAVE2);
  if (xsave2 > 0) {
    if (xsave2 < static_cast<int>(kXsaveLegacySize) || xsave2 > static_cast<int>(kMaxXsave))
      return Error{"KVM_CAP_XSAVE2: implausible size " + std::to_string(xsave2)};
    caps.xsave_size = static_cast<uint32_t>(xsave2);
  } else if (check(KVM_CAP_XSAVE) > 0) {
    caps.xsave_size = kXsaveLegacySize;
  }
  return caps;
}

Result<std::vector<uint32_t>> migratable_msrs(int kvm_fd, int vcpu_fd) {
  KVMIG_ASSIGN(auto all, msr_list(kvm_fd, KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST"));
  std::sort(all.begin(), all.end());
  all.erase(std::unique(all.begin(), all.end()), all.end());

  // KVM_GET_MSRS reads in order and stops at the first MSR it refuses, returning how many
  // it read: ask for the whole rest of the list each time and drop the refused one. That
  // is one ioctl per refused MSR plus one, not one per MSR (hundreds): each takes the vCPU
  // mutex, and on some hosts a vCPU ioctl costs a full exit.
  std::vector<uint32_t> kept;
  size_t next = 0;
  while (next < all.size()) {
    const size_t n = all.size() - next;
    MsrBuffer buf(n);
    for (size_t i = 0; i < n; ++i) buf.entries()[i].index = all[next + i];
    KVMIG_ASSIGN(int read, kvm_ioctl(vcpu_fd, KVM_GET_MSRS, "KVM_GET_MSRS (probe)", buf.ioctl_arg()));
    if (read < 0 || static_cast<size_t>(read) > n) return Error{"KVM_GET_MSRS (probe): implausible count"};
    kept.insert(kept.end(), all.begin() + next, all.begin() + next + read);
    next += read + 1;  // skips the refused one (if any)
  }
  return kept;
}

Result<StateSection> save_vcpu(int vcpu_fd, int index, const std::vector<uint32_t>& msrs,
                               const VcpuStateCaps& caps) {
  PayloadWriter w;
  kvm_regs regs{};
  KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_GET_REGS, "KVM_GET_REGS", &regs));
  put_record(w, kRegs, regs);
  if (caps.sregs2) {
    kvm_sregs2 sregs2{};
    KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_GET_SREGS2, "KVM_GET_SREGS2", &sregs2));
    put_record(w, kSregs2, sregs2);
  } else {
    kvm_sregs sregs{};
    KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_GET_SREGS, "KVM_GET_SREGS", &sregs));
    put_record(w, kSregs, sregs);
  }
  kvm_fpu fpu{};
  KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_GET_FPU, "KVM_GET_FPU", &fpu));
  put_record(w, kFpu, fpu);
  if (caps.xsave_size > 0) {
    std::vector<uint8_t> xsave(caps.xsave_size);
    if (caps.xsave_size > kXsaveLegacySize)
      KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_GET_XSAVE2, "KVM_GET_XSAVE2", xsave.data()));
    else
      KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_GET_XSAVE, "KVM_GET_XSAVE", xsave.data()));
    put_record_bytes(w, kXsave, xsave.data(), xsave.size());
  }
  if (caps.xcrs) {
    kvm_xcrs xcrs{};
    KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_GET_XCRS, "KVM_GET_XCRS", &xcrs));
    put_record(w, kXcrs, xcrs);
  }

  MsrBuffer buf(msrs.size());
  for (size_t i = 0; i < msrs.size(); ++i) buf.entries()[i].index = msrs[i];
  if (!msrs.empty()) {
    KVMIG_ASSIGN(int n, kvm_ioctl(vcpu_fd, KVM_GET_MSRS, "KVM_GET_MSRS", buf.ioctl_arg()));
    if (static_cast<size_t>(n) != msrs.size())
      return Error{"KVM_GET_MSRS: read " + std::to_string(n) + " of " +
                   std::to_string(msrs.size()) + " MSRs"};
  }
  put_record_bytes(w, kMsrs, buf.entries(), msrs.size() * sizeof(kvm_msr_entry));

  kvm_lapic_state lapic{};
  KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_GET_LAPIC, "KVM_GET_LAPIC", &lapic));
  put_record(w, kLapic, lapic);
  kvm_vcpu_events events{};
  KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS", &events));
  put_record(w, kEvents, events);
  kvm_mp_state mp{};
  KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_GET_MP_STATE, "KVM_GET_MP_STATE", &mp));
  put_record(w, kMpState, mp);
  kvm_debugregs dbg{};
  KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS", &dbg));
  put_record(w, kDebugregs, dbg);
  uint32_t khz = 0;
  if (auto r = kvm_ioctl(vcpu_fd, KVM_GET_TSC_KHZ, "KVM_GET_TSC_KHZ"); r.ok()) khz = *r;
  put_record(w, kTscKhz, khz);

  return StateSection{vcpu_section_id(index), kVcpuSectionVersion, w.take()};
}

// Restore order, and why:
//  1. TSC rate first: KVM converts the TSC value written below using the vCPU's rate.
//  2. sregs(2) before anything that depends on modes: they carry EFER and the APIC base, and
//     KVM reads the LAPIC state (xAPIC vs x2APIC ids) according to the APIC base.
//  3. regs, FPU, XSAVE, XCRs: plain register files (XSAVE after FPU so the larger one wins).
//  4. MSRs, with IA32_TSC among them, but not TSC_DEADLINE.
//  5. MP state, then LAPIC: KVM_SET_LAPIC resets the LAPIC timer, so TSC_DEADLINE is written
//     only after it, and after IA32_TSC so the deadline is armed against the restored TSC.
//  6. vCPU events last but debug registers: KVM_SET_SREGS/KVM_SET_LAPIC may queue or drop
//     pending interrupts; the events record is the authority on what is pending.
Result<void> restore_vcpu(int vcpu_fd, const StateSection& section, const VcpuStateCaps& caps) {
  KVMIG_ASSIGN(ParsedVcpu p, parse(section));
  const std::string& id = section.id;

  // Checks that need this host's capabilities, still before the first change.
  std::vector<uint8_t> xsave;
  if (p.rec[kXsave] != nullptr) {
    if (caps.xsave_size == 0) return Error{id + ": saved XSAVE state but this host has no XSAVE"};
    uint32_t saved = p.len[kXsave];
    // A larger saved area is fine as long as the extra components were unused (all zero);
    // otherwise this host's CPU lacks state the guest had (e.g. AMX tiles).
    if (saved > caps.xsave_size &&
        std::any_of(p.rec[kXsave] + caps.xsave_size, p.rec[kXsave] + saved,
                    [](uint8_t b) { return b != 0; }))
      return Error{id + ": saved XSAVE area (" + std::to_string(saved) +
                   " bytes) has state this host's " + std::to_string(caps.xsave_size) +
                   "-byte area cannot hold"};
    xsave.assign(std::max(saved, caps.xsave_size), 0);
    std::memcpy(xsave.data(), p.rec[kXsave], std::min(saved, caps.xsave_size));
  }
  if (p.rec[kXcrs] != nullptr && !caps.xcrs)
    return Error{id + ": saved XCRs but this host lacks KVM_CAP_XCRS"};
  std::vector<MsrEntry> msrs(p.len[kMsrs] / sizeof(MsrEntry)), deadline;
  std::memcpy(msrs.data(), p.rec[kMsrs], p.len[kMsrs]);
  for (auto it = msrs.begin(); it != msrs.end();) {
    if (it->zero != 0) return Error{id + ": malformed MSR entry"};
    if (it->index == kMsrTscDeadline) {
      deadline.push_back(*it);
      it = msrs.erase(it);
    } else {
      ++it;
    }
  }

  // 1. TSC rate.
  uint32_t khz = record_as<uint32_t>(p, kTscKhz);
  if (khz != 0) {
    auto current = kvm_ioctl(vcpu_fd, KVM_GET_TSC_KHZ, "KVM_GET_TSC_KHZ");
    // Within KVM's own 250 ppm tolerance the rates count as equal (no scaling needed).
    if (current.ok() && std::llabs(static_cast<long long>(*current) - khz) * 4000 > khz) {
      auto set = kvm_ioctl(vcpu_fd, KVM_SET_TSC_KHZ, "KVM_SET_TSC_KHZ", khz);
      if (!set)
        return Error{id + ": guest TSC runs at " + std::to_string(khz) + " kHz, this host at " +
                     std::to_string(*current) + " kHz, and KVM cannot scale it (" +
                     set.error().message + ")"};
    }
  }
  // 2. Segment and control registers.
  if (p.rec[kSregs2] != nullptr && caps.sregs2) {
    auto sregs2 = record_as<kvm_sregs2>(p, kSregs2);
    KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_SET_SREGS2, "KVM_SET_SREGS2", &sregs2));
  } else if (p.rec[kSregs2] != nullptr) {
    // Saved on a host with SREGS2, restored on one without: the PDPTRs are reloaded from
    // guest memory by KVM on the next PAE CR3 load, which is what SREGS2 exists to avoid.
    auto s2 = record_as<kvm_sregs2>(p, kSregs2);
    kvm_sregs sregs{};
    sregs.cs = s2.cs; sregs.ds = s2.ds; sregs.es = s2.es; sregs.fs = s2.fs; sregs.gs = s2.gs;
    sregs.ss = s2.ss; sregs.tr = s2.tr; sregs.ldt = s2.ldt; sregs.gdt = s2.gdt; sregs.idt = s2.idt;
    sregs.cr0 = s2.cr0; sregs.cr2 = s2.cr2; sregs.cr3 = s2.cr3; sregs.cr4 = s2.cr4;
    sregs.cr8 = s2.cr8; sregs.efer = s2.efer; sregs.apic_base = s2.apic_base;
    KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_SET_SREGS, "KVM_SET_SREGS", &sregs));
  } else {
    auto sregs = record_as<kvm_sregs>(p, kSregs);
    KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_SET_SREGS, "KVM_SET_SREGS", &sregs));
  }
  // 3. Register files.
  auto regs = record_as<kvm_regs>(p, kRegs);
  KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_SET_REGS, "KVM_SET_REGS", &regs));
  auto fpu = record_as<kvm_fpu>(p, kFpu);
  KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_SET_FPU, "KVM_SET_FPU", &fpu));
  if (!xsave.empty()) KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_SET_XSAVE, "KVM_SET_XSAVE", xsave.data()));
  if (p.rec[kXcrs] != nullptr) {
    auto xcrs = record_as<kvm_xcrs>(p, kXcrs);
    KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_SET_XCRS, "KVM_SET_XCRS", &xcrs));
  }
  // 4. MSRs.
  KVMIG_TRY(set_msrs(vcpu_fd, msrs, id));
  // 5. MP state, LAPIC, then the TSC deadline.
  auto mp = record_as<kvm_mp_state>(p, kMpState);
  KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_SET_MP_STATE, "KVM_SET_MP_STATE", &mp));
  auto lapic = record_as<kvm_lapic_state>(p, kLapic);
  KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_SET_LAPIC, "KVM_SET_LAPIC", &lapic));
  KVMIG_TRY(set_msrs(vcpu_fd, deadline, id));
  // 6. Events, debug registers.
  auto events = record_as<kvm_vcpu_events>(p, kEvents);
  // KVM_GET_VCPU_EVENTS does not mark these valid, but it did fill them in.
  events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
  KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS", &events));
  auto dbg = record_as<kvm_debugregs>(p, kDebugregs);
  dbg.flags = 0;
  KVMIG_TRY(kvm_ioctl(vcpu_fd, KVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS", &dbg));
  return ok();
}

}  // namespace kvmig::kvm
