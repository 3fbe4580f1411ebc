// DomainXml: the few facts kvmig reads from a libvirt domain XML (name, UUID and kvmig's
// metadata element), read with libxml2. It exists so that the libvirt hook can check the
// XML libvirt pipes to it without calling back into libvirt, and so that the placeholder can
// be defined from the source's XML with kvmig's element spliced in.
// Only well-formed XML of at most kMaxXmlBytes is accepted (the five predefined entities and
// character references are decoded); a DOCTYPE is refused before its internal subset is
// read, so no entity can be declared or expand, and nothing is loaded from the network.
// Its input is libvirt's own output, but the hook reads it from stdin: checked.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "base/result.h"

namespace kvmig::host {

struct XmlElement {
  std::string name;  // qualified, as written ("kvmig:migration")
  std::vector<std::pair<std::string, std::string>> attributes;  // values decoded
  std::string text;  // character data directly inside, decoded
  std::vector<XmlElement> children;
  size_t begin = 0, end = 0;  // byte range of the element in the document, tags included

  std::string_view local_name() const;
  const std::string* attribute(std::string_view name) const;
  const XmlElement* child(std::string_view local) const;  // first child with that local name
};

// libvirt's domain XMLs are kilobytes; the hook reads at most this much from stdin too.
inline constexpr size_t kMaxXmlBytes = size_t(16) << 20;

// The document's root element. Errors are one line and say what is wrong and where.
Result<XmlElement> parse_xml(std::string_view document, size_t max_depth = 64);

std::string xml_escape(std::string_view text);  // for attribute values and text

// kvmig's one metadata element in a domain:
//   <kvmig:migration xmlns:kvmig="https://kvmig.dev/xmlns/migration/1" id="MIGRATION">
//     <kvmig:event name="placeholder" at="MS"/> <kvmig:event name="completed" at="MS"/>
//   </kvmig:migration>
// Children are matched by local name (libvirt may or may not prefix them).
inline constexpr const char* kKvmigXmlns = "https://kvmig.dev/xmlns/migration/1";
inline constexpr const char* kKvmigPrefix = "kvmig";

struct MarkEvent {
  std::string name;  // placeholder | completed
  int64_t at_ms = 0;
};

struct KvmigMark {
  std::string migration_id;
  std::vector<MarkEvent> events;

  bool has(std::string_view event) const;
  // The element as virDomainSetMetadata takes it (no namespace: libvirt adds it) or, with
  // `with_namespace`, as it sits inside <metadata>.
  std::string to_xml(bool with_namespace) const;
};

// Reads the mark from a <migration> element (checked: a valid migration id, known events,
// numeric times).
Result<KvmigMark> read_mark(const XmlElement& element);

struct DomainXml {
  std::string name;
  std::string uuid;  // canonical
  std::optional<KvmigMark> mark;
  // Where the mark element is in the document (to replace it), when there is one.
  size_t mark_begin = 0, mark_end = 0;
};

// Checks that `document` is one <domain> with a <name> and a valid <uuid>, and reads
// kvmig's metadata element if present (in kvmig's namespace, whatever its prefix).
Result<DomainXml> read_domain_xml(std::string_view document);

// `document` with kvmig's element set to `mark` (an older one replaced; <metadata> made
// when missing): the placeholder's definition, made from the source's XML.
Result<std::string> with_mark(std::string_view document, const KvmigMark& mark);

}  // namespace kvmig::host
