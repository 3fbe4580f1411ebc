#include "kvm/kernel_image.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "base/fd.h"
#include "kvm/boot_layout.h"
#include "kvm/guest_memory.h"

namespace kvmig::kvm {

namespace {
constexpr uint64_t kMaxKernelFile = 512 * kMiB;

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}
}  // namespace

Result<void> check_image_fits(const KernelImage& image, uint64_t ram) {
  if (image.segments.empty()) return Error{"no loadable segments"};
  const std::vector<SlotPlan> slots = plan_memory_layout(ram);
  bool entry_ok = false;
  for (const KernelImage::Segment& s : image.segments) {
    uint64_t end = s.gpa + s.mem_size;
    if (end < s.gpa) return Error{"segment at " + hex(s.gpa) + " wraps around the address space"};
    bool inside = false;
    for (const SlotPlan& slot : slots)
      inside |= s.gpa >= slot.gpa && end <= slot.gpa + slot.size;
    if (!inside)
      return Error{"segment " + hex(s.gpa) + ".." + hex(end) + " is outside guest RAM (" + std::to_string(ram / kMiB) +
                   " MiB)"};
    if (s.gpa < kBootAreaEnd && end > kEbdaStart)
      return Error{"segment " + hex(s.gpa) + ".." + hex(end) + " overlaps the reserved area " + hex(kEbdaStart) + ".." +
                   hex(kBootAreaEnd)};
    entry_ok |= image.entry >= s.gpa && image.entry < end;
  }
  if (!entry_ok) return Error{"entry point " + hex(image.entry) + " is outside the loaded segments"};
  return ok();
}

Result<std::vector<uint8_t>> read_kernel_file(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return Error::from_errno("kernel " + path);
  struct stat st {};
  if (::fstat(fd.get(), &st) < 0) return Error::from_errno("stat kernel " + path);
  if (!S_ISREG(st.st_mode)) return Error{"kernel " + path + ": not a regular file"};
  if (static_cast<uint64_t>(st.st_size) > kMaxKernelFile)
    return Error{"kernel " + path + ": file too large (" + std::to_string(st.st_size / kMiB) + " MiB)"};
  std::vector<uint8_t> data(st.st_size);
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::read(fd.get(), data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error::from_errno("read kernel " + path);
    if (n == 0) break;
    done += n;
  }
  data.resize(done);
  return data;
}

Result<void> copy_image(const KernelImage& image, const std::vector<uint8_t>& file, GuestMemory& memory,
                        bool zero_bss) {
  for (const KernelImage::Segment& s : image.segments) {
    if (s.file_size > s.mem_size || s.file_offset > file.size() || s.file_size > file.size() - s.file_offset)
      return Error{"segment at " + hex(s.gpa) + " extends past the end of the file"};
    uint8_t* host = memory.host_ptr(s.gpa, s.mem_size);
    if (!host) return Error{"segment at " + hex(s.gpa) + " is outside guest RAM"};
    std::memcpy(host, file.data() + s.file_offset, s.file_size);
    if (zero_bss) std::memset(host + s.file_size, 0, s.mem_size - s.file_size);
  }
  return ok();
}

}  // namespace kvmig::kvm
