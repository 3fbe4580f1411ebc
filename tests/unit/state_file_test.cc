// The state file framing: a round trip, and every way a file can be damaged giving the
// right one-line error rather than garbage state.
#include "kvm/state_file.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "test_util.h"

namespace kvmig::kvm {
namespace {

class StateFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test::make_temp_dir("kvmig-state-file-test");
    ASSERT_FALSE(dir_.empty());
    path_ = dir_ + "/state";
  }
  void TearDown() override { std::system(("rm -rf " + dir_).c_str()); }

  // Writes a file with two small sections and one large one.
  void write_sample() {
    auto w = StateFileWriter::create(path_);
    ASSERT_TRUE(w.ok()) << w.error().message;
    ASSERT_TRUE(w->write_section({"vcpu.0", 3, {1, 2, 3, 4, 5}}).ok());
    ASSERT_TRUE(w->write_section({"empty", 1, {}}).ok());
    big_.resize(1 << 20);
    for (size_t i = 0; i < big_.size(); ++i) big_[i] = static_cast<uint8_t>(i * 7 + 1);
    iovec parts[2] = {{big_.data(), 1000}, {big_.data() + 1000, big_.size() - 1000}};
    ASSERT_TRUE(w->write_section("big", 2, parts).ok());
    auto done = w->finish();
    ASSERT_TRUE(done.ok()) << done.error().message;
  }

  std::vector<uint8_t> bytes() {
    std::ifstream f(path_, std::ios::binary);
    return {std::istreambuf_iterator<char>(f), {}};
  }
  void put_bytes(const std::vector<uint8_t>& b) {
    std::ofstream f(path_, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(b.data()), b.size());
  }

  // Reads the whole file; returns the first error message, or "" if it read cleanly.
  std::string read_all() {
    auto r = StateFileReader::open(path_);
    if (!r) return r.error().message;
    for (;;) {
      auto info = r->next();
      if (!info) return info.error().message;
      if (info->id == kEndSectionId) return "";
      auto s = r->read_section();
      if (!s) return s.error().message;
    }
  }

  std::string dir_, path_;
  std::vector<uint8_t> big_;
};

// Offsets in the sample file: file header, then frames.
constexpr size_t kFirstFrame = sizeof(FileHeader);
constexpr size_t kFirstPayload = kFirstFrame + sizeof(FrameHeader);

TEST_F(StateFileTest, RoundTripKeepsIdsVersionsAndPayloads) {
  write_sample();
  auto r = StateFileReader::open(path_);
  ASSERT_TRUE(r.ok()) << r.error().message;

  auto a = r->next();
  ASSERT_TRUE(a.ok()) << a.error().message;
  EXPECT_EQ(a->id, "vcpu.0");
  EXPECT_EQ(a->version, 3u);
  auto sa = r->read_section();
  ASSERT_TRUE(sa.ok()) << sa.error().message;
  EXPECT_EQ(sa->data, (std::vector<uint8_t>{1, 2, 3, 4, 5}));

  auto b = r->next();
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->id, "empty");
  EXPECT_EQ(b->length, 0u);
  ASSERT_TRUE(r->read_section().ok());

  // The big one streamed in two pieces, as guest memory is.
  auto c = r->next();
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->id, "big");
  EXPECT_EQ(c->version, 2u);
  ASSERT_EQ(c->length, big_.size());
  std::vector<uint8_t> got(big_.size());
  ASSERT_TRUE(r->read_payload(got.data(), 12345).ok());
  ASSERT_TRUE(r->read_payload(got.data() + 12345, got.size() - 12345).ok());
  ASSERT_TRUE(r->finish_payload().ok());
  EXPECT_EQ(got, big_);

  auto end = r->next();
  ASSERT_TRUE(end.ok()) << end.error().message;
  EXPECT_EQ(end->id, kEndSectionId);
}

TEST_F(StateFileTest, UnfinishedWriterLeavesNoFile) {
  {
    auto w = StateFileWriter::create(path_);
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE(w->write_section({"vcpu.0", 1, {1}}).ok());
  }
  EXPECT_NE(access(path_.c_str(), F_OK), 0);
  EXPECT_NE(access((path_ + ".partial").c_str(), F_OK), 0);
}

TEST_F(StateFileTest, WriterRefusesBadIdsAndVersionZero) {
  auto w = StateFileWriter::create(path_);
  ASSERT_TRUE(w.ok());
  EXPECT_FALSE(w->write_section({"", 1, {}}).ok());
  EXPECT_FALSE(w->write_section({"Upper", 1, {}}).ok());
  EXPECT_FALSE(w->write_section({std::string(32, 'a'), 1, {}}).ok());
  EXPECT_FALSE(w->write_section({"ok", 0, {}}).ok());
  EXPECT_TRUE(w->write_section({std::string(31, 'a'), 1, {}}).ok());
}

TEST_F(StateFileTest, WrongMagic) {
  write_sample();
  auto b = bytes();
  b[0] = 'X';
  put_bytes(b);
  EXPECT_NE(read_all().find("not a kvmig state file"), std::string::npos) << read_all();
}

TEST_F(StateFileTest, EmptyAndShortFileHeader) {
  put_bytes({});
  EXPECT_NE(read_all().find("truncated: file header is 0 of 32 bytes"), std::string::npos)
      << read_all();
  write_sample();
  auto b = bytes();
  b.resize(20);
  put_bytes(b);
  EXPECT_NE(read_all().find("truncated: file header"), std::string::npos) << read_all();
}

TEST_F(StateFileTest, FileHeaderChecksumAndVersion) {
  write_sample();
  auto b = bytes();
  b[offsetof(FileHeader, format_version)] ^= 1;
  put_bytes(b);
  EXPECT_NE(read_all().find("file header checksum mismatch"), std::string::npos) << read_all();

  // A consistent header of a future format version is refused by name.
  FileHeader h{};
  std::memcpy(&h, b.data(), sizeof(h));
  h.format_version = 99;
  h.checksum = XXH3_64bits(&h, offsetof(FileHeader, checksum));
  std::memcpy(b.data(), &h, sizeof(h));
  put_bytes(b);
  EXPECT_NE(read_all().find("unsupported format version 99"), std::string::npos) << read_all();
}

TEST_F(StateFileTest, FlippedPayloadByteIsAChecksumMismatch) {
  write_sample();
  auto b = bytes();
  b[kFirstPayload + 2] ^= 0x40;
  put_bytes(b);
  EXPECT_NE(read_all().find("checksum mismatch in section 'vcpu.0' at offset 32"),
            std::string::npos)
      << read_all();
}

TEST_F(StateFileTest, FlippedHeaderFieldsAreCaught) {
  write_sample();
  auto orig = bytes();
  auto b = orig;
  b[kFirstFrame + offsetof(FrameHeader, version)] ^= 0x10;  // version 3 -> 19
  put_bytes(b);
  EXPECT_NE(read_all().find("checksum mismatch in section 'vcpu.0'"), std::string::npos)
      << read_all();

  b = orig;
  b[kFirstFrame + offsetof(FrameHeader, id)] = 'w';  // "wcpu.0": valid id, wrong checksum
  put_bytes(b);
  EXPECT_NE(read_all().find("checksum mismatch in section 'wcpu.0'"), std::string::npos)
      << read_all();

  b = orig;
  b[kFirstFrame] ^= 1;  // frame magic
  put_bytes(b);
  EXPECT_NE(read_all().find("no section header at offset 32"), std::string::npos) << read_all();

  b = orig;
  std::memset(&b[kFirstFrame + offsetof(FrameHeader, id)], 'a', 32);  // no NUL
  put_bytes(b);
  EXPECT_NE(read_all().find("not terminated"), std::string::npos) << read_all();
}

TEST_F(StateFileTest, HugeDeclaredLengthIsTruncationNotAnAllocation) {
  write_sample();
  auto b = bytes();
  uint64_t huge = 1ull << 60;
  std::memcpy(&b[kFirstFrame + offsetof(FrameHeader, length)], &huge, sizeof(huge));
  put_bytes(b);
  EXPECT_NE(read_all().find("declares 1152921504606846976 bytes"), std::string::npos)
      << read_all();
}

TEST_F(StateFileTest, SectionLargerThanTheCapIsRefused) {
  write_sample();
  auto r = StateFileReader::open(path_);
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE(r->next().ok());
  auto s = r->read_section(4);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message.find("is 5 bytes, more than the 4 allowed"), std::string::npos)
      << s.error().message;
}

TEST_F(StateFileTest, TruncationAnywhereIsReported) {
  write_sample();
  auto orig = bytes();
  // Every cut point must give an error mentioning truncation, never a clean read.
  const size_t cuts[] = {kFirstFrame,      kFirstFrame + 10, kFirstPayload + 2,
                         orig.size() / 2,  orig.size() - sizeof(FrameHeader),
                         orig.size() - 1};
  for (size_t cut : cuts) {
    auto b = orig;
    b.resize(cut);
    put_bytes(b);
    std::string err = read_all();
    EXPECT_NE(err.find("truncated"), std::string::npos) << "cut at " << cut << ": " << err;
  }
}

TEST_F(StateFileTest, MissingEndSection) {
  write_sample();
  auto b = bytes();
  b.resize(b.size() - sizeof(FrameHeader));  // exactly at a section boundary
  put_bytes(b);
  EXPECT_NE(read_all().find("without an end section"), std::string::npos) << read_all();
}

TEST_F(StateFileTest, DataAfterTheEndSection) {
  write_sample();
  auto b = bytes();
  b.push_back(0);
  put_bytes(b);
  EXPECT_NE(read_all().find("data after the end section"), std::string::npos) << read_all();
}

TEST_F(StateFileTest, PayloadReaderChecksEveryField) {
  PayloadWriter w;
  w.put(uint32_t{7});
  w.put(uint16_t{9});
  StateSection s{"x", 1, w.take()};
  PayloadReader r(s);
  uint32_t a = 0;
  uint64_t b = 0;
  ASSERT_TRUE(r.get(a, "a").ok());
  EXPECT_EQ(a, 7u);
  EXPECT_FALSE(r.expect_end().ok());
  auto bad = r.get(b, "field b");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().message.find("too short for field b"), std::string::npos);
}

}  // namespace
}  // namespace kvmig::kvm
