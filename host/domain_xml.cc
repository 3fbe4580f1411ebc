#include "host/domain_xml.h"

#include <charconv>

#include "host/site_records.h"

namespace kvmig::host {

namespace {

bool name_start(char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_' || c == ':' || (c & 0x80); }
bool name_char(char c) { return name_start(c) || (c >= '0' && c <= '9') || c == '-' || c == '.'; }
bool space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xc0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += char(0xe0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3f));
    out += char(0x80 | (cp & 0x3f));
  } else {
    out += char(0xf0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3f));
    out += char(0x80 | ((cp >> 6) & 0x3f));
    out += char(0x80 | (cp & 0x3f));
  }
}

class Reader {
 public:
  Reader(std::string_view doc, size_t max_depth) : s_(doc), max_depth_(max_depth) {}

  Result<XmlElement> document() {
    if (s_.substr(0, 3) == "\xef\xbb\xbf") pos_ = 3;
    KVMIG_TRY(misc());
    if (pos_ >= s_.size() || s_[pos_] != '<') return fail("expected the root element");
    XmlElement root;
    KVMIG_TRY(element(root, 1));
    KVMIG_TRY(misc());
    if (pos_ != s_.size()) return fail("content after the root element");
    return root;
  }

 private:
  Error fail(const std::string& what) const { return Error{"XML: " + what + " at byte " + std::to_string(pos_)}; }
  bool starts(std::string_view p) const { return s_.substr(pos_, p.size()) == p; }
  void skip_space() {
    while (pos_ < s_.size() && space(s_[pos_])) ++pos_;
  }
  Result<void> skip_past(std::string_view end, const char* what) {
    size_t at = s_.find(end, pos_);
    if (at == std::string_view::npos) return fail(std::string("unterminated ") + what);
    pos_ = at + end.size();
    return ok();
  }

  // Whitespace, comments and processing instructions around the root.
  Result<void> misc() {
    for (;;) {
      skip_space();
      if (starts("<!--")) {
        KVMIG_TRY(skip_past("-->", "comment"));
      } else if (starts("<?")) {
        KVMIG_TRY(skip_past("?>", "processing instruction"));
      } else if (starts("<!")) {
        return fail("DOCTYPE and declarations are not accepted");
      } else {
        return ok();
      }
    }
  }

  Result<std::string> name() {
    size_t b = pos_;
    if (pos_ >= s_.size() || !name_start(s_[pos_])) return fail("expected a name");
    while (pos_ < s_.size() && name_char(s_[pos_])) ++pos_;
    return std::string(s_.substr(b, pos_ - b));
  }

  // Decodes character data up to (not including) `stop`, which must not be '<' inside values.
  Result<void> decode(std::string_view raw, std::string& out) {
    for (size_t i = 0; i < raw.size(); ++i) {
      char c = raw[i];
      if (c != '&') {
        out += c;
        continue;
      }
      size_t semi = raw.find(';', i);
      if (semi == std::string_view::npos || semi - i > 12) return fail("bad entity reference");
      std::string_view ent = raw.substr(i + 1, semi - i - 1);
      if (ent == "lt") out += '<';
      else if (ent == "gt") out += '>';
      else if (ent == "amp") out += '&';
      else if (ent == "quot") out += '"';
      else if (ent == "apos") out += '\'';
      else if (ent.size() > 1 && ent[0] == '#') {
        int base = 10;
        std::string_view digits = ent.substr(1);
        if (digits[0] == 'x') base = 16, digits = digits.substr(1);
        uint32_t cp = 0;
        auto [p, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), cp, base);
        if (digits.empty() || ec != std::errc() || p != digits.data() + digits.size() || cp == 0 || cp > 0x10ffff)
          return fail("bad character reference &" + std::string(ent) + ";");
        append_utf8(out, cp);
      } else {
        return fail("unknown entity &" + std::string(ent) + ";");
      }
      i = semi;
    }
    return ok();
  }

  Result<void> element(XmlElement& e, size_t depth) {
    if (depth > max_depth_) return fail("elements nested too deeply");
    e.begin = pos_;
    ++pos_;  // '<'
    KVMIG_ASSIGN(e.name, name());
    for (;;) {
      size_t before = pos_;
      skip_space();
      if (pos_ >= s_.size()) return fail("unterminated start tag <" + e.name + ">");
      if (starts("/>")) {
        pos_ += 2;
        e.end = pos_;
        return ok();
      }
      if (s_[pos_] == '>') {
        ++pos_;
        break;
      }
      if (before == pos_) return fail("expected whitespace before an attribute of <" + e.name + ">");
      KVMIG_ASSIGN(std::string attr, name());
      skip_space();
      if (pos_ >= s_.size() || s_[pos_] != '=') return fail("expected '=' after attribute " + attr);
      ++pos_;
      skip_space();
      if (pos_ >= s_.size() || (s_[pos_] != '"' && s_[pos_] != '\'')) return fail("unquoted value of " + attr);
      char q = s_[pos_++];
      size_t close = s_.find(q, pos_);
      if (close == std::string_view::npos) return fail("unterminated value of " + attr);
      std::string_view raw = s_.substr(pos_, close - pos_);
      if (raw.find('<') != std::string_view::npos) return fail("'<' in the value of " + attr);
      for (const auto& [n, v] : e.attributes)
        if (n == attr) return fail("attribute " + attr + " repeated");
      std::string value;
      KVMIG_TRY(decode(raw, value));
      e.attributes.emplace_back(std::move(attr), std::move(value));
      pos_ = close + 1;
    }
    // Content: text, children, comments, CDATA, PIs, then the matching end tag.
    for (;;) {
      size_t lt = s_.find('<', pos_);
      if (lt == std::string_view::npos) return fail("missing </" + e.name + ">");
      KVMIG_TRY(decode(s_.substr(pos_, lt - pos_), e.text));
      pos_ = lt;
      if (starts("</")) {
        pos_ += 2;
        KVMIG_ASSIGN(std::string closing, name());
        if (closing != e.name) return fail("</" + closing + "> closes <" + e.name + ">");
        skip_space();
        if (pos_ >= s_.size() || s_[pos_] != '>') return fail("bad end tag </" + closing);
        ++pos_;
        e.end = pos_;
        return ok();
      }
      if (starts("<!--")) {
        KVMIG_TRY(skip_past("-->", "comment"));
      } else if (starts("<![CDATA[")) {
        size_t b = pos_ + 9;
        KVMIG_TRY(skip_past("]]>", "CDATA section"));
        e.text.append(s_.substr(b, pos_ - 3 - b));
      } else if (starts("<?")) {
        KVMIG_TRY(skip_past("?>", "processing instruction"));
      } else if (starts("<!")) {
        return fail("declaration inside an element");
      } else {
        e.children.emplace_back();
        KVMIG_TRY(element(e.children.back(), depth + 1));
      }
    }
  }

  std::string_view s_;
  size_t pos_ = 0;
  size_t max_depth_;
};

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
  return Reader(document, max_depth).document();
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
