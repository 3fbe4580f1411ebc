#include "host/libvirt_placeholder.h"

#include <libvirt/virterror.h>

#include "host/site_records.h"

namespace kvmig::host {

Result<void> LibvirtPlaceholders::set_definition(const std::string& uuid, const std::string& xml) {
  KVMIG_ASSIGN(DomainXml d, read_domain_xml(xml));
  KVMIG_ASSIGN(std::string want, canonical_uuid(uuid));
  if (d.uuid != want) return Error{"source XML of " + want + " describes domain " + d.uuid};
  sources_[want] = xml;
  return ok();
}

Result<std::string> LibvirtPlaceholders::definition(const std::string& uuid) const {
  KVMIG_ASSIGN(LibvirtDomain dom, conn_.by_uuid(uuid));
  if (!dom) return Error{"placeholder " + uuid + " at " + conn_.uri() + ": no such domain"};
  return dom.xml(VIR_DOMAIN_XML_SECURE | VIR_DOMAIN_XML_INACTIVE | VIR_DOMAIN_XML_MIGRATABLE);
}

Result<std::optional<KvmigMark>> LibvirtPlaceholders::mark_of(const LibvirtDomain& dom) {
  KVMIG_ASSIGN(bool active, dom.active());
  char* x = virDomainGetMetadata(dom.get(), VIR_DOMAIN_METADATA_ELEMENT, kKvmigXmlns,
                                 active ? VIR_DOMAIN_AFFECT_LIVE : VIR_DOMAIN_AFFECT_CONFIG);
  if (!x) {
    if (libvirt_error_is(VIR_ERR_NO_DOMAIN_METADATA)) {
      virResetLastError();
      return std::optional<KvmigMark>();
    }
    return libvirt_error("virDomainGetMetadata " + dom.name());
  }
  std::string text(x);
  free(x);
  auto element = parse_xml(text);
  if (!element.ok()) return std::move(element.error().prefix("kvmig metadata of " + dom.name()));
  auto mark = read_mark(*element);
  if (!mark.ok()) return std::move(mark.error().prefix("domain " + dom.name()));
  return std::optional<KvmigMark>(std::move(*mark));
}

Result<Placeholder> LibvirtPlaceholders::describe(const LibvirtDomain& dom) {
  Placeholder p;
  KVMIG_ASSIGN(p.uuid, dom.uuid());
  p.name = dom.name();
  p.control = "libvirt:" + conn_.uri();
  KVMIG_ASSIGN(std::optional<KvmigMark> mark, mark_of(dom));
  if (!mark) {
    p.state = VmEntryState::running;
    return p;
  }
  p.migration_id = mark->migration_id;
  p.state = VmEntryState::placeholder;
  for (const MarkEvent& e : mark->events) {
    if (e.name == "placeholder") p.created_ms = e.at_ms;
    if (e.name == "completed") {
      p.state = VmEntryState::completed;
      p.completed_ms = e.at_ms;
    }
  }
  return p;
}

Result<void> LibvirtPlaceholders::create(const std::string& uuid_in, const std::string& name,
                                         const std::string& migration_id) {
  KVMIG_ASSIGN(std::string uuid, canonical_uuid(uuid_in));
  KVMIG_TRY(check_migration_id(migration_id));
  KVMIG_ASSIGN(LibvirtDomain have, conn_.by_uuid(uuid));
  if (have) {
    KVMIG_ASSIGN(Placeholder p, describe(have));
    if (p.migration_id == migration_id && p.state != VmEntryState::running) return ok();  // repeated call
    return Error{"placeholder " + uuid + " at " + conn_.uri() + ": domain " + p.name +
                 " with this UUID is already here" +
                 (p.migration_id.empty() ? std::string() : " (migration " + p.migration_id + ")")};
  }
  auto src = sources_.find(uuid);
  if (src == sources_.end()) return Error{"placeholder " + uuid + ": no source XML to define it from"};
  KVMIG_ASSIGN(std::string xml, with_mark(src->second, KvmigMark{migration_id, {{"placeholder", now_ms()}}}));
  KVMIG_ASSIGN(DomainXml d, read_domain_xml(xml));
  if (!name.empty() && d.name != name)
    return Error{"placeholder " + uuid + ": source XML names the domain " + d.name + ", not " + name};
  auto dom = conn_.define(xml);
  if (!dom.ok()) return std::move(dom.error().prefix("placeholder " + uuid));
  return ok();
}

Result<std::optional<Placeholder>> LibvirtPlaceholders::find(const std::string& uuid) {
  KVMIG_ASSIGN(LibvirtDomain dom, conn_.by_uuid(uuid));
  if (!dom) return std::optional<Placeholder>();
  KVMIG_ASSIGN(Placeholder p, describe(dom));
  return std::optional<Placeholder>(std::move(p));
}

Result<std::vector<Placeholder>> LibvirtPlaceholders::list() {
  virDomainPtr* doms = nullptr;
  int n = virConnectListAllDomains(conn_.get(), &doms, 0);
  if (n < 0) return libvirt_error("virConnectListAllDomains " + conn_.uri());
  std::vector<LibvirtDomain> owned;
  for (int i = 0; i < n; ++i) owned.emplace_back(doms[i]);
  free(doms);
  std::vector<Placeholder> out;
  for (const LibvirtDomain& dom : owned) {
    auto p = describe(dom);
    if (!p.ok()) {
      // A domain undefined between the listing and the read is simply no longer here.
      if (libvirt_error_is(VIR_ERR_NO_DOMAIN)) continue;
      return std::move(p.error());
    }
    out.push_back(std::move(*p));
  }
  return out;
}

Result<void> LibvirtPlaceholders::mark_completed(const std::string& uuid, const std::string& migration_id) {
  KVMIG_ASSIGN(LibvirtDomain dom, conn_.by_uuid(uuid));
  std::string where = "placeholder " + uuid + " of migration " + migration_id + " at " + conn_.uri();
  if (!dom) return Error{where + " is gone (removed by recovery?): the VM must not run here"};
  KVMIG_ASSIGN(std::optional<KvmigMark> mark, mark_of(dom));
  if (!mark || mark->migration_id != migration_id)
    return Error{where + ": domain " + dom.name() + " carries " +
                 (mark ? "migration " + mark->migration_id : std::string("no kvmig mark")) + ": the VM must not run here"};
  if (mark->has("completed")) return ok();
  mark->events.push_back({"completed", now_ms()});
  KVMIG_ASSIGN(bool active, dom.active());
  int persistent = virDomainIsPersistent(dom.get());
  if (persistent < 0) return libvirt_error("virDomainIsPersistent " + dom.name());
  unsigned flags = (active ? VIR_DOMAIN_AFFECT_LIVE : 0) | (persistent ? VIR_DOMAIN_AFFECT_CONFIG : 0);
  std::string element = mark->to_xml(false);
  if (virDomainSetMetadata(dom.get(), VIR_DOMAIN_METADATA_ELEMENT, element.c_str(), kKvmigPrefix, kKvmigXmlns,
                           flags) < 0)
    return libvirt_error("virDomainSetMetadata " + dom.name() + " (tagging completed)");
  return ok();
}

Result<bool> LibvirtPlaceholders::remove(const std::string& uuid, const std::string& migration_id) {
  KVMIG_ASSIGN(LibvirtDomain dom, conn_.by_uuid(uuid));
  if (!dom) return false;
  KVMIG_ASSIGN(std::optional<KvmigMark> mark, mark_of(dom));
  if (!mark || mark->migration_id != migration_id) return false;
  std::string where = "placeholder " + uuid + " of migration " + migration_id + " at " + conn_.uri();
  if (mark->has("completed")) return Error{where + " is tagged completed: the VM runs here and is not removed"};
  KVMIG_ASSIGN(bool active, dom.active());
  if (active) return Error{where + " is an active domain that was never tagged: not removed (in doubt)"};
  if (virDomainUndefineFlags(dom.get(), VIR_DOMAIN_UNDEFINE_KEEP_NVRAM) < 0)
    return libvirt_error("virDomainUndefineFlags " + dom.name() + " (removing the placeholder)");
  return true;
}

}  // namespace kvmig::host
