#include "cli/command_args.h"

#include <CLI/CLI.hpp>
#include <cstdio>

#include "host/site_records.h"

namespace kvmig::cli {

void command_fail(const char* command, int status, const std::string& message) {
  std::fprintf(stderr, "kvmig: %s: %s\n", command, message.c_str());
  throw CLI::RuntimeError(status);
}

void check_vm_selection(const char* command, int usage_status, const std::string& migration,
                        bool required, std::vector<std::string>& vms) {
  if (required || !migration.empty()) {
    if (auto r = host::check_migration_id(migration); !r.ok())
      command_fail(command, usage_status, "--migration: " + r.error().message);
  }
  for (std::string& vm : vms) {
    auto u = host::canonical_uuid(vm);
    if (!u.ok()) command_fail(command, usage_status, "--vm: " + u.error().message);
    vm = *u;
  }
}

}  // namespace kvmig::cli
