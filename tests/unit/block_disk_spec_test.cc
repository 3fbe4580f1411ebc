// The --disk argument ("PATH[,block=SIZE]") and block sizes: pure parsing, no device.
#include <gtest/gtest.h>

#include "kvm/block_backend.h"

namespace kvmig::kvm {
namespace {

TEST(DiskSpec, PathAloneGetsTheDefaultBlock) {
  auto s = parse_disk_spec("/var/lib/images/a.raw");
  ASSERT_TRUE(s.ok()) << s.error().message;
  EXPECT_EQ(s->path, "/var/lib/images/a.raw");
  EXPECT_EQ(s->block_bytes, 64u * 1024);
}

TEST(DiskSpec, BlockOptionTakesSizes) {
  auto s = parse_disk_spec("a.raw,block=4K");
  ASSERT_TRUE(s.ok()) << s.error().message;
  EXPECT_EQ(s->block_bytes, 4096u);
  s = parse_disk_spec("a.raw,block=2M");
  ASSERT_TRUE(s.ok()) << s.error().message;
  EXPECT_EQ(s->block_bytes, 2u << 20);
}

TEST(DiskSpec, RejectsWhatItCannotUse) {
  for (const char* bad : {"", ",block=64K", "a.raw,block=3K", "a.raw,block=2K", "a.raw,block=4M", "a.raw,block=",
                          "a.raw,block=x", "a.raw,size=1G", "a.raw,"}) {
    auto s = parse_disk_spec(bad);
    EXPECT_FALSE(s.ok()) << "'" << bad << "' accepted";
    if (!s.ok()) {
      EXPECT_FALSE(s.error().message.empty());
      EXPECT_EQ(s.error().message.find('\n'), std::string::npos);
    }
  }
}

}  // namespace
}  // namespace kvmig::kvm
