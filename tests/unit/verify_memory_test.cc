// --verify's per-piece hashes: a mismatch must name exactly the pieces that differ, with what
// the destination knows of them (the round that last wrote each page there), and a hostile
// or inconsistent VERIFY must be refused rather than believed.
#include "helper/verify_memory.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "helper/messages.h"
#include "helper/wire_pages.h"
#include "unit/mem_socket.h"

namespace kvmig::helper {
namespace {

constexpr uint64_t kPage = 4096;

// Two regions of guest RAM with a hole between them, as the layout of a big VM has.
struct Ram {
  static constexpr uint64_t kLow = 64 * kPage, kHigh = 32 * kPage, kHighGpa = 1ull << 32;
  std::vector<uint8_t> low = std::vector<uint8_t>(kLow), high = std::vector<uint8_t>(kHigh);
  std::vector<kvm::GuestMemory::Region> regions() {
    return {{0, 0, kLow, low.data()}, {1, kHighGpa, kHigh, high.data()}};
  }
  MemoryLayout layout() const { return MemoryLayout{{{0, kLow}, {kHighGpa, kHigh}}}; }
  GpaResolver resolver() {
    return [this](uint64_t gpa, uint64_t len) -> uint8_t* {
      if (gpa + len <= kLow) return low.data() + gpa;
      if (gpa >= kHighGpa && gpa + len <= kHighGpa + kHigh) return high.data() + (gpa - kHighGpa);
      return nullptr;
    };
  }
};

void fill(Ram& ram, uint32_t seed) {
  std::mt19937_64 rng(seed);
  for (auto* v : {&ram.low, &ram.high})
    for (auto& b : *v) b = static_cast<uint8_t>(rng());
}

TEST(VerifyMemory, PieceSizeKeepsTheListSmall) {
  EXPECT_EQ(verify_piece_bytes(256ull << 20), 4096u) << "the test VMs: one hash per page";
  EXPECT_EQ(verify_piece_bytes(1ull << 30), 16384u);
  EXPECT_EQ(verify_piece_bytes(1ull << 40), 16ull << 20);
  EXPECT_EQ(verify_piece_bytes(1), 4096u);
  for (uint64_t ram : {1ull << 30, 3ull << 33, 1ull << 40})
    EXPECT_LE((ram + verify_piece_bytes(ram) - 1) / verify_piece_bytes(ram), kVerifyMaxPieces);
}

TEST(VerifyMemory, EqualMemoryPassesBothForms) {
  Ram src, dst;
  fill(src, 1);
  fill(dst, 1);
  EXPECT_TRUE(check_verify(verify_whole(src.regions()), dst.regions(), nullptr).ok());
  Verify v = verify_pieces(src.regions(), kPage);
  EXPECT_EQ(v.ranges.size(), 96u);
  EXPECT_EQ(v.bytes, Ram::kLow + Ram::kHigh);
  std::string detail;
  EXPECT_TRUE(check_verify(v, dst.regions(), nullptr, &detail).ok());
  EXPECT_TRUE(detail.empty());
}

TEST(VerifyMemory, AMismatchNamesTheDifferingPagesAndTheirLastRound) {
  Ram src, dst;
  fill(src, 2);
  fill(dst, 2);
  dst.high[5 * kPage + 100] ^= 1;          // one bit of page 5 of the high region
  std::memset(dst.low.data() + 7 * kPage, 0, kPage);  // page 7 zero here, data at the source
  PageRoundLog log(dst.layout());
  log.note(0, 64, 1, false);
  log.note(7 * kPage, 1, 2, true);
  log.note(Ram::kHighGpa, 32, 1, false);

  // Without ranges (an older peer): only that it differs.
  auto whole = check_verify(verify_whole(src.regions()), dst.regions(), &log);
  ASSERT_FALSE(whole.ok());
  EXPECT_EQ(wire_code_of(whole.error()), WireCode::internal);

  std::string detail;
  auto r = check_verify(verify_pieces(src.regions(), kPage), dst.regions(), &log, &detail);
  ASSERT_FALSE(r.ok());
  const std::string& m = r.error().message;
  EXPECT_EQ(wire_code_of(r.error()), WireCode::internal);
  EXPECT_NE(m.find("in 2 of 96 pieces of 4 KiB"), std::string::npos) << m;
  EXPECT_NE(m.find("[0x7000, +4 KiB) last written here: r2(zero); all zero here"), std::string::npos) << m;
  EXPECT_NE(m.find("[0x100005000, +4 KiB) last written here: r1; here starts"), std::string::npos) << m;
  EXPECT_EQ(m.find("0x6000"), std::string::npos) << "only differing pieces are named: " << m;
  EXPECT_NE(detail.find("verify: differs [0x7000"), std::string::npos) << detail;
  EXPECT_NE(detail.find("verify: differs [0x100005000"), std::string::npos) << detail;

  // Bigger pieces: the piece holding the page, and how its pages were last written here.
  r = check_verify(verify_pieces(src.regions(), 16 * kPage), dst.regions(), &log);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("in 2 of 6 pieces of 64 KiB"), std::string::npos) << r.error().message;
  EXPECT_NE(r.error().message.find("[0x0, +64 KiB) last written here: r1x15,r2(zero)x1"), std::string::npos)
      << r.error().message;
}

TEST(VerifyMemory, AnInconsistentVerifyIsRefused) {
  Ram src;
  fill(src, 3);
  Verify v = verify_pieces(src.regions(), kPage);
  Verify bad = v;
  bad.ranges.pop_back();
  EXPECT_EQ(wire_code_of(check_verify(bad, src.regions(), nullptr).error()), WireCode::malformed);
  bad = v;
  bad.ranges[3] ^= 1;  // list altered, hash not
  EXPECT_EQ(wire_code_of(check_verify(bad, src.regions(), nullptr).error()), WireCode::malformed);
  bad = v;
  bad.bytes += kPage;
  EXPECT_EQ(wire_code_of(check_verify(bad, src.regions(), nullptr).error()), WireCode::malformed);
}

TEST(VerifyMemory, RangesRoundTripOnlyInTheirForm) {
  Ram src;
  fill(src, 4);
  Verify v = verify_pieces(src.regions(), kPage);
  auto bytes = encode(v);
  auto back = decode_verify(bytes, true);
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_EQ(back->hash, v.hash);
  EXPECT_EQ(back->range_bytes, kPage);
  EXPECT_EQ(back->ranges, v.ranges);
  // An older destination (no ranges agreed) would read trailing bytes: refused, never guessed.
  EXPECT_EQ(wire_code_of(decode_verify(bytes, false).error()), WireCode::malformed);
  Verify plain{0x77, 4096};
  EXPECT_EQ(wire_code_of(decode_verify(encode(plain), true).error()), WireCode::malformed);

  auto bad = bytes;
  bad[16] = 0x01;  // range size 4097
  bad[17] = 0x10;
  EXPECT_EQ(wire_code_of(decode_verify(bad, true).error()), WireCode::malformed);
  bad = bytes;
  bad[24] ^= 1;  // count one off the hashes that follow
  EXPECT_EQ(wire_code_of(decode_verify(bad, true).error()), WireCode::malformed);
  bad = bytes;
  bad.resize(bad.size() - 8);
  EXPECT_EQ(wire_code_of(decode_verify(bad, true).error()), WireCode::malformed);
}

TEST(VerifyMemory, ReceivedBatchesAreLoggedByRoundAndKind) {
  Ram src, dst;
  fill(src, 5);
  std::memset(src.low.data() + 2 * kPage, 0, 2 * kPage);  // pages 2..3 go as a zero run
  PageRoundLog log(dst.layout());
  auto [a, b] = testing::mem_socket_pair();
  PageBatchSender sender(*a, kWireVersion, src.resolver());
  PageBatchReceiver receiver(*b, dst.layout(), dst.resolver());
  receiver.set_round_log(&log);
  std::vector<PageRun> runs = {{0, 6}, {Ram::kHighGpa + 4 * kPage, 2}};
  ASSERT_TRUE(sender.send(9, runs).ok());
  auto msg = read_message(*b, kWireVersion, {});
  ASSERT_TRUE(msg.ok());
  ASSERT_TRUE(receiver.receive(msg->header).ok());
  EXPECT_EQ(log.at(0), 9);
  EXPECT_EQ(log.at(2 * kPage), 0x80 | 9) << "zero run";
  EXPECT_EQ(log.at(3 * kPage), 0x80 | 9);
  EXPECT_EQ(log.at(4 * kPage), 9);
  EXPECT_EQ(log.at(6 * kPage), 0) << "not sent";
  EXPECT_EQ(log.at(Ram::kHighGpa + 5 * kPage), 9);
  EXPECT_EQ(log.at(Ram::kHighGpa + 6 * kPage), 0);
  EXPECT_EQ(log.at(Ram::kLow), 0) << "outside the layout";
}

}  // namespace
}  // namespace kvmig::helper
