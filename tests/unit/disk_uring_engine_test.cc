// The io_uring engine: many requests in flight on registered buffers, completions by tag,
// data intact both ways.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <set>
#include <string>

#include "base/fd.h"
#include "helper/uring_engine.h"

namespace kvmig::helper {
namespace {

TEST(UringEngine, WritesThenReadsBackWithTheQueueFull) {
  char tmpl[] = "/tmp/kvmig-uring-XXXXXX";
  Fd fd(::mkstemp(tmpl));
  ASSERT_TRUE(fd.valid());
  ::unlink(tmpl);
  auto engine = UringEngine::create(kDefaultQueueDepth, 64 << 10);
  ASSERT_TRUE(engine.ok()) << engine.error().message;
  UringEngine& e = **engine;
  ASSERT_GE(e.depth(), 32u);
  for (unsigned i = 0; i < e.depth(); ++i) {
    auto b = e.buffer(i);
    for (size_t j = 0; j < b.size(); j += 8) b[j] = static_cast<uint8_t>(i + j / 8);
    ASSERT_TRUE(e.write(fd.get(), i, uint64_t{i} * b.size(), b.size(), 1000 + i).ok());
  }
  EXPECT_EQ(e.in_flight(), e.depth());
  std::set<uint64_t> tags;
  while (e.in_flight() > 0) {
    auto c = e.wait();
    ASSERT_TRUE(c.ok()) << c.error().message;
    EXPECT_EQ(c->result, static_cast<int>(e.buffer_size()));
    tags.insert(c->tag);
  }
  EXPECT_EQ(tags.size(), e.depth());
  for (unsigned i = 0; i < e.depth(); ++i) std::fill(e.buffer(i).begin(), e.buffer(i).end(), 0);
  // Read back into the buffers in reverse order: each must get its own block.
  for (unsigned i = 0; i < e.depth(); ++i) {
    unsigned blk = e.depth() - 1 - i;
    ASSERT_TRUE(e.read(fd.get(), i, uint64_t{blk} * e.buffer_size(), e.buffer_size(), i).ok());
  }
  while (e.in_flight() > 0) ASSERT_TRUE(e.wait().ok());
  for (unsigned i = 0; i < e.depth(); ++i) {
    unsigned blk = e.depth() - 1 - i;
    EXPECT_EQ(e.buffer(i)[8], static_cast<uint8_t>(blk + 1)) << i;
    EXPECT_EQ(e.buffer(i)[0], static_cast<uint8_t>(blk)) << i;
  }
}

TEST(UringEngine, ErrorsComeBackAsNegativeErrno) {
  auto engine = UringEngine::create(4, 4096);
  ASSERT_TRUE(engine.ok());
  ASSERT_TRUE((*engine)->read(-1, 0, 0, 4096, 7).ok());
  auto c = (*engine)->wait();
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->tag, 7u);
  EXPECT_EQ(c->result, -EBADF);
}

TEST(UringEngine, RefusesBadRequests) {
  EXPECT_FALSE(UringEngine::create(0, 4096).ok());
  EXPECT_FALSE(UringEngine::create(4, 1000).ok());
  auto engine = UringEngine::create(2, 4096);
  ASSERT_TRUE(engine.ok());
  EXPECT_FALSE((*engine)->read(0, 2, 0, 4096, 0).ok());     // no buffer 2
  EXPECT_FALSE((*engine)->read(0, 0, 0, 8192, 0).ok());     // longer than a buffer
  EXPECT_FALSE((*engine)->wait().ok());                     // nothing in flight
}

}  // namespace
}  // namespace kvmig::helper
