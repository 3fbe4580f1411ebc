// The VMM's own port devices: the debug console on 0xe9 (QEMU's isa-debugcon), the exit
// port on 0xf4 (isa-debug-exit, but the status is passed through unchanged), and counters
// for any other port or MMIO access nobody claims, logged rate-limited.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace kvmig::kvm {

inline constexpr uint16_t kConsolePort = 0xe9;
inline constexpr uint16_t kExitPort = 0xf4;

class IoDevices {
 public:
  // Console bytes go to `console_fd` (not owned; e.g. 1 for stdout).
  explicit IoDevices(int console_fd) : console_fd_(console_fd) {}
  ~IoDevices() { flush(); }

  struct IoResult {
    bool exit = false;    // the guest wrote the exit port
    uint32_t status = 0;  // its value
  };
  // One KVM_EXIT_IO: `count` accesses of `size` bytes at `data` (string I/O repeats).
  IoResult handle_io(int vcpu, uint16_t port, bool out, uint8_t size, uint32_t count, uint8_t* data);
  // One KVM_EXIT_MMIO to an address no device claims: reads see all-ones.
  void handle_mmio(int vcpu, uint64_t addr, bool write, uint32_t len, uint8_t* data);

  // A device answering ports [base, base + count): one call per access, `offset` from base.
  // Register every device before the vCPUs start; lookups then need no lock.
  using PortHandler = std::function<void(uint16_t offset, bool out, uint8_t size, uint8_t* data)>;
  void add_ports(uint16_t base, uint16_t count, PortHandler handler);

  // Called with each complete console line (without '\n'), from a vCPU thread.
  void set_console_listener(std::function<void(std::string_view)> listener);
  void flush();

  uint64_t unknown_io() const { return unknown_io_.load(std::memory_order_relaxed); }
  uint64_t unknown_mmio() const { return unknown_mmio_.load(std::memory_order_relaxed); }
  uint64_t console_bytes() const { return console_bytes_.load(std::memory_order_relaxed); }
  // When the first console byte arrived (epoch 0 if none yet).
  std::chrono::steady_clock::time_point first_console_byte() const;

 private:
  void console_byte(uint8_t byte);
  void write_out(const char* data, size_t len);
  static bool should_log(uint64_t n) { return n <= 10 || (n & (n - 1)) == 0; }

  struct PortRange {
    uint16_t base;
    uint16_t count;
    PortHandler handler;
  };

  int console_fd_;
  std::vector<PortRange> port_devices_;
  mutable std::mutex mu_;
  std::string line_;
  std::string pending_;
  std::function<void(std::string_view)> listener_;
  std::chrono::steady_clock::time_point first_byte_{};
  std::atomic<uint64_t> unknown_io_{0};
  std::atomic<uint64_t> unknown_mmio_{0};
  std::atomic<uint64_t> console_bytes_{0};
};

}  // namespace kvmig::kvm
