#include "kvm/io_devices.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace kvmig::kvm {

IoDevices::IoResult IoDevices::handle_io(int vcpu, uint16_t port, bool out, uint8_t size, uint32_t count,
                                         uint8_t* data) {
  IoResult result;
  if (port == kConsolePort) {
    if (out) {
      for (uint32_t i = 0; i < count; ++i) console_byte(data[i * size]);
    } else {
      std::memset(data, kConsolePort, size_t{size} * count);  // isa-debugcon reads back 0xe9
    }
    return result;
  }
  if (port == kExitPort && out) {
    uint32_t status = 0;
    std::memcpy(&status, data, size <= 4 ? size : 4);
    flush();
    result.exit = true;
    result.status = status;
    return result;
  }
  for (const PortRange& r : port_devices_) {
    if (port >= r.base && port - r.base < r.count) {
      for (uint32_t i = 0; i < count; ++i) r.handler(static_cast<uint16_t>(port - r.base), out, size, data + size_t{i} * size);
      return result;
    }
  }
  if (!out) std::memset(data, 0xff, size_t{size} * count);  // nothing answers: a floating bus
  uint64_t n = unknown_io_.fetch_add(1, std::memory_order_relaxed) + 1;
  if (should_log(n))
    std::fprintf(stderr, "kvmig: vCPU %d: unhandled I/O %s port 0x%x size %u (%llu so far)\n", vcpu, out ? "out" : "in",
                 port, size, static_cast<unsigned long long>(n));
  return result;
}

void IoDevices::handle_mmio(int vcpu, uint64_t addr, bool write, uint32_t len, uint8_t* data) {
  if (!write) std::memset(data, 0xff, len);
  uint64_t n = unknown_mmio_.fetch_add(1, std::memory_order_relaxed) + 1;
  if (should_log(n))
    std::fprintf(stderr, "kvmig: vCPU %d: unhandled MMIO %s 0x%llx len %u (%llu so far)\n", vcpu, write ? "write" : "read",
                 static_cast<unsigned long long>(addr), len, static_cast<unsigned long long>(n));
}

void IoDevices::add_ports(uint16_t base, uint16_t count, PortHandler handler) {
  port_devices_.push_back({base, count, std::move(handler)});
}

void IoDevices::set_console_listener(std::function<void(std::string_view)> listener) {
  std::lock_guard lock(mu_);
  listener_ = std::move(listener);
}

std::chrono::steady_clock::time_point IoDevices::first_console_byte() const {
  std::lock_guard lock(mu_);
  return first_byte_;
}

void IoDevices::console_byte(uint8_t byte) {
  std::lock_guard lock(mu_);
  if (console_bytes_.fetch_add(1, std::memory_order_relaxed) == 0) first_byte_ = std::chrono::steady_clock::now();
  pending_.push_back(static_cast<char>(byte));
  if (byte == '\n') {
    if (listener_) listener_(line_);
    line_.clear();
  } else if (line_.size() < 4096) {
    line_.push_back(static_cast<char>(byte));
  }
  // Whole lines reach the file at once so readers see complete reports; a guest that never
  // ends a line still gets its bytes out every 4 KiB.
  if (byte == '\n' || pending_.size() >= 4096) {
    write_out(pending_.data(), pending_.size());
    pending_.clear();
  }
}

void IoDevices::flush() {
  std::lock_guard lock(mu_);
  write_out(pending_.data(), pending_.size());
  pending_.clear();
}

void IoDevices::write_out(const char* data, size_t len) {
  while (len > 0 && console_fd_ >= 0) {
    ssize_t n = ::write(console_fd_, data, len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // a console that went away must not stop the guest
    data += n;
    len -= n;
  }
}

}  // namespace kvmig::kvm
