// The disk-copy wire format: every message round-trips, and every check that keeps a bad
// or hostile source from writing outside its image fires.
#include <gtest/gtest.h>

#include <cstring>

#include "helper/disk_messages.h"
#include "helper/messages.h"
#include "unit/mem_socket.h"

namespace kvmig::helper {
namespace {

DiskOpen good_open() {
  DiskOpen m;
  m.image_size = 1 << 20;
  m.block_size = 64 << 10;
  m.max_extent = 1 << 20;
  m.data_bytes = 4096;
  m.content_id = 0x1234;
  m.path = "vm/disk.raw";
  return m;
}

TEST(DiskMessages, OpenRoundTrips) {
  DiskOpen m = good_open();
  m.flags = kOpenOverwrite;
  auto d = decode_disk_open(encode(m));
  ASSERT_TRUE(d.ok()) << d.error().message;
  EXPECT_EQ(d->image_size, m.image_size);
  EXPECT_EQ(d->block_size, m.block_size);
  EXPECT_EQ(d->max_extent, m.max_extent);
  EXPECT_EQ(d->data_bytes, m.data_bytes);
  EXPECT_EQ(d->content_id, m.content_id);
  EXPECT_EQ(d->flags, kOpenOverwrite);
  EXPECT_EQ(d->path, "vm/disk.raw");
}

TEST(DiskMessages, OpenRejectsPathsOutsideTheRoot) {
  for (const char* p : {"../x", "a/../../x", "/etc/passwd", "", "a//b", "./a", "a/.", "a\nb"}) {
    DiskOpen m = good_open();
    m.path = p;
    auto d = decode_disk_open(encode(m));
    ASSERT_FALSE(d.ok()) << p;
    EXPECT_EQ(wire_code_of(d.error()), WireCode::malformed) << p;
  }
}

TEST(DiskMessages, OpenRejectsUnalignedAndOutOfRangeSizes) {
  auto bad = [](auto mutate) {
    DiskOpen m = good_open();
    mutate(m);
    return !decode_disk_open(encode(m)).ok();
  };
  EXPECT_TRUE(bad([](DiskOpen& m) { m.image_size = 1000; }));
  EXPECT_TRUE(bad([](DiskOpen& m) { m.image_size = 0; }));
  EXPECT_TRUE(bad([](DiskOpen& m) { m.block_size = 3 * 4096; }));
  EXPECT_TRUE(bad([](DiskOpen& m) { m.block_size = 2048; }));
  EXPECT_TRUE(bad([](DiskOpen& m) { m.max_extent = 5000; }));
  EXPECT_TRUE(bad([](DiskOpen& m) { m.max_extent = 32u << 20; }));
  EXPECT_TRUE(bad([](DiskOpen& m) { m.data_bytes = m.image_size + 1; }));
  EXPECT_TRUE(bad([](DiskOpen& m) { m.flags = 1u << 7; }));
  EXPECT_FALSE(bad([](DiskOpen& m) { m.image_size = 512 * 3, m.data_bytes = 0; }));
}

TEST(DiskMessages, OpenRejectsTrailingBytes) {
  auto bytes = encode(good_open());
  bytes.push_back(0);
  EXPECT_EQ(wire_code_of(decode_disk_open(bytes).error()), WireCode::malformed);
}

TEST(DiskMessages, RangesRejectEmptyAndWrapping) {
  EXPECT_TRUE(decode_disk_range(encode_range({4096, 8192}), "ZERO").ok());
  EXPECT_FALSE(decode_disk_range(encode_range({4096, 0}), "ZERO").ok());
  EXPECT_FALSE(decode_disk_range(encode_range({~0ull - 10, 4096}), "ZERO").ok());
}

TEST(DiskMessages, HeaderChecksFireInOrder) {
  uint8_t h[kHeaderSize];
  encode_disk_header({DiskMsg::ack, 8, 0}, h);
  ASSERT_TRUE(decode_disk_header(h).ok());
  uint8_t copy[kHeaderSize];
  std::memcpy(copy, h, kHeaderSize);
  copy[0] ^= 1;
  EXPECT_EQ(wire_code_of(decode_disk_header(copy).error()), WireCode::bad_magic);
  std::memcpy(copy, h, kHeaderSize);
  copy[20] ^= 1;  // length, not re-checked: the header check catches it
  EXPECT_EQ(wire_code_of(decode_disk_header(copy).error()), WireCode::bad_checksum);
  encode_disk_header({static_cast<DiskMsg>(99), 0, 0}, h);
  EXPECT_EQ(wire_code_of(decode_disk_header(h).error()), WireCode::bad_type);
  encode_disk_header({DiskMsg::open, 1 << 20, 0}, h);
  EXPECT_EQ(wire_code_of(decode_disk_header(h).error()), WireCode::oversize);
  encode_disk_header({DiskMsg::extent, 16 + kMaxExtentBytes + 1, 0}, h);
  EXPECT_EQ(wire_code_of(decode_disk_header(h).error()), WireCode::oversize);
  // A migration header is not a disk header.
  WireHeader mh = make_header(MsgType::hello, 1, {}, 0);
  encode_header(mh, h);
  EXPECT_EQ(wire_code_of(decode_disk_header(h).error()), WireCode::bad_magic);
}

TEST(DiskMessages, ExtentTravelsAndItsChecksumCatchesAFlippedBit) {
  auto [a, b] = testing::mem_socket_pair();
  std::vector<uint8_t> data(8192);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 7);
  ASSERT_TRUE(send_extent(*a, 65536, data).ok());
  auto m = read_disk(*b);
  ASSERT_TRUE(m.ok()) << m.error().message;
  ASSERT_EQ(m->type(), DiskMsg::extent);
  std::vector<uint8_t> into(16384);
  auto r = read_extent_into(*b, m->header, into);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->offset, 65536u);
  EXPECT_EQ(r->length, 8192u);
  EXPECT_EQ(0, std::memcmp(into.data(), data.data(), data.size()));

  const uint64_t msg = kHeaderSize + 16 + data.size();
  a->outgoing().flip(2 * msg + kHeaderSize + 16 + 100, 0x10);  // inside the third EXTENT's data
  ASSERT_TRUE(send_extent(*a, 0, data).ok());  // first: clean (flip is in the second)
  ASSERT_TRUE(send_extent(*a, 8192, data).ok());
  auto m1 = read_disk(*b);
  ASSERT_TRUE(m1.ok());
  ASSERT_TRUE(read_extent_into(*b, m1->header, into).ok());
  auto m2 = read_disk(*b);
  ASSERT_TRUE(m2.ok());
  auto bad = read_extent_into(*b, m2->header, into);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(wire_code_of(bad.error()), WireCode::bad_checksum);
}

TEST(DiskMessages, ExtentLargerThanTheBufferIsRefusedBeforeReadingIt) {
  auto [a, b] = testing::mem_socket_pair();
  std::vector<uint8_t> data(8192, 1);
  ASSERT_TRUE(send_extent(*a, 0, data).ok());
  auto m = read_disk(*b);
  ASSERT_TRUE(m.ok());
  std::vector<uint8_t> small(4096);
  auto r = read_extent_into(*b, m->header, small);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(wire_code_of(r.error()), WireCode::oversize);
}

DiskChain good_chain() {
  DiskChain c;
  c.layers.push_back({LayerFormat::raw, 32 << 20, 1, 2, "vm/base.raw"});
  c.layers.push_back({LayerFormat::kvmig_delta, 32 << 20, 3, 4, "vm/disk.raw"});
  return c;
}

TEST(DiskMessages, ChainAndStatusesRoundTrip) {
  DiskChain c = good_chain();
  auto d = decode_disk_chain(encode(c), "CHAIN");
  ASSERT_TRUE(d.ok()) << d.error().message;
  ASSERT_EQ(d->layers.size(), 2u);
  EXPECT_EQ(d->layers[1].format, LayerFormat::kvmig_delta);
  EXPECT_EQ(d->layers[1].size, 32u << 20);
  EXPECT_EQ(d->layers[1].id_hi, 3u);
  EXPECT_EQ(d->layers[1].id_lo, 4u);
  EXPECT_EQ(d->layers[1].path, "vm/disk.raw");
  std::vector<LayerStatus> s = {LayerStatus::held, LayerStatus::partial};
  auto ds = decode_layer_statuses(encode(s), 2);
  ASSERT_TRUE(ds.ok());
  EXPECT_EQ(*ds, s);
  EXPECT_FALSE(decode_layer_statuses(encode(s), 3).ok());  // not the layers asked about
  std::vector<uint8_t> bad = encode(s);
  bad.back() = 9;
  EXPECT_FALSE(decode_layer_statuses(bad, 2).ok());
}

TEST(DiskMessages, ChainRulesRefuseLoopsBadParentsAndSizes) {
  struct Case {
    const char* what;
    void (*edit)(DiskChain&);
  } cases[] = {
      {"same path twice", [](DiskChain& c) { c.layers[1].path = c.layers[0].path; }},
      {"escaping path", [](DiskChain& c) { c.layers[1].path = "../x"; }},
      {"raw on top", [](DiskChain& c) { c.layers[1].format = LayerFormat::raw; }},
      {"delta as base", [](DiskChain& c) { c.layers[0].format = LayerFormat::kvmig_delta; }},
      {"delta size differs", [](DiskChain& c) { c.layers[1].size += 512; }},
      {"unaligned raw", [](DiskChain& c) { c.layers[0].size = 1000, c.layers[1].size = 1000; }},
      {"qcow2 on a delta",
       [](DiskChain& c) { c.layers.push_back({LayerFormat::qcow2, 196616, 5, 6, "vm/top.qcow2"}); }},
      {"unknown format", [](DiskChain& c) { c.layers[1].format = static_cast<LayerFormat>(7); }},
      {"empty", [](DiskChain& c) { c.layers.clear(); }},
      {"too many", [](DiskChain& c) {
         for (int i = 0; i < 70; ++i) c.layers.push_back({LayerFormat::kvmig_delta, 32 << 20, 0, 0, "l" + std::to_string(i)});
       }},
  };
  for (const Case& k : cases) {
    DiskChain c = good_chain();
    k.edit(c);
    EXPECT_FALSE(validate(c).ok()) << k.what;
    EXPECT_FALSE(decode_disk_chain(encode(c), "CHAIN").ok()) << k.what;
  }
  // qcow2 files may have any size; a qcow2 layer may sit on a raw base.
  DiskChain q;
  q.layers.push_back({LayerFormat::raw, 1 << 20, 0, 0, "b.raw"});
  q.layers.push_back({LayerFormat::qcow2, 196616, 0, 0, "t.qcow2"});
  EXPECT_TRUE(validate(q).ok()) << validate(q).error().message;
}

TEST(DiskMessages, OpenAcceptsAnUnalignedSizeOnlyForLayerFiles) {
  DiskOpen m = good_open();
  m.image_size = 196616;
  EXPECT_FALSE(validate(m).ok());
  m.flags = kOpenAnySize;
  EXPECT_TRUE(validate(m).ok());
  m.flags = 1u << 7;
  EXPECT_FALSE(validate(m).ok());
}

TEST(DiskMessages, ErrorCarriesCodeAndText) {
  auto [a, b] = testing::mem_socket_pair();
  ASSERT_TRUE(send_disk_error(*a, wire_error(WireCode::config_mismatch, "x exists")).ok());
  auto m = read_disk(*b);
  ASSERT_TRUE(m.ok());
  Error e = disk_peer_error(*m);
  EXPECT_EQ(wire_code_of(e), WireCode::config_mismatch);
  EXPECT_NE(e.message.find("peer:"), std::string::npos);
  EXPECT_NE(e.message.find("x exists"), std::string::npos);
}

}  // namespace
}  // namespace kvmig::helper
