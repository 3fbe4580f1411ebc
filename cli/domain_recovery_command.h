// `kvmig status` and `kvmig recover` for libvirt domains: what they do when given the
// source's libvirtd (--source-libvirt) as well as the destination's (--libvirt). The
// generic commands (cli/status_command.cc, cli/recover_command.cc) parse the options and
// hand over here; host/libvirt_recovery.h decides and acts.
#pragma once

#include <string>
#include <vector>

namespace kvmig::cli {

struct DomainSiteOptions {
  std::string site;            // the destination's site directory
  std::string source_site;     // the source's
  std::string libvirt;         // the destination's libvirt URI
  std::string source_libvirt;  // the source's
  std::string migration;       // checked by the caller
  std::vector<std::string> vms;  // canonical UUIDs
  bool json = false;
  bool dry_run = false;
};

// Exit statuses as the generic commands': 0 all decided / recovered, 3 some domain in doubt
// or not recoverable, 1 a site unreadable or nothing recorded, 125 bad input.
int run_domain_status(const DomainSiteOptions& options);
int run_domain_recover(const DomainSiteOptions& options);

}  // namespace kvmig::cli
