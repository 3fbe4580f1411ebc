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
  EXPECT_EQ(wire_code_of(bad([](DisksMsg& m) { m.format = 2; }).error()), WireCode::config_mismatch);
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

}  // namespace
}  // namespace kvmig::helper
