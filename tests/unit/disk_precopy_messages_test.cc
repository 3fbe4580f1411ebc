// DISKS and DISK_BLOCKS codecs: round trips, and every field check the destination relies on
// before it writes a byte.
#include "helper/disk_precopy_messages.h"

#include <gtest/gtest.h>

#include "helper/messages.h"

namespace kvmig::helper {
namespace {

constexpr uint32_t kBlock = 64 << 10;
constexpr uint64_t kDisk = 10 * kBlock + 512;  // the last block is partial

DisksMsg declared() {
  DisksMsg m;
  m.disks.push_back({kDisk, 4 * kBlock, kBlock});
  m.disks.push_back({1 << 20, 0, 4096});
  return m;
}

std::vector<uint8_t> blocks(uint32_t disk, std::vector<DiskRun> runs, int extra_data = 0) {
  std::vector<uint8_t> p = encode_disk_blocks_head(disk, 3, runs);
  uint64_t data = 0;
  for (const auto& r : runs)
    if (r.kind == DiskRunKind::data) data += r.length;
  p.resize(p.size() + data + extra_data, 0x5a);
  return p;
}

WireCode code(const Result<DiskBlocks>& r) { return r.ok() ? WireCode::none : wire_code_of(r.error()); }

TEST(DiskPrecopyMessages, DisksRoundTripAndChecks) {
  auto d = decode_disks(encode(declared()));
  ASSERT_TRUE(d.ok()) << d.error().message;
  ASSERT_EQ(d->disks.size(), 2u);
  EXPECT_EQ(d->disks[0].size, kDisk);
  EXPECT_EQ(d->disks[0].data_bytes, 4u * kBlock);
  EXPECT_EQ(d->disks[1].block_bytes, 4096u);

  auto bad = [](auto mutate) {
    DisksMsg m = declared();
    mutate(m);
    return decode_disks(encode(m));
  };
  EXPECT_EQ(wire_code_of(bad([](DisksMsg& m) { m.format = 3; }).error()), WireCode::config_mismatch);
  EXPECT_FALSE(bad([](DisksMsg& m) { m.disks.clear(); }).ok());
  EXPECT_FALSE(bad([](DisksMsg& m) { m.disks.resize(kMaxMigrationDisks + 1, m.disks[0]); }).ok());
  EXPECT_FALSE(bad([](DisksMsg& m) { m.disks[0].size = 1000; }).ok()) << "not a multiple of 512";
  EXPECT_FALSE(bad([](DisksMsg& m) { m.disks[0].size = 0; }).ok());
  EXPECT_FALSE(bad([](DisksMsg& m) { m.disks[0].data_bytes = kDisk + 512; }).ok());
  EXPECT_FALSE(bad([](DisksMsg& m) { m.disks[0].block_bytes = 3 * 4096; }).ok()) << "not a power of two";
  EXPECT_FALSE(bad([](DisksMsg& m) { m.disks[0].block_bytes = 2048; }).ok());
  EXPECT_FALSE(bad([](DisksMsg& m) { m.disks[0].block_bytes = 4u << 20; }).ok());
  std::vector<uint8_t> trailing = encode(declared());
  trailing.push_back(0);
  EXPECT_FALSE(decode_disks(trailing).ok());
}

TEST(DiskPrecopyMessages, BlocksRoundTripWithDataAndZeroRuns) {
  std::vector<DiskRun> runs{{0, 2 * kBlock, DiskRunKind::data},
                            {2 * kBlock, kBlock, DiskRunKind::zero},
                            {10 * kBlock, 512, DiskRunKind::data}};  // the partial last block
  auto payload = blocks(0, runs);
  auto m = decode_disk_blocks(payload, declared());
  ASSERT_TRUE(m.ok()) << m.error().message;
  EXPECT_EQ(m->disk, 0u);
  EXPECT_EQ(m->round, 3u);
  ASSERT_EQ(m->runs.size(), 3u);
  EXPECT_EQ(m->runs[1].kind, DiskRunKind::zero);
  EXPECT_EQ(m->data.size(), 2 * kBlock + 512);
  EXPECT_EQ(m->data[0], 0x5a);
}

TEST(DiskPrecopyMessages, BlocksOutsideMisalignedOverlappingOrMiscountedAreMalformed) {
  const DisksMsg d = declared();
  auto one = [&](uint32_t disk, uint64_t off, uint32_t len, DiskRunKind k = DiskRunKind::data) {
    return decode_disk_blocks(blocks(disk, {{off, len, k}}), d);
  };
  EXPECT_EQ(code(one(2, 0, kBlock)), WireCode::malformed) << "disk index not declared";
  EXPECT_EQ(code(one(0, 11 * kBlock, kBlock)), WireCode::malformed) << "past the end";
  EXPECT_EQ(code(one(0, 10 * kBlock, kBlock)), WireCode::malformed) << "runs over the end";
  EXPECT_EQ(code(one(0, 4096, kBlock)), WireCode::malformed) << "offset not on a block";
  EXPECT_EQ(code(one(0, 0, kBlock + 4096)), WireCode::malformed) << "length not whole blocks";
  EXPECT_EQ(code(one(0, 0, 0)), WireCode::malformed) << "empty";
  EXPECT_EQ(code(one(1, 4096, 4096)), WireCode::none) << "disk 1 tracks 4 KiB blocks";
  EXPECT_EQ(code(one(0, ~uint64_t{0} - 100, kBlock)), WireCode::malformed) << "wrapping";
  EXPECT_EQ(code(decode_disk_blocks(blocks(0, {{kBlock, kBlock}, {0, kBlock}}), d)), WireCode::malformed)
      << "descending";
  EXPECT_EQ(code(decode_disk_blocks(blocks(0, {{0, 2 * kBlock}, {kBlock, kBlock}}), d)), WireCode::malformed)
      << "overlapping";
  EXPECT_EQ(code(decode_disk_blocks(blocks(0, {{0, kBlock}}, 1), d)), WireCode::malformed) << "extra data";
  auto short_data = blocks(0, {{0, kBlock}});
  short_data.pop_back();
  EXPECT_EQ(code(decode_disk_blocks(short_data, d)), WireCode::malformed) << "short data";
  auto bad_kind = blocks(0, {{0, kBlock}});
  bad_kind[24 + 12] = 7;  // the first run's kind
  EXPECT_EQ(code(decode_disk_blocks(bad_kind, d)), WireCode::malformed);
  auto reserved = blocks(0, {{0, kBlock}});
  reserved[12] = 1;
  EXPECT_EQ(code(decode_disk_blocks(reserved, d)), WireCode::malformed);
  // A head claiming more than 16 MiB of data is refused before the runs are looked at.
  auto big = encode_disk_blocks_head(0, 1, std::vector<DiskRun>{{0, kBlock}});
  big[16] = 0, big[17] = 0, big[18] = 0, big[19] = 0x02;  // data_bytes = 32 MiB
  EXPECT_EQ(code(decode_disk_blocks(big, d)), WireCode::oversize);
}

TEST(DiskPrecopyMessages, NewTypesAreNamedAndDisksIsAFeature) {
  EXPECT_STREQ(msg_type_name(MsgType::disks), "DISKS");
  EXPECT_STREQ(msg_type_name(MsgType::disks_ready), "DISKS_READY");
  EXPECT_STREQ(msg_type_name(MsgType::disk_blocks), "DISK_BLOCKS");
  EXPECT_NE(kKnownFeatures & kFeatureDisks, 0u);
}

DisksMsg chained() {
  DisksMsg m = declared();
  m.disks[0].lower.push_back({kDisk, 6 * kBlock, LayerId{1, 2}, "base.raw"});
  m.disks[0].lower.push_back({kDisk, kBlock, LayerId{3, 4}, "disk.delta1.raw"});
  return m;
}

TEST(DiskPrecopyChains, AChainGoesOutAsFormat2AndRoundTrips) {
  std::vector<uint8_t> raw = encode(declared());
  EXPECT_EQ(raw[0], 1) << "no chain: format 1, which older destinations read";
  std::vector<uint8_t> wire = encode(chained());
  EXPECT_EQ(wire[0], 2);
  auto d = decode_disks(wire);
  ASSERT_TRUE(d.ok()) << d.error().message;
  EXPECT_EQ(d->format, kDiskPrecopyChainFormat);
  ASSERT_EQ(d->disks[0].lower.size(), 2u);
  EXPECT_EQ(d->disks[0].lower[0].name, "base.raw");
  EXPECT_EQ(d->disks[0].lower[0].data_bytes, 6u * kBlock);
  EXPECT_EQ(d->disks[0].lower[1].id, (LayerId{3, 4}));
  EXPECT_TRUE(d->disks[1].lower.empty());
  EXPECT_EQ(d->layer_count(), 2u);
}

TEST(DiskPrecopyChains, HostileChainFieldsAreRefusedWithOneLine) {
  struct Case {
    const char* what;
    void (*mutate)(DisksMsg&);
  };
  const Case cases[] = {
      {"path escape", [](DisksMsg& m) { m.disks[0].lower[0].name = "../etc/passwd"; }},
      {"slash", [](DisksMsg& m) { m.disks[0].lower[0].name = "a/b"; }},
      {"dot-dot", [](DisksMsg& m) { m.disks[0].lower[0].name = ".."; }},
      {"empty", [](DisksMsg& m) { m.disks[0].lower[0].name = ""; }},
      {"control char", [](DisksMsg& m) { m.disks[0].lower[0].name = "a\nb"; }},
      {"sidecar", [](DisksMsg& m) { m.disks[0].lower[0].name = "disk.raw.kvmig-delta"; }},
      {"id sidecar", [](DisksMsg& m) { m.disks[0].lower[0].name = "base.raw.kvmig-id"; }},
      {"too long", [](DisksMsg& m) { m.disks[0].lower[0].name = std::string(256, 'a'); }},
      {"twice", [](DisksMsg& m) { m.disks[0].lower[1].name = "base.raw"; }},
      {"size differs", [](DisksMsg& m) { m.disks[0].lower[0].size = kDisk + 512; }},
      {"data > size", [](DisksMsg& m) { m.disks[0].lower[1].data_bytes = kDisk + 1; }},
      {"no id", [](DisksMsg& m) { m.disks[0].lower[0].id = LayerId{}; }},
      {"one name, two contents", [](DisksMsg& m) {
         m.disks[1].size = kDisk;
         m.disks[1].lower.push_back({kDisk, 0, LayerId{9, 9}, "base.raw"});
       }},
      {"too many layers", [](DisksMsg& m) {
         for (uint32_t i = 0; i < kMaxMigrationLayers; ++i)
           m.disks[0].lower.push_back({kDisk, 0, LayerId{7, i + 1}, "l" + std::to_string(i)});
       }},
  };
  for (const Case& c : cases) {
    DisksMsg m = chained();
    c.mutate(m);
    auto d = decode_disks(encode(m));
    ASSERT_FALSE(d.ok()) << c.what << " accepted";
    EXPECT_EQ(d.error().message.find('\n'), std::string::npos) << c.what;
    EXPECT_NE(d.error().message.find("DISKS"), std::string::npos) << c.what << ": " << d.error().message;
  }
  // Two disks sharing one base (same name, same content) is fine.
  DisksMsg shared = chained();
  shared.disks[1].size = kDisk;
  shared.disks[1].lower.push_back(shared.disks[0].lower[0]);
  EXPECT_TRUE(decode_disks(encode(shared)).ok());
  // Format 1 with a layer count set is a format-1 peer's reserved field: malformed.
  std::vector<uint8_t> wire = encode(chained());
  wire[0] = 1;
  EXPECT_FALSE(decode_disks(wire).ok());
  // Format 2 without any chain.
  wire = encode(declared());
  wire[0] = 2;
  EXPECT_FALSE(decode_disks(wire).ok());
  // Oversized.
  std::vector<uint8_t> huge(kMaxDisksPayload + 1);
  EXPECT_EQ(wire_code_of(decode_disks(huge).error()), WireCode::oversize);
}

TEST(DiskPrecopyChains, DisksReadyAnswersEveryLayerOnce) {
  DisksMsg m = chained();
  DisksReady ready{{LayerAnswer::held, LayerAnswer::copy}};
  auto r = decode_disks_ready(encode(ready), m);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->layers, ready.layers);
  EXPECT_FALSE(decode_disks_ready(encode(DisksReady{{LayerAnswer::held}}), m).ok()) << "one answer short";
  std::vector<uint8_t> unknown = encode(ready);
  unknown[4] = 2;
  EXPECT_FALSE(decode_disks_ready(unknown, m).ok());
  EXPECT_FALSE(decode_disks_ready({}, m).ok()) << "a format-1 destination's empty answer to a chain";
  // No chains: the empty payload of format 1, and nothing else.
  EXPECT_TRUE(decode_disks_ready({}, declared()).ok());
  EXPECT_FALSE(decode_disks_ready(encode(ready), declared()).ok());
}

}  // namespace
}  // namespace kvmig::helper
