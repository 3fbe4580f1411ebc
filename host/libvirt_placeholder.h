// LibvirtPlaceholders: the PlaceholderStore of libvirt domains at a destination. A placeholder
// is an inactive domain defined from the source's XML (so it has the source's UUID and name)
// with kvmig's one metadata element in it (host/domain_xml.h):
//   <kvmig:migration xmlns:kvmig="https://kvmig.dev/xmlns/migration/1" id="M">
//     <kvmig:event name="placeholder" at="MS"/> [<kvmig:event name="completed" at="MS"/>]
// The element travels with the domain (it is in the XML the migration sends, and in the
// persistent definition), so libvirt's hook sees it too. mark_completed() adds the completed
// event with virDomainSetMetadata to the live and the persistent definition; it runs while
// the arrived domain is still paused, so the tag is there before the VM runs.
// A domain without kvmig's element is a local VM ("running" in Placeholder terms, whatever its
// libvirt state): never a placeholder, never removed by kvmig.
#pragma once

#include <map>
#include <string>

#include "host/domain_xml.h"
#include "host/libvirt_conn.h"
#include "host/placeholder_registry.h"

namespace kvmig::host {

class LibvirtPlaceholders : public PlaceholderStore {
 public:
  explicit LibvirtPlaceholders(const LibvirtConn& conn) : conn_(conn) {}
  std::string_view kind() const override { return "libvirt"; }

  // The source's domain XML (VIR_DOMAIN_XML_MIGRATABLE) that create() defines the placeholder
  // of this UUID from. Checked: a <domain> whose <uuid> is `uuid`.
  Result<void> set_definition(const std::string& uuid, const std::string& xml);
  // The placeholder's definition, once created: the XML the migration should carry
  // (VIR_MIGRATE_PARAM_DEST_XML / PERSIST_XML) so that the arriving domain keeps the mark.
  Result<std::string> definition(const std::string& uuid) const;

  Result<void> create(const std::string& uuid, const std::string& name, const std::string& migration_id) override;
  Result<std::optional<Placeholder>> find(const std::string& uuid) override;
  Result<std::vector<Placeholder>> list() override;
  Result<void> mark_completed(const std::string& uuid, const std::string& migration_id) override;
  // Undefines the untagged, inactive placeholder of this migration. An active untagged one
  // (a domain that arrived but was never tagged, so never ran) is refused: removing it could
  // lose the only copy, so it stays for an operator (in doubt).
  Result<bool> remove(const std::string& uuid, const std::string& migration_id) override;

  // kvmig's mark of a domain, if it carries one (live definition when active).
  static Result<std::optional<KvmigMark>> mark_of(const LibvirtDomain& dom);

 private:
  Result<Placeholder> describe(const LibvirtDomain& dom);
  const LibvirtConn& conn_;
  std::map<std::string, std::string> sources_;  // uuid -> source XML
};

}  // namespace kvmig::host
