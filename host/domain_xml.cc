#include "host/domain_xml.h"

#include <libxml/parser.h>
#include <libxml/SAX2.h>
#include <libxml/tree.h>
#include <libxml/xmlerror.h>

#include <charconv>
#include <memory>
#include <mutex>
#include <tuple>
#include <unordered_map>

#include "host/site_records.h"

namespace kvmig::host {

namespace {

// libxml2 builds the tree; two things it does not keep are added through its SAX2 hooks:
// each element's byte range (with_mark splices kvmig's element into the source's XML text
// rather than re-serialising libvirt's document), and the refusal of any DOCTYPE before its
// internal subset is read, so no entity is ever declared, let alone expanded.
struct ParseState {
  std::string_view doc;
  std::unordered_map<const xmlNode*, std::pair<size_t, size_t>> spans;
  bool doctype = false;
  bool bad_offset = false;
  std::string first_error;
};

ParseState* state_of(void* ctx) { return static_cast<ParseState*>(static_cast<xmlParserCtxtPtr>(ctx)->_private); }

// Where the parser is in the document, in bytes; npos when libxml2 cannot tell.
size_t consumed(void* ctx) {
  long n = xmlByteConsumed(static_cast<xmlParserCtxtPtr>(ctx));
  return n < 0 ? std::string_view::npos : size_t(n);
}

void on_doctype(void* ctx, const xmlChar*, const xmlChar*, const xmlChar*) {
  state_of(ctx)->doctype = true;
  xmlStopParser(static_cast<xmlParserCtxtPtr>(ctx));
}

// Called with the parser at the '>' or "/>" of the start tag; '<' cannot occur inside a start
// tag (not even in attribute values), so the last '<' before it opens the element.
void on_start(void* ctx, const xmlChar* localname, const xmlChar* prefix, const xmlChar* uri, int nb_namespaces,
              const xmlChar** namespaces, int nb_attributes, int nb_defaulted, const xmlChar** attributes) {
  xmlSAX2StartElementNs(ctx, localname, prefix, uri, nb_namespaces, namespaces, nb_attributes, nb_defaulted,
                        attributes);
  ParseState* st = state_of(ctx);
  const xmlNode* node = static_cast<xmlParserCtxtPtr>(ctx)->node;
  size_t at = consumed(ctx);
  size_t lt = at == std::string_view::npos || at > st->doc.size() ? at : st->doc.rfind('<', at);
  if (!node || lt == std::string_view::npos) st->bad_offset = true;
  else st->spans[node] = {lt, lt};
}

// Called with the parser just past the end tag's '>' (or the "/>" of an empty element).
void on_end(void* ctx, const xmlChar* localname, const xmlChar* prefix, const xmlChar* uri) {
  ParseState* st = state_of(ctx);
  auto it = st->spans.find(static_cast<xmlParserCtxtPtr>(ctx)->node);
  size_t at = consumed(ctx);
  if (it == st->spans.end() || at == std::string_view::npos || at > st->doc.size()) st->bad_offset = true;
  else it->second.second = at;
  xmlSAX2EndElementNs(ctx, localname, prefix, uri);
}

void on_error(void* ctx, xmlErrorPtr err) {
  ParseState* st = state_of(ctx);
  if (!err || err->level < XML_ERR_ERROR || !st->first_error.empty()) return;
  std::string msg = err->message ? err->message : "not well-formed";
  while (!msg.empty() && (msg.back() == '\n' || msg.back() == ' ')) msg.pop_back();
  st->first_error = msg + " at line " + std::to_string(err->line) + ", column " + std::to_string(err->int2);
}

std::string text_of(const xmlChar* s) { return s ? reinterpret_cast<const char*>(s) : ""; }

std::string qualified(const xmlNs* ns, const xmlChar* name) {
  if (ns && ns->prefix) return text_of(ns->prefix) + ":" + text_of(name);
  return text_of(name);  // no prefix, or an undeclared one that libxml2 kept in the name
}

struct ParserCtxtFree {
  void operator()(xmlParserCtxtPtr c) const { xmlFreeParserCtxt(c); }
};
struct DocFree {
  void operator()(xmlDocPtr d) const { xmlFreeDoc(d); }
};

Error fail(const std::string& what) { return Error{"XML: " + what}; }

Result<void> convert(const xmlNode* n, XmlElement& e, size_t depth, size_t max_depth, const ParseState& st) {
  e.name = qualified(n->ns, n->name);
  if (depth > max_depth) return fail("elements nested too deeply (<" + e.name + "> at line " + std::to_string(n->line) + ")");
  auto span = st.spans.find(n);
  if (span == st.spans.end()) return fail("no position for <" + e.name + ">");
  std::tie(e.begin, e.end) = span->second;
  // A check of the positions taken from the parser: a splice at a wrong place would corrupt
  // the placeholder's definition, so it is an error rather than a guess.
  if (e.end <= e.begin || st.doc.compare(e.begin, e.name.size() + 1, "<" + e.name) != 0 || st.doc[e.end - 1] != '>')
    return fail("the parser's position of <" + e.name + "> does not match the document (not UTF-8?)");
  // Namespace declarations are attributes as written (the kvmig element is found by them).
  for (const xmlNs* ns = n->nsDef; ns; ns = ns->next)
    e.attributes.emplace_back(ns->prefix ? "xmlns:" + text_of(ns->prefix) : std::string("xmlns"), text_of(ns->href));
  for (const xmlAttr* a = n->properties; a; a = a->next) {
    xmlChar* v = xmlNodeListGetString(n->doc, a->children, 1);
    e.attributes.emplace_back(qualified(a->ns, a->name), text_of(v));
    xmlFree(v);
  }
  for (const xmlNode* c = n->children; c; c = c->next) {
    switch (c->type) {
      case XML_ELEMENT_NODE:
        e.children.emplace_back();
        KVMIG_TRY(convert(c, e.children.back(), depth + 1, max_depth, st));
        break;
      case XML_TEXT_NODE:
      case XML_CDATA_SECTION_NODE:
        e.text += text_of(c->content);
        break;
      case XML_ENTITY_REF_NODE:  // cannot be declared without a DTD; refused all the same
        return fail("entity reference &" + text_of(c->name) + "; in <" + e.name + ">");
      default:  // comments, processing instructions
        break;
    }
  }
  return ok();
}

std::string_view prefix_of(std::string_view qname) {
  size_t colon = qname.find(':');
  return colon == std::string_view::npos ? std::string_view() : qname.substr(0, colon);
}

// The namespace of `e`'s name, looking at `e` and then its ancestors (innermost first).
std::string namespace_of(const XmlElement& e, const std::vector<const XmlElement*>& ancestors) {
  std::string_view prefix = prefix_of(e.name);
  std::string attr = prefix.empty() ? std::string("xmlns") : "xmlns:" + std::string(prefix);
  if (const std::string* v = e.attribute(attr)) return *v;
  for (auto it = ancestors.rbegin(); it != ancestors.rend(); ++it)
    if (const std::string* v = (*it)->attribute(attr)) return *v;
  return {};
}

}  // namespace

std::string_view XmlElement::local_name() const {
  std::string_view n = name;
  size_t colon = n.find(':');
  return colon == std::string_view::npos ? n : n.substr(colon + 1);
}

const std::string* XmlElement::attribute(std::string_view attr) const {
  for (const auto& [n, v] : attributes)
    if (n == attr) return &v;
  return nullptr;
}

const XmlElement* XmlElement::child(std::string_view local) const {
  for (const XmlElement& c : children)
    if (c.local_name() == local) return &c;
  return nullptr;
}

Result<XmlElement> parse_xml(std::string_view document, size_t max_depth) {
  if (document.size() > kMaxXmlBytes)
    return fail("document of " + std::to_string(document.size()) + " bytes, more than " +
                std::to_string(kMaxXmlBytes));
  if (document.empty()) return fail("empty document");
  static std::once_flag init;
  std::call_once(init, [] { xmlInitParser(); });
  std::unique_ptr<xmlParserCtxt, ParserCtxtFree> ctxt(xmlNewParserCtxt());
  if (!ctxt || !ctxt->sax) return fail("libxml2 cannot make a parser (out of memory)");
  ParseState st;
  st.doc = document;
  ctxt->_private = &st;
  ctxt->sax->internalSubset = on_doctype;
  ctxt->sax->externalSubset = nullptr;
  ctxt->sax->startElementNs = on_start;
  ctxt->sax->endElementNs = on_end;
  ctxt->sax->serror = on_error;
  // No network, no DTD loading, no entity substitution (XML_PARSE_NOENT not given), errors
  // kept here rather than printed; the bytes are UTF-8 whatever the declaration says, so
  // positions are byte offsets.
  int options = XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING | XML_PARSE_IGNORE_ENC;
  std::unique_ptr<xmlDoc, DocFree> doc(
      xmlCtxtReadMemory(ctxt.get(), document.data(), int(document.size()), nullptr, nullptr, options));
  if (st.doctype) return fail("DOCTYPE and declarations are not accepted");
  if (!doc || !ctxt->wellFormed)
    return fail(st.first_error.empty() ? std::string("not well-formed") : st.first_error);
  if (st.bad_offset) return fail("libxml2 gave no position for an element");
  const xmlNode* root = xmlDocGetRootElement(doc.get());
  if (!root) return fail("expected the root element");
  XmlElement out;
  KVMIG_TRY(convert(root, out, 1, max_depth, st));
  return out;
}

std::string xml_escape(std::string_view text) {
  std::string out;
  for (char c : text) {
    switch (c) {
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '&': out += "&amp;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default: out += c;
    }
  }
  return out;
}

bool KvmigMark::has(std::string_view event) const {
  for (const MarkEvent& e : events)
    if (e.name == event) return true;
  return false;
}

std::string KvmigMark::to_xml(bool with_namespace) const {
  std::string p = with_namespace ? std::string(kKvmigPrefix) + ":" : std::string();
  std::string out = "<" + p + "migration";
  if (with_namespace) out += std::string(" xmlns:") + kKvmigPrefix + "=\"" + kKvmigXmlns + "\"";
  out += " id=\"" + xml_escape(migration_id) + "\">";
  for (const MarkEvent& e : events)
    out += "<" + p + "event name=\"" + xml_escape(e.name) + "\" at=\"" + std::to_string(e.at_ms) + "\"/>";
  return out + "</" + p + "migration>";
}

Result<KvmigMark> read_mark(const XmlElement& element) {
  if (element.local_name() != "migration") return Error{"kvmig metadata: <" + element.name + "> is not <migration>"};
  const std::string* id = element.attribute("id");
  if (!id) return Error{"kvmig metadata: <migration> has no id"};
  if (auto r = check_migration_id(*id); !r.ok()) return std::move(r.error().prefix("kvmig metadata"));
  KvmigMark mark{*id, {}};
  for (const XmlElement& c : element.children) {
    if (c.local_name() != "event") return Error{"kvmig metadata: unexpected <" + c.name + ">"};
    const std::string* name = c.attribute("name");
    const std::string* at = c.attribute("at");
    if (!name || (*name != "placeholder" && *name != "completed"))
      return Error{"kvmig metadata: event without a known name (placeholder, completed)"};
    int64_t ms = 0;
    if (!at || std::from_chars(at->data(), at->data() + at->size(), ms).ptr != at->data() + at->size() || ms < 0)
      return Error{"kvmig metadata: event " + *name + " has no valid time"};
    mark.events.push_back({*name, ms});
  }
  return mark;
}

Result<DomainXml> read_domain_xml(std::string_view document) {
  KVMIG_ASSIGN(XmlElement root, parse_xml(document));
  if (root.name != "domain") return Error{"domain XML: the root is <" + root.name + ">, not <domain>"};
  DomainXml d;
  const XmlElement* name = root.child("name");
  if (!name || name->name != "name" || name->text.empty()) return Error{"domain XML: no <name>"};
  d.name = name->text;
  const XmlElement* uuid = root.child("uuid");
  if (!uuid || uuid->name != "uuid") return Error{"domain XML: no <uuid>"};
  auto canonical = canonical_uuid(uuid->text);
  if (!canonical.ok()) return std::move(canonical.error().prefix("domain XML: <uuid>"));
  d.uuid = *canonical;
  if (const XmlElement* meta = root.child("metadata"); meta && meta->name == "metadata") {
    for (const XmlElement& c : meta->children) {
      if (namespace_of(c, {&root, meta}) != kKvmigXmlns) continue;
      if (d.mark) return Error{"domain XML: more than one kvmig metadata element"};
      KVMIG_ASSIGN(KvmigMark mark, read_mark(c));
      d.mark = std::move(mark);
      d.mark_begin = c.begin;
      d.mark_end = c.end;
    }
  }
  return d;
}

Result<std::string> with_mark(std::string_view document, const KvmigMark& mark) {
  KVMIG_ASSIGN(DomainXml d, read_domain_xml(document));
  std::string element = mark.to_xml(true);
  std::string out(document);
  if (d.mark) return out.replace(d.mark_begin, d.mark_end - d.mark_begin, element);
  KVMIG_ASSIGN(XmlElement root, parse_xml(document));
  if (const XmlElement* meta = root.child("metadata"); meta && meta->name == "metadata") {
    if (document.substr(meta->end - 2, 2) == "/>")  // <metadata/>
      return out.replace(meta->begin, meta->end - meta->begin, "<metadata>" + element + "</metadata>");
    size_t close = document.rfind("</", meta->end - 1);
    return out.insert(close, element);
  }
  size_t close = document.rfind("</", root.end - 1);
  return out.insert(close, "<metadata>" + element + "</metadata>\n");
}

}  // namespace kvmig::host
