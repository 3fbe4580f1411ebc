// kvmig: one binary, subcommands like virsh. Thin: parses, calls the libraries.
#include <CLI/CLI.hpp>

#include <cstdio>

#include "cli/vm_state_command.h"

void add_vm_command(CLI::App& app);
void add_migrate_command(CLI::App& app);
void add_receive_command(CLI::App& app);
void add_status_command(CLI::App& app);
void add_recover_command(CLI::App& app);
void add_hook_command(CLI::App& app);     // cli/hook_command.cc
void add_libvirt_command(CLI::App& app);  // cli/libvirt_command.cc
void add_disk_command(CLI::App& app);

int main(int argc, char** argv) {
  CLI::App app{"kvmig: live migration of KVM virtual machines"};
  app.require_subcommand(1);
  add_vm_command(app);
  kvmig::cli::add_vm_state_commands(app);  // save/restore, under "vm"
  add_migrate_command(app);
  add_receive_command(app);
  add_status_command(app);
  add_recover_command(app);
  add_hook_command(app);
  add_libvirt_command(app);
  add_disk_command(app);
  CLI11_PARSE(app, argc, argv);
  return 0;
}
