// kvmig: one binary, subcommands like virsh. Thin: parses, calls the libraries.
#include <CLI/CLI.hpp>

#include <cstdio>

int main(int argc, char** argv) {
  CLI::App app{"kvmig: live migration of KVM virtual machines"};
  app.require_subcommand(1);
  CLI11_PARSE(app, argc, argv);
  return 0;
}
