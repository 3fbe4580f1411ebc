// Protocol messages over an in-memory socket pair, with the faults a network or a hostile
// peer can produce: each must end in the right error code, and nothing outside the declared
// guest memory may be written.
#include "helper/messages.h"

#include <gtest/gtest.h>

#include <sys/mman.h>

#include <cstring>
#include <random>

#include "helper/wire_pages.h"
#include "unit/mem_socket.h"

namespace kvmig::helper {
namespace {

using testing::mem_socket_pair;

Hello sample_hello() {
  Hello h;
  h.auth_nonce.fill(0x11);
  h.migration_id = "mig-42";
  h.vm_uuid.fill(0xab);
  h.vcpus = 4;
  h.memory.ranges = {{0, 3ull << 30}, {4ull << 30, 1ull << 30}};
  h.dirty_ring_entries = 4096;
  h.streams = 3;
  h.features = kFeatureCompression;
  return h;
}

TEST(Messages, HelloRoundTripsThroughASocket) {
  auto [a, b] = mem_socket_pair();
  auto payload = encode(sample_hello());
  ASSERT_TRUE(send_message(*a, kWireVersion, MsgType::hello, payload).ok());
  auto msg = read_message(*b, 0, {});
  ASSERT_TRUE(msg.ok()) << msg.error().message;
  ASSERT_EQ(msg->type(), MsgType::hello);
  auto hello = decode_hello(msg->payload, msg->header.version);
  ASSERT_TRUE(hello.ok()) << hello.error().message;
  EXPECT_EQ(hello->migration_id, "mig-42");
  EXPECT_EQ(hello->vcpus, 4u);
  EXPECT_EQ(hello->memory.total(), 4ull << 30);
  EXPECT_EQ(hello->vm_uuid[15], 0xab);
  EXPECT_EQ(hello->streams, 3u);
  EXPECT_EQ(hello->dirty_ring_entries, 4096u);
  EXPECT_TRUE(hello->memory.contains(4ull << 30, 4096));
  EXPECT_FALSE(hello->memory.contains((3ull << 30) - 4096, 8192)) << "straddles the hole";
}

TEST(Messages, HelloFieldsAreChecked) {
  auto code = [](Hello h) {
    auto r = decode_hello(encode(h), kWireVersion);
    return r.ok() ? WireCode::none : wire_code_of(r.error());
  };
  Hello h = sample_hello();
  h.vcpus = 0;
  EXPECT_EQ(code(h), WireCode::config_mismatch);
  h = sample_hello();
  h.migration_id = "bad id\n";
  EXPECT_EQ(code(h), WireCode::malformed);
  h = sample_hello();
  h.memory.ranges = {{0, 1 << 20}, {1 << 19, 1 << 20}};
  EXPECT_EQ(code(h), WireCode::malformed) << "overlapping ranges";
  h.memory.ranges = {{~0ull - 4095, 8192}};
  EXPECT_EQ(code(h), WireCode::malformed) << "wrapping range";
  h.memory.ranges.clear();
  EXPECT_EQ(code(h), WireCode::malformed);
  h = sample_hello();
  h.streams = kMaxStreams + 1;
  EXPECT_EQ(code(h), WireCode::malformed);
  Hello v1 = sample_hello();
  v1.version = 1;
  auto bytes = encode(v1);
  bytes.push_back(0);
  EXPECT_EQ(wire_code_of(decode_hello(bytes, 1).error()), WireCode::malformed);
  bytes.resize(bytes.size() - 5);
  EXPECT_EQ(wire_code_of(decode_hello(bytes, 1).error()), WireCode::malformed);
}

// Version 2: HELLO names the VM, so the destination's placeholder gets the same name.
TEST(Messages, HelloCarriesTheVmNameFromVersion2) {
  Hello h = sample_hello();
  h.vm_name = "web-01 (blue)";
  auto back = decode_hello(encode(h), 2);
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_EQ(back->vm_name, "web-01 (blue)");
  EXPECT_EQ(back->migration_id, "mig-42");
}

// A version-1 source (no name in HELLO) is still accepted: its VM arrives nameless.
TEST(Messages, Version1HelloWithoutANameIsStillAccepted) {
  Hello h = sample_hello();
  h.version = 1;
  h.vm_name = "dropped";
  auto bytes = encode(h);
  EXPECT_EQ(bytes.size() + 4, encode(sample_hello()).size()) << "v1 has no name field (v2: u32 length + bytes)";
  auto back = decode_hello(bytes, 1);
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_EQ(back->vm_name, "");
  EXPECT_EQ(back->version, 1u);
  EXPECT_EQ(*agree_version(kWireVersion - 1), kWireVersion - 1) << "the previous version is agreed on";
}

// Version 3: the destination acknowledges each round once every page of it is applied.
TEST(Messages, RoundAckRoundTripsAndIsChecked) {
  RoundAck a{4, 1000, 4096 * 1000 + 32};
  auto back = decode_round_ack(encode(a));
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_EQ(back->round, 4u);
  EXPECT_EQ(back->pages, 1000u);
  EXPECT_EQ(back->bytes, 4096u * 1000 + 32);
  EXPECT_EQ(wire_code_of(decode_round_ack(encode(RoundAck{0, 1, 64})).error()), WireCode::malformed)
      << "round 0 never exists";
  EXPECT_EQ(wire_code_of(decode_round_ack(encode(RoundAck{1, 5, 0})).error()), WireCode::malformed)
      << "pages from no bytes";
  EXPECT_TRUE(decode_round_ack(encode(RoundAck{1, 0, 0})).ok()) << "an empty round is acknowledged too";
  auto bytes = encode(a);
  bytes.push_back(0);
  EXPECT_EQ(wire_code_of(decode_round_ack(bytes).error()), WireCode::malformed) << "trailing byte";
  bytes.resize(bytes.size() - 2);
  EXPECT_EQ(wire_code_of(decode_round_ack(bytes).error()), WireCode::malformed) << "short";
  EXPECT_GE(kWireVersion, kRoundAckVersion);
}

TEST(Messages, RoundAckMustEchoTheRoundSent) {
  EXPECT_TRUE(check_round_ack(RoundAck{3, 10, 40992}, 3, 10, 40992).ok());
  auto wrong_round = check_round_ack(RoundAck{4, 10, 40992}, 3, 10, 40992);
  ASSERT_FALSE(wrong_round.ok());
  EXPECT_EQ(wire_code_of(wrong_round.error()), WireCode::unexpected);
  EXPECT_NE(wrong_round.error().message.find("ROUND_ACK of round 4 where round 3 was due"), std::string::npos)
      << wrong_round.error().message;
  auto more = check_round_ack(RoundAck{3, 11, 40992}, 3, 10, 40992);
  ASSERT_FALSE(more.ok());
  EXPECT_EQ(wire_code_of(more.error()), WireCode::malformed);
  EXPECT_NE(more.error().message.find("applied 11 pages, 10 were sent"), std::string::npos) << more.error().message;
  EXPECT_EQ(wire_code_of(check_round_ack(RoundAck{3, 9, 40992}, 3, 10, 40992).error()), WireCode::malformed)
      << "fewer pages than sent: some were lost";
  EXPECT_EQ(wire_code_of(check_round_ack(RoundAck{3, 10, 40993}, 3, 10, 40992).error()), WireCode::malformed);
}

TEST(Messages, HelloVmNameIsChecked) {
  auto code = [](const std::string& name) {
    Hello h = sample_hello();
    h.vm_name = name;
    auto r = decode_hello(encode(h), 2);
    return r.ok() ? WireCode::none : wire_code_of(r.error());
  };
  EXPECT_EQ(code(std::string(kMaxVmName, 'n')), WireCode::none);
  EXPECT_EQ(code(std::string(kMaxVmName + 1, 'n')), WireCode::oversize);
  EXPECT_EQ(code("two\nlines"), WireCode::malformed);
  EXPECT_EQ(code(std::string("nul\0", 4)), WireCode::malformed);
}

TEST(Messages, SmallMessagesRoundTrip) {
  HelloAck ack;
  ack.version = 1;
  ack.features = kFeatureVerify;
  EXPECT_EQ(decode_hello_ack(encode(ack))->features, kFeatureVerify);

  RoundEnd re{7, 100, 10, 409600, 1234, 55};
  auto re2 = decode_round_end(encode(re));
  ASSERT_TRUE(re2.ok());
  EXPECT_EQ(re2->round, 7u);
  EXPECT_EQ(re2->dirty_pages_left, 55u);
  re.zero_pages = 101;
  EXPECT_EQ(wire_code_of(decode_round_end(encode(re)).error()), WireCode::malformed);

  Verify v{0x1234, 4096};
  EXPECT_EQ(decode_verify(encode(v))->hash, 0x1234u);
  EXPECT_TRUE(decode_empty({}, MsgType::commit).ok());
  uint8_t one = 0;
  EXPECT_EQ(wire_code_of(decode_empty({&one, 1}, MsgType::commit).error()), WireCode::malformed);
}

TEST(Messages, StateSectionIdsAndSizesAreChecked) {
  kvm::StateSection s{"vcpu.0", 3, std::vector<uint8_t>(1000, 7)};
  auto known = [](std::string_view id) { return id.rfind("vcpu.", 0) == 0; };
  auto back = decode_state(encode(s), known, 4096);
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_EQ(back->id, "vcpu.0");
  EXPECT_EQ(back->version, 3u);
  EXPECT_EQ(back->data, s.data);
  EXPECT_EQ(wire_code_of(decode_state(encode(s), known, 999).error()), WireCode::oversize);
  s.id = "dev.mystery";
  EXPECT_EQ(wire_code_of(decode_state(encode(s), known, 4096).error()),
            WireCode::unknown_section);
  s.id = "";
  EXPECT_EQ(wire_code_of(decode_state(encode(s), nullptr, 4096).error()), WireCode::malformed);
}

TEST(Messages, ErrorCarriesCodeAndSanitizedText) {
  auto [a, b] = mem_socket_pair();
  ErrorMsg e{WireCode::config_mismatch, "no room for 64 GiB\x1b[2J"};
  ASSERT_TRUE(send_message(*a, 1, MsgType::error, encode(e)).ok());
  auto msg = read_message(*b, 1, {});
  ASSERT_TRUE(msg.ok());
  Error err = peer_error(*msg);
  EXPECT_EQ(wire_code_of(err), WireCode::config_mismatch);
  EXPECT_NE(err.message.find("no room for 64 GiB?[2J"), std::string::npos) << err.message;
}

// Faults injected on the wire, each mapped to its code.
WireCode read_after(const std::function<void(testing::MemStream&)>& fault,
                    uint16_t reader_version = kWireVersion, uint16_t sender_version = kWireVersion) {
  auto [a, b] = mem_socket_pair();
  fault(*a);
  kvm::StateSection s{"clock", 1, std::vector<uint8_t>(256, 3)};
  (void)send_message(*a, sender_version, MsgType::state, encode(s));
  a->outgoing().close();
  auto msg = read_message(*b, reader_version, {});
  return msg.ok() ? WireCode::none : wire_code_of(msg.error());
}

TEST(Messages, InjectedFaultsGiveTheRightError) {
  EXPECT_EQ(read_after([](auto&) {}), WireCode::none);
  EXPECT_EQ(read_after([](auto& s) { s.outgoing().truncate_after(20); }), WireCode::truncated);
  EXPECT_EQ(read_after([](auto& s) { s.outgoing().truncate_after(kHeaderSize + 100); }),
            WireCode::truncated);
  EXPECT_EQ(read_after([](auto& s) { s.outgoing().flip(kHeaderSize + 50, 0x01); }),
            WireCode::bad_checksum);
  EXPECT_EQ(read_after([](auto& s) { s.outgoing().flip(17, 0x40); }), WireCode::bad_checksum)
      << "corrupt length field";
  EXPECT_EQ(read_after([](auto& s) {
              std::vector<uint8_t> garbage(64);
              std::mt19937 rng(1);
              for (auto& g : garbage) g = static_cast<uint8_t>(rng());
              s.outgoing().inject(garbage);
            }),
            WireCode::bad_magic);
  EXPECT_EQ(read_after([](auto&) {}, 1, 2), WireCode::bad_version);
}

TEST(Messages, OversizeLengthIsRejectedBeforeAllocating) {
  auto [a, b] = mem_socket_pair();
  WireHeader h = make_header(MsgType::state, kWireVersion, {}, 1ull << 40);
  uint8_t bytes[kHeaderSize];
  encode_header(h, bytes);
  a->outgoing().inject(bytes);
  auto msg = read_message(*b, kWireVersion, {});
  ASSERT_FALSE(msg.ok());
  EXPECT_EQ(wire_code_of(msg.error()), WireCode::oversize);
}


// A fake guest: RAM at [0, 1 MiB) and [4 GiB, 4 GiB + 1 MiB), plus a guard zone after each
// region that must stay untouched whatever the peer sends.
struct FakeGuest {
  static constexpr uint64_t kRegion = 1 << 20;
  static constexpr uint64_t kGuard = 64 << 10;
  std::vector<uint8_t> low = std::vector<uint8_t>(kRegion + kGuard, 0xee);
  std::vector<uint8_t> high = std::vector<uint8_t>(kRegion + kGuard, 0xee);
  MemoryLayout layout{{{0, kRegion}, {4ull << 30, kRegion}}};

  GpaResolver resolver() {
    return [this](uint64_t gpa, uint64_t len) -> uint8_t* {
      if (gpa + len <= kRegion) return low.data() + gpa;
      if (gpa >= (4ull << 30) && gpa + len <= (4ull << 30) + kRegion)
        return high.data() + (gpa - (4ull << 30));
      return nullptr;
    };
  }
  bool guards_intact() const {
    for (uint64_t i = kRegion; i < kRegion + kGuard; ++i)
      if (low[i] != 0xee || high[i] != 0xee) return false;
    return true;
  }
};

void fill_random(std::vector<uint8_t>& v, uint64_t len, uint32_t seed) {
  std::mt19937_64 rng(seed);
  for (uint64_t i = 0; i < len; i += 8) {
    uint64_t x = rng();
    std::memcpy(v.data() + i, &x, 8);
  }
}

TEST(MemPages, RawZeroAndCompressedBatchesLandInGuestMemory) {
  FakeGuest src, dst;
  fill_random(src.low, FakeGuest::kRegion, 1);
  std::memset(src.low.data() + 8 * kPageSize, 0, 3 * kPageSize);       // zero pages
  std::memset(src.high.data(), 'x', FakeGuest::kRegion);             // compressible
  auto [a, b] = mem_socket_pair();
  PageCompressor compressor;
  PageBatchSender raw(*a, kWireVersion, src.resolver());
  PageBatchSender packed(*a, kWireVersion, src.resolver(), &compressor);
  PageBatchReceiver receiver(*b, dst.layout, dst.resolver());

  std::vector<PageRun> runs = {{0, 16}, {20 * kPageSize, 4}};
  auto sent = raw.send(3, runs);
  ASSERT_TRUE(sent.ok()) << sent.error().message;
  EXPECT_EQ(sent->pages, 20u);
  EXPECT_EQ(sent->zero_pages, 3u);
  EXPECT_FALSE(sent->compressed);
  auto msg = read_message(*b, kWireVersion, {});
  ASSERT_TRUE(msg.ok());
  auto got = receiver.receive(msg->header);
  ASSERT_TRUE(got.ok()) << got.error().message;
  EXPECT_EQ(receiver.last_round(), 3u);
  EXPECT_EQ(got->zero_pages, 3u);
  EXPECT_EQ(got->wire_bytes, sent->wire_bytes);
  EXPECT_EQ(0, std::memcmp(src.low.data(), dst.low.data(), 16 * kPageSize));
  EXPECT_EQ(0, std::memcmp(src.low.data() + 20 * kPageSize, dst.low.data() + 20 * kPageSize,
                           4 * kPageSize));
  EXPECT_EQ(dst.low[16 * kPageSize], 0xee) << "page 16 was not sent";

  std::vector<PageRun> high = {{4ull << 30, 256}};
  sent = packed.send(4, high);
  ASSERT_TRUE(sent.ok()) << sent.error().message;
  EXPECT_TRUE(sent->compressed);
  EXPECT_LT(sent->wire_bytes, 256 * kPageSize / 8);
  msg = read_message(*b, kWireVersion, {});
  ASSERT_TRUE(msg.ok());
  EXPECT_TRUE(msg->header.flags & kFlagCompressed);
  got = receiver.receive(msg->header);
  ASSERT_TRUE(got.ok()) << got.error().message;
  EXPECT_EQ(0, std::memcmp(src.high.data(), dst.high.data(), 256 * kPageSize));

  // Random data does not compress: sent raw; compressible data right after is compressed.
  sent = packed.send(4, runs);
  ASSERT_TRUE(sent.ok());
  EXPECT_FALSE(sent->compressed);
  msg = read_message(*b, kWireVersion, {});
  ASSERT_TRUE(receiver.receive(msg->header).ok());
  sent = packed.send(5, high);
  ASSERT_TRUE(sent.ok());
  EXPECT_TRUE(sent->compressed);
  msg = read_message(*b, kWireVersion, {});
  ASSERT_TRUE(receiver.receive(msg->header).ok());
  EXPECT_TRUE(dst.guards_intact());
}

// Sends one batch built by hand (descriptors as given) and returns the receiver's code.
WireCode receive_crafted(FakeGuest& dst, const std::vector<std::array<uint64_t, 3>>& runs,
                         uint64_t data_pages, uint64_t data_bytes, uint32_t flags = 0,
                         bool break_checksum = false, WireLimits limits = {}) {
  auto [a, b] = mem_socket_pair();
  ByteWriter w;
  w.u32(1);
  w.u32(static_cast<uint32_t>(runs.size()));
  w.u64(data_pages);
  for (auto& r : runs) {
    w.u64(r[0]);
    w.u32(static_cast<uint32_t>(r[1]));
    w.u32(static_cast<uint32_t>(r[2]));
  }
  auto meta = w.take();
  std::vector<uint8_t> data(data_bytes, 0x77);
  std::vector<uint8_t> checked = meta;
  if (flags & kFlagCompressed) checked.insert(checked.end(), data.begin(), data.end());
  WireHeader h = make_header(MsgType::mem_pages, kWireVersion, checked, meta.size() + data_bytes,
                             flags);
  if (break_checksum) h.checksum ^= 1;
  uint8_t head[kHeaderSize];
  encode_header(h, head);
  a->outgoing().inject(head);
  a->outgoing().inject(meta);
  a->outgoing().inject(data);
  a->outgoing().close();
  auto msg = read_message(*b, kWireVersion, limits);
  if (!msg.ok()) return wire_code_of(msg.error());
  PageBatchReceiver receiver(*b, dst.layout, dst.resolver(), limits);
  auto r = receiver.receive(msg->header);
  return r.ok() ? WireCode::none : wire_code_of(r.error());
}

// Zero runs into private anonymous memory: a page holding data reads back as zeros, and a
// page never written stays unallocated (writing zeros would fault it in for nothing).
TEST(MemPages, ZeroRunsIntoAnonymousMemoryAllocateNothing) {
  constexpr uint64_t kPages = 64;
  void* map = ::mmap(nullptr, kPages * kPageSize, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  ASSERT_NE(map, MAP_FAILED);
  ::madvise(map, kPages * kPageSize, MADV_NOHUGEPAGE);  // residency per 4 KiB page
  auto* dst = static_cast<uint8_t*>(map);
  std::memset(dst + 2 * kPageSize, 0x5a, 2 * kPageSize);  // pages 2, 3 hold data
  MemoryLayout layout{{{0, kPages * kPageSize}}};
  GpaResolver target = [&](uint64_t gpa, uint64_t len) -> uint8_t* {
    return gpa + len <= kPages * kPageSize ? dst + gpa : nullptr;
  };
  std::vector<uint8_t> zeros(kPages * kPageSize, 0);
  GpaResolver source = [&](uint64_t gpa, uint64_t len) -> uint8_t* {
    return gpa + len <= zeros.size() ? zeros.data() + gpa : nullptr;
  };
  auto [a, b] = mem_socket_pair();
  PageBatchSender sender(*a, kWireVersion, source);
  PageBatchReceiver receiver(*b, layout, target);
  receiver.set_anonymous_target(true);
  std::vector<PageRun> runs = {{0, static_cast<uint32_t>(kPages)}};
  auto sent = sender.send(1, runs);
  ASSERT_TRUE(sent.ok()) << sent.error().message;
  ASSERT_EQ(sent->zero_pages, kPages);
  auto msg = read_message(*b, kWireVersion, {});
  ASSERT_TRUE(msg.ok());
  auto got = receiver.receive(msg->header);
  ASSERT_TRUE(got.ok()) << got.error().message;
  EXPECT_EQ(got->zero_pages, kPages);
  std::vector<unsigned char> resident(kPages);
  ASSERT_EQ(0, ::mincore(map, kPages * kPageSize, resident.data()));
  for (uint64_t p = 0; p < kPages; ++p) EXPECT_FALSE(resident[p] & 1) << "page " << p << " was allocated";
  for (uint64_t i = 0; i < kPages * kPageSize; ++i) ASSERT_EQ(dst[i], 0) << "byte " << i;
  ::munmap(map, kPages * kPageSize);
}

TEST(MemPages, HostileBatchesAreRejectedBeforeAnyWrite) {
  FakeGuest dst;
  const uint64_t P = kPageSize;
  EXPECT_EQ(receive_crafted(dst, {{{0, 2, 0}}}, 2, 2 * P), WireCode::none);
  EXPECT_EQ(dst.low[0], 0x77);
  FakeGuest fresh;
  // Just past the end of low RAM: into the guard zone.
  EXPECT_EQ(receive_crafted(fresh, {{{FakeGuest::kRegion - P, 2, 0}}}, 2, 2 * P),
            WireCode::gpa_out_of_range);
  // A gpa + length that wraps around 2^64.
  EXPECT_EQ(receive_crafted(fresh, {{{~0ull - P + 1, 2, 1}}}, 0, 0), WireCode::gpa_out_of_range);
  EXPECT_EQ(receive_crafted(fresh, {{{100, 1, 0}}}, 1, P), WireCode::gpa_out_of_range)
      << "unaligned gpa";
  EXPECT_EQ(receive_crafted(fresh, {{{0, 1, 0}, {8 * P, 1, 0}}}, 1, P), WireCode::malformed)
      << "head says 1 data page, runs hold 2 (and the length matches the head)";
  EXPECT_EQ(receive_crafted(fresh, {{{0, 1, 0}}}, 1, P - 1), WireCode::malformed)
      << "length does not match data pages";
  EXPECT_EQ(receive_crafted(fresh, {{{0, 1, 9}}}, 1, P), WireCode::malformed) << "bad kind";
  EXPECT_EQ(receive_crafted(fresh, {{{0, 0, 0}}}, 0, 0), WireCode::malformed) << "empty run";
  EXPECT_EQ(receive_crafted(fresh, {{{0, 1, 0}}}, 1, P, 0, true), WireCode::bad_checksum);
  WireLimits tight;
  tight.max_batch_pages = 4;
  tight.max_batch_runs = 2;
  EXPECT_EQ(receive_crafted(fresh, {{{0, 8, 1}}}, 0, 0, 0, false, tight), WireCode::oversize);
  EXPECT_EQ(receive_crafted(fresh, {{{0, 1, 1}, {P, 1, 1}, {2 * P, 1, 1}}}, 0, 0, 0, false,
                            tight),
            WireCode::oversize);
  // A "compressed" frame that is garbage.
  EXPECT_EQ(receive_crafted(fresh, {{{0, 1, 0}}}, 1, 100, kFlagCompressed), WireCode::malformed);
  EXPECT_TRUE(fresh.guards_intact());
  EXPECT_EQ(fresh.low[0], 0xee) << "nothing written by a rejected batch";
}

TEST(MemPages, BitmapToRunsAndBatches) {
  kvm::DirtyBitmap bm{0, 1ull << 32, 200, std::vector<uint64_t>(4, 0)};
  bm.bits[0] = 0b1110'0001;            // pages 0, 5..7
  bm.bits[1] = ~0ull;                  // 64..127
  bm.bits[2] = 1;                      // 128 -> joins 64..127
  bm.bits[3] = ~0ull;                  // 192..199 only (200 pages)
  auto runs = runs_from_bitmap(bm);
  ASSERT_EQ(runs.size(), 4u);
  EXPECT_EQ(runs[0].gpa, 1ull << 32);
  EXPECT_EQ(runs[0].pages, 1u);
  EXPECT_EQ(runs[1].gpa, (1ull << 32) + 5 * kPageSize);
  EXPECT_EQ(runs[1].pages, 3u);
  EXPECT_EQ(runs[2].pages, 65u);
  EXPECT_EQ(runs[3].pages, 8u);
  auto batches = split_batches(runs, 32, 16);
  uint64_t total = 0;
  for (auto& b : batches) {
    uint64_t n = 0;
    for (auto& r : b) n += r.pages;
    EXPECT_LE(n, 32u);
    total += n;
  }
  EXPECT_EQ(total, 77u);
  EXPECT_EQ(batches.size(), 3u);
}

}  // namespace
}  // namespace kvmig::helper
