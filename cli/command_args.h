// What the site commands (status, recover, hook, migrate-domain, disk) share about bad input
// and failures: one way to say "kvmig: COMMAND: what went wrong" and end with a chosen exit
// status, and the same checks of --migration / --vm.
#pragma once

#include <string>
#include <vector>

namespace kvmig::cli {

// Prints "kvmig: COMMAND: MESSAGE" on stderr and throws CLI::RuntimeError(STATUS), which
// CLI11_PARSE in main.cc turns into the exit status (no exit() below main).
[[noreturn]] void command_fail(const char* command, int status, const std::string& message);

// Checks MIGRATION (when it is non-empty, or always when REQUIRED) and rewrites every VM UUID
// in VMS in canonical form; a bad one fails the command with USAGE_STATUS, naming the option.
void check_vm_selection(const char* command, int usage_status, const std::string& migration,
                        bool required, std::vector<std::string>& vms);

}  // namespace kvmig::cli
