// kvm_ioctl: the one way kvmig talks to /dev/kvm, so every failure names the ioctl and errno.
#pragma once

#include "kvm/kvm_uapi.h"
#include <sys/ioctl.h>

#include <cerrno>
#include <cstdint>
#include <type_traits>

#include "base/result.h"

namespace kvmig::kvm {

// Returns the ioctl's non-negative result, or Error "NAME: strerror(errno)".
// KVM_RUN interrupted by a signal (EINTR) is how the vCPU loop is kicked, and a KVM_RUN with
// immediate_exit set also ends with EINTR: both come back as the value -EINTR, not an error.
template <class Arg>
Result<int> kvm_ioctl(int fd, unsigned long request, const char* name, Arg arg) {
  int r;
  if constexpr (std::is_pointer_v<Arg>) {
    r = ::ioctl(fd, request, arg);
  } else {
    r = ::ioctl(fd, request, static_cast<unsigned long>(arg));
  }
  if (r >= 0) return r;
  int err = errno;
  if (request == KVM_RUN && err == EINTR) return -EINTR;
  return Error::from_errno(name, err);
}

// For ioctls without an argument.
inline Result<int> kvm_ioctl(int fd, unsigned long request, const char* name) {
  return kvm_ioctl(fd, request, name, 0UL);
}

}  // namespace kvmig::kvm
