#include "helper/wire.h"

#include <gtest/gtest.h>

#include <cstring>

namespace kvmig::helper {
namespace {

WireHeader sample(MsgType type = MsgType::state, uint64_t length = 100) {
  std::vector<uint8_t> payload(100, 0x5a);
  return make_header(type, kWireVersion, payload, length);
}

TEST(Wire, HeaderRoundTripsLittleEndian) {
  WireHeader h = sample();
  uint8_t bytes[kHeaderSize];
  encode_header(h, bytes);
  // The layout is fixed forever at these offsets, whatever the host's byte order.
  EXPECT_EQ(0, std::memcmp(bytes, "KMIG", 4));
  EXPECT_EQ(bytes[4], kWireVersion & 0xff);
  EXPECT_EQ(bytes[6], static_cast<uint8_t>(MsgType::state));
  EXPECT_EQ(bytes[16], 100);
  auto back = decode_header(bytes, kWireVersion, {});
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_EQ(back->type, MsgType::state);
  EXPECT_EQ(back->length, 100u);
  EXPECT_EQ(back->checksum, h.checksum);
  EXPECT_NE(back->header_check, 0u);
}

WireCode decode_code(const uint8_t* bytes, uint16_t version = kWireVersion,
                     WireLimits limits = {}) {
  auto r = decode_header(bytes, version, limits);
  return r.ok() ? WireCode::none : wire_code_of(r.error());
}

TEST(Wire, EveryHeaderFieldIsChecked) {
  uint8_t good[kHeaderSize];
  encode_header(sample(), good);
  uint8_t b[kHeaderSize];

  std::memcpy(b, good, kHeaderSize);
  b[0] ^= 1;
  EXPECT_EQ(decode_code(b), WireCode::bad_magic);

  std::memcpy(b, good, kHeaderSize);
  b[20] ^= 0x10;  // a length bit flipped in flight
  EXPECT_EQ(decode_code(b), WireCode::bad_checksum);

  WireHeader h = sample();
  h.version = kWireVersion + 1;
  encode_header(h, b);
  EXPECT_EQ(decode_code(b), WireCode::bad_version);
  EXPECT_EQ(decode_code(b, 0), WireCode::none) << "a first message may propose current+1";
  h.version = kWireVersion + 2;
  encode_header(h, b);
  EXPECT_EQ(decode_code(b, 0), WireCode::bad_version);
  h.version = 0;
  encode_header(h, b);
  EXPECT_EQ(decode_code(b, 0), WireCode::bad_version);

  h = sample();
  h.type = static_cast<MsgType>(0);
  encode_header(h, b);
  EXPECT_EQ(decode_code(b), WireCode::bad_type) << "0 is never a valid type";
  h.type = static_cast<MsgType>(kMaxMsgType + 1);
  encode_header(h, b);
  EXPECT_EQ(decode_code(b), WireCode::bad_type);

  h = sample();
  h.flags = 1u << 7;
  encode_header(h, b);
  EXPECT_EQ(decode_code(b), WireCode::bad_flags);
  h.flags = kFlagCompressed;  // only MEM_PAGES may be compressed
  encode_header(h, b);
  EXPECT_EQ(decode_code(b), WireCode::bad_flags);

  h = sample();
  h.length = (64ull << 20) + 1;
  encode_header(h, b);
  EXPECT_EQ(decode_code(b), WireCode::oversize);
  WireLimits small;
  small.max_control_payload = 99;
  encode_header(sample(), b);
  EXPECT_EQ(decode_code(b, kWireVersion, small), WireCode::oversize);
  h = sample(MsgType::mem_pages, (64ull << 20) + 16);  // MEM_PAGES has its own, larger cap
  encode_header(h, b);
  EXPECT_EQ(decode_code(b), WireCode::none);
  h.length = ~0ull;
  encode_header(h, b);
  EXPECT_EQ(decode_code(b), WireCode::oversize);
}

TEST(Wire, ZeroedBufferIsNotAMessage) {
  uint8_t zero[kHeaderSize] = {};
  EXPECT_EQ(decode_code(zero), WireCode::bad_magic);
}

TEST(Wire, VersionAgreement) {
  EXPECT_EQ(*agree_version(5, 5), 5);
  EXPECT_EQ(*agree_version(4, 5), 4) << "the previous version is still accepted";
  EXPECT_EQ(*agree_version(6, 5), 5) << "a newer peer talks down to us";
  EXPECT_EQ(wire_code_of(agree_version(3, 5).error()), WireCode::bad_version);
  EXPECT_EQ(wire_code_of(agree_version(7, 5).error()), WireCode::bad_version);
  EXPECT_EQ(wire_code_of(agree_version(0).error()), WireCode::bad_version);
  EXPECT_EQ(*agree_version(kWireVersion), kWireVersion);
}

TEST(Wire, ByteReaderNeverReadsPastTheEnd) {
  ByteWriter w;
  w.u32(7);
  w.str("hello");
  w.blob(std::vector<uint8_t>{1, 2, 3});
  auto bytes = w.take();
  ByteReader r(bytes, "test");
  EXPECT_EQ(*r.u32(), 7u);
  EXPECT_EQ(*r.str(16), "hello");
  auto blob = r.blob(16);
  ASSERT_TRUE(blob.ok());
  EXPECT_EQ(blob->size(), 3u);
  EXPECT_TRUE(r.finish().ok());
  EXPECT_EQ(wire_code_of(r.u8().error()), WireCode::malformed);

  ByteReader capped(bytes, "test");
  (void)capped.u32();
  EXPECT_EQ(wire_code_of(capped.str(4).error()), WireCode::oversize);

  // A length that claims more than the payload holds.
  ByteWriter lie;
  lie.u64(1ull << 40);
  auto lie_bytes = lie.take();
  ByteReader liar(lie_bytes, "test");
  EXPECT_EQ(wire_code_of(liar.blob(~0ull).error()), WireCode::malformed);

  ByteReader trailing(bytes, "test");
  (void)trailing.u32();
  EXPECT_EQ(wire_code_of(trailing.finish().error()), WireCode::malformed);
}

TEST(Wire, CodeSurvivesContextPrefix) {
  Error e = wire_error(WireCode::gpa_out_of_range, "run 3");
  e.prefix("stream 2");
  EXPECT_EQ(wire_code_of(e), WireCode::gpa_out_of_range);
  EXPECT_EQ(e.message, "stream 2: [gpa_out_of_range] run 3");
  EXPECT_EQ(wire_code_of(Error{"plain"}), WireCode::none);
}

}  // namespace
}  // namespace kvmig::helper
