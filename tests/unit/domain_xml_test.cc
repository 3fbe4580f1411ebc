// host/domain_xml on libxml2: the facts read from a domain XML, what is refused (DOCTYPE,
// entities, broken or oversized input), and kvmig's mark read, added and replaced in place.
#include "host/domain_xml.h"

#include <gtest/gtest.h>

#include <string>

namespace {

using namespace kvmig::host;

const std::string kUuid = "6b1c4a8e-3f5d-4e2a-9c7b-1d2e3f4a5b61";
const std::string kMarkNs = std::string("xmlns:kvmig=\"") + kKvmigXmlns + "\"";

std::string domain(const std::string& inside) {
  return "<domain type='kvm'>\n  <name>vm1</name>\n  <uuid>" + kUuid + "</uuid>\n" + inside + "</domain>\n";
}

std::string error_of(const std::string& xml) {
  auto d = read_domain_xml(xml);
  return d.ok() ? std::string() : d.error().message;
}

TEST(DomainXmlTest, ReadsNameAndCanonicalUuidOfAValidDomain) {
  auto d = read_domain_xml("<?xml version='1.0'?>\n<!-- libvirt -->\n<domain type='kvm'><name>a&amp;b&#x21;</name>"
                           "<uuid>6B1C4A8E-3F5D-4E2A-9C7B-1D2E3F4A5B61</uuid><memory unit='KiB'>1024</memory>"
                           "<os><cmdline><![CDATA[a<b]]></cmdline></os></domain>");
  ASSERT_TRUE(d.ok()) << d.error().message;
  EXPECT_EQ(d->name, "a&b!");
  EXPECT_EQ(d->uuid, kUuid);
  EXPECT_FALSE(d->mark.has_value());
  const std::string doc = "<a x='1&lt;2' xmlns:p='urn:p'><p:b/>t<![CDATA[<c>]]></a> ";
  auto root = parse_xml(doc);
  ASSERT_TRUE(root.ok()) << root.error().message;
  EXPECT_EQ(*root->attribute("x"), "1<2");
  EXPECT_EQ(*root->attribute("xmlns:p"), "urn:p");
  ASSERT_EQ(root->children.size(), 1u);
  EXPECT_EQ(root->children[0].name, "p:b");
  EXPECT_EQ(root->children[0].local_name(), "b");
  EXPECT_EQ(root->text, "t<c>");
  EXPECT_EQ(root->begin, 0u);
  EXPECT_EQ(root->end, doc.size() - 1);
  EXPECT_EQ(doc.substr(root->children[0].begin, root->children[0].end - root->children[0].begin), "<p:b/>");
}

TEST(DomainXmlTest, MissingNameOrUuidAndBadUuidAreRefused) {
  EXPECT_NE(error_of("<domain><uuid>" + kUuid + "</uuid></domain>").find("no <name>"), std::string::npos);
  EXPECT_NE(error_of("<domain><name></name><uuid>" + kUuid + "</uuid></domain>").find("no <name>"), std::string::npos);
  EXPECT_NE(error_of("<domain><name>vm</name></domain>").find("no <uuid>"), std::string::npos);
  EXPECT_NE(error_of("<domain><name>vm</name><uuid>not-a-uuid</uuid></domain>").find("<uuid>"), std::string::npos);
  EXPECT_NE(error_of("<domain><name>vm</name><uuid>" + kUuid + "0</uuid></domain>").find("<uuid>"), std::string::npos);
  EXPECT_NE(error_of("<network><name>vm</name><uuid>" + kUuid + "</uuid></network>").find("not <domain>"),
            std::string::npos);
}

TEST(DomainXmlTest, DoctypeAndEntitiesAreRefusedWithoutExpansion) {
  std::string laughs =
      "<?xml version='1.0'?><!DOCTYPE domain [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;'>]>" +
      domain("<description>&b;</description>");
  EXPECT_NE(error_of(laughs).find("DOCTYPE"), std::string::npos) << error_of(laughs);
  std::string external = "<!DOCTYPE domain SYSTEM 'http://example.invalid/x.dtd'>" + domain("");
  EXPECT_NE(error_of(external).find("DOCTYPE"), std::string::npos) << error_of(external);
  std::string file = "<!DOCTYPE domain [<!ENTITY f SYSTEM 'file:///etc/passwd'>]>" + domain("<title>&f;</title>");
  EXPECT_NE(error_of(file).find("DOCTYPE"), std::string::npos);
  // An entity nobody declared: an error, not an empty string.
  std::string undeclared = domain("<title>&f;</title>");
  EXPECT_NE(error_of(undeclared).find("'f'"), std::string::npos) << error_of(undeclared);
  EXPECT_FALSE(parse_xml("<a x='&f;'/>").ok());
}

TEST(DomainXmlTest, MalformedTruncatedAndHugeInputIsRefusedInOneLine) {
  std::string full = domain("<devices/>");
  for (size_t cut : {size_t(1), size_t(10), full.size() / 2, full.size() - 3}) {
    std::string e = error_of(full.substr(0, cut));
    EXPECT_FALSE(e.empty()) << "accepted a document cut at byte " << cut;
    EXPECT_EQ(e.find('\n'), std::string::npos) << e;
    EXPECT_EQ(e.rfind("XML: ", 0), 0u) << e;
  }
  EXPECT_FALSE(error_of("").empty());
  EXPECT_FALSE(error_of("<domain><name>a</nam></domain>").empty());
  EXPECT_FALSE(error_of("<domain a='1' a='2'/>").empty());
  EXPECT_FALSE(error_of("<domain a=1/>").empty());
  EXPECT_FALSE(error_of(full + "<domain/>").empty());
  std::string e = error_of("<domain>\n<name>x</name>\n<title>y</titel>\n</domain>");
  EXPECT_NE(e.find("line 3"), std::string::npos) << e;

  // Just over the cap: refused by size, before any parsing.
  std::string huge = domain("<description>" + std::string(kMaxXmlBytes, 'x') + "</description>");
  EXPECT_NE(error_of(huge).find("more than"), std::string::npos);
  // Just under it, and far past libxml2's buffer shrinking: still read, positions exact.
  std::string big = domain("<description>" + std::string(kMaxXmlBytes / 2, 'x') + "</description>");
  auto marked = with_mark(big, KvmigMark{"m-big", {{"placeholder", 1}}});
  ASSERT_TRUE(marked.ok()) << marked.error().message;
  auto d = read_domain_xml(*marked);
  ASSERT_TRUE(d.ok()) << d.error().message;
  ASSERT_TRUE(d->mark.has_value());
  EXPECT_EQ(marked->substr(d->mark_begin, d->mark_end - d->mark_begin), d->mark->to_xml(true));

  std::string deep;
  for (int i = 0; i < 70; ++i) deep += "<a>";
  for (int i = 0; i < 70; ++i) deep += "</a>";
  EXPECT_NE(parse_xml(deep).error().message.find("deeply"), std::string::npos);
  EXPECT_TRUE(parse_xml(deep, 80).ok());
}

TEST(DomainXmlTest, MarkIsReadWhenPresentWhateverItsPrefix) {
  auto plain = read_domain_xml(domain("<metadata><other xmlns='urn:x'/></metadata>"));
  ASSERT_TRUE(plain.ok()) << plain.error().message;
  EXPECT_FALSE(plain->mark.has_value());

  std::string elem = "<k:migration xmlns:k=\"" + std::string(kKvmigXmlns) +
                     "\" id=\"m-1\">\n <k:event name=\"placeholder\" at=\"5\"/><k:event name=\"completed\" at=\"9\"/>"
                     "</k:migration>";
  // Multi-byte UTF-8 before the mark, and an encoding declaration that is not believed: the
  // mark's position is still a byte offset into this very text.
  std::string xml = "<?xml version='1.0' encoding='ISO-8859-1'?>" +
                    domain("<description>h\xc3\xa9llo \xe2\x9c\x93</description><metadata>" + elem + "</metadata>");
  auto d = read_domain_xml(xml);
  ASSERT_TRUE(d.ok()) << d.error().message;
  ASSERT_TRUE(d->mark.has_value());
  EXPECT_EQ(d->mark->migration_id, "m-1");
  ASSERT_EQ(d->mark->events.size(), 2u);
  EXPECT_EQ(d->mark->events[1].name, "completed");
  EXPECT_EQ(d->mark->events[1].at_ms, 9);
  EXPECT_TRUE(d->mark->has("placeholder"));
  EXPECT_EQ(xml.substr(d->mark_begin, d->mark_end - d->mark_begin), elem);

  // The namespace declared on <domain>, the element unprefixed in it.
  auto inherited = read_domain_xml("<domain xmlns:kvmig='" + std::string(kKvmigXmlns) + "'><name>v</name><uuid>" +
                                   kUuid + "</uuid><metadata><kvmig:migration id='m-2'/></metadata></domain>");
  ASSERT_TRUE(inherited.ok()) << inherited.error().message;
  ASSERT_TRUE(inherited->mark.has_value());
  EXPECT_EQ(inherited->mark->migration_id, "m-2");
}

TEST(DomainXmlTest, TwoMarksOrABadMarkAreRefused) {
  KvmigMark m{"m-1", {{"placeholder", 5}}};
  std::string two = domain("<metadata>" + m.to_xml(true) + m.to_xml(true) + "</metadata>");
  EXPECT_NE(error_of(two).find("more than one"), std::string::npos) << error_of(two);
  std::string ns = kMarkNs;
  EXPECT_NE(error_of(domain("<metadata><kvmig:migration " + ns + " id='bad id!'/></metadata>")).find("migration id"),
            std::string::npos);
  EXPECT_FALSE(error_of(domain("<metadata><kvmig:migration " + ns + "/></metadata>")).empty());
  EXPECT_FALSE(
      error_of(domain("<metadata><kvmig:migration " + ns + " id='m'><kvmig:event name='x' at='1'/></kvmig:migration></metadata>"))
          .empty());
  EXPECT_FALSE(
      error_of(domain("<metadata><kvmig:migration " + ns + " id='m'><kvmig:event name='completed' at='-1'/></kvmig:migration></metadata>"))
          .empty());
}

TEST(DomainXmlTest, WithMarkAddsOrReplacesTheOneMarkAndKeepsTheRestByteForByte) {
  KvmigMark first{"m-1", {{"placeholder", 5}}};
  KvmigMark second{"m-1", {{"placeholder", 5}, {"completed", 7}}};
  for (const std::string& inside : {std::string(), std::string("<metadata/>\n"),
                                    std::string("<metadata><other xmlns='urn:x'>&lt;</other></metadata>\n")}) {
    std::string xml = domain(inside);
    auto once = with_mark(xml, first);
    ASSERT_TRUE(once.ok()) << once.error().message;
    auto d = read_domain_xml(*once);
    ASSERT_TRUE(d.ok()) << d.error().message << "\n" << *once;
    ASSERT_TRUE(d->mark.has_value());
    EXPECT_FALSE(d->mark->has("completed"));
    EXPECT_EQ(once->substr(0, 40), xml.substr(0, 40));
    if (inside.find("other") != std::string::npos) {
      EXPECT_NE(once->find("<other xmlns='urn:x'>&lt;</other>"), std::string::npos) << *once;
    }

    auto twice = with_mark(*once, second);
    ASSERT_TRUE(twice.ok()) << twice.error().message;
    d = read_domain_xml(*twice);
    ASSERT_TRUE(d.ok()) << d.error().message;
    EXPECT_TRUE(d->mark->has("completed"));
    EXPECT_EQ(twice->size(), once->size() + second.to_xml(true).size() - first.to_xml(true).size());
    size_t n = 0;
    for (size_t at = twice->find(kKvmigXmlns); at != std::string::npos; at = twice->find(kKvmigXmlns, at + 1)) ++n;
    EXPECT_EQ(n, 1u) << *twice;
  }
  EXPECT_FALSE(with_mark("<domain><name>x</name>", first).ok());
}

}  // namespace
