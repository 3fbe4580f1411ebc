// LibvirtConn / LibvirtDomain: owners of a virConnectPtr and a virDomainPtr (closed / freed
// once, on destruction), and libvirt's errors as one line with what was being done:
// "virDomainMigrateToURI3 vm1 -> qemu+unix:///system: operation failed: ...".
// libvirt's default error handler prints every error on stderr; kvmig reports errors itself,
// so opening a connection silences it (process-wide, once), and ignores SIGPIPE, as libvirt
// asks of its applications (a dead daemon is then an error, not the end of kvmig).
#pragma once

#include <libvirt/libvirt.h>

#include <string>
#include <utility>

#include "base/result.h"

namespace kvmig::host {

// The last libvirt error of this thread, prefixed with `what`; reset afterwards.
Error libvirt_error(const std::string& what);
// Whether the last libvirt error of this thread has this code (e.g. VIR_ERR_NO_DOMAIN).
bool libvirt_error_is(int code);

class LibvirtDomain {
 public:
  LibvirtDomain() = default;
  explicit LibvirtDomain(virDomainPtr dom) : dom_(dom) {}
  LibvirtDomain(LibvirtDomain&& other) noexcept : dom_(std::exchange(other.dom_, nullptr)) {}
  LibvirtDomain& operator=(LibvirtDomain&& other) noexcept {
    if (this != &other) reset(std::exchange(other.dom_, nullptr));
    return *this;
  }
  LibvirtDomain(const LibvirtDomain&) = delete;
  LibvirtDomain& operator=(const LibvirtDomain&) = delete;
  ~LibvirtDomain() { reset(); }

  virDomainPtr get() const { return dom_; }
  explicit operator bool() const { return dom_ != nullptr; }
  void reset(virDomainPtr dom = nullptr);

  std::string name() const;
  Result<std::string> uuid() const;  // canonical lower-case
  Result<bool> active() const;
  Result<int> state() const;  // VIR_DOMAIN_RUNNING, VIR_DOMAIN_PAUSED, ...
  Result<std::string> xml(unsigned flags) const;

 private:
  virDomainPtr dom_ = nullptr;
};

class LibvirtConn {
 public:
  static Result<LibvirtConn> open(const std::string& uri);
  LibvirtConn() = default;
  LibvirtConn(LibvirtConn&& other) noexcept
      : conn_(std::exchange(other.conn_, nullptr)), uri_(std::move(other.uri_)) {}
  LibvirtConn& operator=(LibvirtConn&& other) noexcept;
  LibvirtConn(const LibvirtConn&) = delete;
  LibvirtConn& operator=(const LibvirtConn&) = delete;
  ~LibvirtConn();

  virConnectPtr get() const { return conn_; }
  const std::string& uri() const { return uri_; }

  Result<LibvirtDomain> by_name(const std::string& name) const;
  // Empty LibvirtDomain (not an error) when no domain has this UUID.
  Result<LibvirtDomain> by_uuid(const std::string& uuid) const;
  Result<LibvirtDomain> define(const std::string& xml) const;

 private:
  virConnectPtr conn_ = nullptr;
  std::string uri_;
};

}  // namespace kvmig::host
