#include "host/libvirt_conn.h"

#include <libvirt/virterror.h>

#include <csignal>
#include <mutex>

#include "host/site_records.h"

namespace kvmig::host {

namespace {

void silent(void*, virErrorPtr) {}

}  // namespace

Error libvirt_error(const std::string& what) {
  virErrorPtr e = virGetLastError();
  std::string msg = e && e->message ? e->message : "unknown libvirt error";
  for (char& c : msg)
    if (c == '\n') c = ' ';
  virResetLastError();
  return Error{what + ": " + msg};
}

bool libvirt_error_is(int code) {
  virErrorPtr e = virGetLastError();
  return e && e->code == code;
}

void LibvirtDomain::reset(virDomainPtr dom) {
  if (dom_) virDomainFree(dom_);
  dom_ = dom;
}

std::string LibvirtDomain::name() const {
  const char* n = dom_ ? virDomainGetName(dom_) : nullptr;
  return n ? n : "";
}

Result<std::string> LibvirtDomain::uuid() const {
  char buf[VIR_UUID_STRING_BUFLEN];
  if (virDomainGetUUIDString(dom_, buf) < 0) return libvirt_error("virDomainGetUUIDString " + name());
  return canonical_uuid(buf);
}

Result<bool> LibvirtDomain::active() const {
  int a = virDomainIsActive(dom_);
  if (a < 0) return libvirt_error("virDomainIsActive " + name());
  return a == 1;
}

Result<int> LibvirtDomain::state() const {
  int state = 0, reason = 0;
  if (virDomainGetState(dom_, &state, &reason, 0) < 0) return libvirt_error("virDomainGetState " + name());
  return state;
}

Result<std::string> LibvirtDomain::xml(unsigned flags) const {
  char* x = virDomainGetXMLDesc(dom_, flags);
  if (!x) return libvirt_error("virDomainGetXMLDesc " + name());
  std::string out(x);
  free(x);
  return out;
}

Result<LibvirtConn> LibvirtConn::open(const std::string& uri) {
  static std::once_flag quiet;
  std::call_once(quiet, [] {
    virSetErrorFunc(nullptr, silent);
    // libvirt's client writes to the daemon's socket with plain write(): a daemon that died
    // (kill -9 of the destination's libvirtd mid-migration) would otherwise end kvmig by
    // SIGPIPE before it could fence the destination or say where the VM is. libvirt asks its
    // applications to ignore SIGPIPE; the write then fails with EPIPE, an ordinary error.
    std::signal(SIGPIPE, SIG_IGN);
  });
  LibvirtConn c;
  c.conn_ = virConnectOpen(uri.c_str());
  if (!c.conn_) return libvirt_error("virConnectOpen " + uri);
  c.uri_ = uri;
  return c;
}

LibvirtConn& LibvirtConn::operator=(LibvirtConn&& other) noexcept {
  if (this != &other) {
    if (conn_) virConnectClose(conn_);
    conn_ = std::exchange(other.conn_, nullptr);
    uri_ = std::move(other.uri_);
  }
  return *this;
}

LibvirtConn::~LibvirtConn() {
  if (conn_) virConnectClose(conn_);
}

Result<LibvirtDomain> LibvirtConn::by_name(const std::string& name) const {
  virDomainPtr d = virDomainLookupByName(conn_, name.c_str());
  if (!d) return libvirt_error("domain " + name + " at " + uri_);
  return LibvirtDomain(d);
}

Result<LibvirtDomain> LibvirtConn::by_uuid(const std::string& uuid) const {
  virDomainPtr d = virDomainLookupByUUIDString(conn_, uuid.c_str());
  if (!d) {
    if (libvirt_error_is(VIR_ERR_NO_DOMAIN)) {
      virResetLastError();
      return LibvirtDomain();
    }
    return libvirt_error("domain " + uuid + " at " + uri_);
  }
  return LibvirtDomain(d);
}

Result<LibvirtDomain> LibvirtConn::define(const std::string& xml) const {
  virDomainPtr d = virDomainDefineXML(conn_, xml.c_str());
  if (!d) return libvirt_error("virDomainDefineXML at " + uri_);
  return LibvirtDomain(d);
}

}  // namespace kvmig::host
