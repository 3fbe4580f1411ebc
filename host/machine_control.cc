#include "host/machine_control.h"

#include <chrono>

namespace kvmig::host {

nlohmann::json stats_to_json(const kvm::MachineStats& s) {
  return {
      {"exits",
       {{"io", s.exits_io},
        {"mmio", s.exits_mmio},
        {"hlt", s.exits_hlt},
        {"intr", s.exits_intr},
        {"shutdown", s.exits_shutdown},
        {"dirty_ring_full", s.exits_dirty_ring_full},
        {"other", s.exits_other}}},
      {"unknown_io", s.unknown_io},
      {"unknown_mmio", s.unknown_mmio},
      {"console_bytes", s.console_bytes},
      {"pause", {{"count", s.pauses}, {"min_us", s.pause_min_us}, {"avg_us", s.pause_avg_us}, {"max_us", s.pause_max_us}}},
      {"create_us", s.create_us},
      {"first_console_byte_us", s.first_console_byte_us},
  };
}

void register_machine_commands(ControlServer& server, kvm::Machine& machine) {
  server.register_command("pause", [&machine](const nlohmann::json&) -> Result<nlohmann::json> {
    auto begin = std::chrono::steady_clock::now();
    KVMIG_TRY(machine.pause());
    double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - begin).count();
    return nlohmann::json{{"paused", true}, {"latency_us", us}};
  });
  server.register_command("resume", [&machine](const nlohmann::json&) -> Result<nlohmann::json> {
    KVMIG_TRY(machine.resume());
    return nlohmann::json{{"paused", false}};
  });
  server.register_command("stats", [&machine](const nlohmann::json&) -> Result<nlohmann::json> {
    nlohmann::json j = stats_to_json(machine.stats());
    j["paused"] = machine.paused();
    j["memory"] = machine.memory().ram_size();
    j["vcpus"] = static_cast<int>(machine.vcpus().size());
    return j;
  });
}

}  // namespace kvmig::host
