// The socket transports on loopback: a multi-stream TCP connection moving page batches on
// every data stream at once, unix sockets, and a listener that is not fooled by strangers.
#include "helper/transport.h"

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <random>
#include <thread>

#include "helper/messages.h"
#include "helper/transport_pages.h"
#include "helper/wire_pages.h"

namespace kvmig::helper {
namespace {

// A raw TCP connection to 127.0.0.1:PORT, bypassing the transport (a stranger's view of
// a listener); an invalid Fd if it cannot connect.
Fd connect_loopback(uint16_t port) {
  Fd fd(::socket(AF_INET, SOCK_STREAM, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return Fd();
  return fd;
}

TEST(Endpoint, Parses) {
  auto tcp = parse_endpoint("10.0.0.2:4444");
  ASSERT_TRUE(tcp.ok());
  EXPECT_FALSE(tcp->is_unix);
  EXPECT_EQ(tcp->host, "10.0.0.2");
  EXPECT_EQ(tcp->port, 4444);
  auto v6 = parse_endpoint("[::1]:80");
  ASSERT_TRUE(v6.ok());
  EXPECT_EQ(v6->host, "::1");
  EXPECT_EQ(to_string(*v6), "[::1]:80");
  auto ux = parse_endpoint("unix:/run/kvmig.sock");
  ASSERT_TRUE(ux.ok());
  EXPECT_TRUE(ux->is_unix);
  EXPECT_EQ(ux->host, "/run/kvmig.sock");
  EXPECT_FALSE(parse_endpoint("host").ok());
  EXPECT_FALSE(parse_endpoint("host:").ok());
  EXPECT_FALSE(parse_endpoint("host:65536").ok());
  EXPECT_FALSE(parse_endpoint("host:12x").ok());
  EXPECT_FALSE(parse_endpoint(":80").ok());
  EXPECT_FALSE(parse_endpoint("unix:").ok());
  EXPECT_FALSE(parse_endpoint("unix:/" + std::string(200, 'a')).ok());
}

// Two pre-copy rounds of random pages over every data stream (the second resends pages the
// "guest" rewrote), received straight into the destination's memory.
void move_pages(const Endpoint& where, int streams, bool compress = false) {
  constexpr uint64_t kPages = 2048;  // 8 MiB
  std::vector<uint8_t> src(kPages * kPageSize), dst(kPages * kPageSize, 0);
  std::mt19937_64 rng(streams);
  for (size_t i = 0; i < src.size(); i += 8) {
    uint64_t x = rng();
    std::memcpy(&src[i], &x, 8);
  }
  std::memset(&src[5 * kPageSize], 0, kPageSize);
  MemoryLayout layout{{{0, kPages * kPageSize}}};
  auto resolver = [](std::vector<uint8_t>& mem) {
    return [&mem](uint64_t gpa, uint64_t len) -> uint8_t* {
      return gpa + len <= mem.size() ? mem.data() + gpa : nullptr;
    };
  };
  TransportOptions options;
  options.streams = streams;
  auto listener = Listener::listen(where, options);
  ASSERT_TRUE(listener.ok()) << listener.error().message;
  Endpoint bound = listener->endpoint();

  std::thread sender([&] {
    auto conn = connect(bound, options);
    ASSERT_TRUE(conn.ok()) << conn.error().message;
    ASSERT_EQ(conn->data.size(), static_cast<size_t>(streams));
    RoundSender out(*conn, kWireVersion, resolver(src), compress);
    std::vector<PageRun> all = {{0, kPages}};
    auto sent = out.send(1, split_batches(all, 64, 16));
    ASSERT_TRUE(sent.ok()) << sent.error().message;
    EXPECT_EQ(sent->pages, kPages);
    EXPECT_EQ(sent->zero_pages, 1u);
    // The guest rewrites pages 100..199 (to something compressible); round 2 resends them.
    std::memset(&src[100 * kPageSize], 0x42, 100 * kPageSize);
    std::vector<PageRun> dirty = {{100 * kPageSize, 100}};
    sent = out.send(2, split_batches(dirty, 16, 16));
    ASSERT_TRUE(sent.ok()) << sent.error().message;
    EXPECT_EQ(sent->compressed_batches > 0, compress);
    ASSERT_TRUE(send_message(*conn->control, kWireVersion, MsgType::done).ok());
  });

  auto conn = listener->accept();
  ASSERT_TRUE(conn.ok()) << conn.error().message;
  ASSERT_EQ(conn->data.size(), static_cast<size_t>(streams));
  RoundReceiver in(*conn, kWireVersion, layout, resolver(dst));
  auto got = in.receive(1);
  ASSERT_TRUE(got.ok()) << got.error().message;
  EXPECT_EQ(got->pages, kPages);
  got = in.receive(2);
  ASSERT_TRUE(got.ok()) << got.error().message;
  EXPECT_EQ(got->pages, 100u);
  auto done = read_message(*conn->control, kWireVersion, {});
  ASSERT_TRUE(done.ok());
  EXPECT_EQ(done->type(), MsgType::done);
  sender.join();
  EXPECT_EQ(0, std::memcmp(src.data(), dst.data(), src.size()));
}

TEST(Transport, FourTcpStreamsMovePagesIntoMemory) { move_pages(*parse_endpoint("127.0.0.1:0"), 4); }

TEST(Transport, OneTcpStreamCompressed) { move_pages(*parse_endpoint("127.0.0.1:0"), 1, true); }

// The destination declares less memory than the source sends: the receiving stream fails
// with gpa_out_of_range, every stream is shut down, and both sides return an error instead
// of hanging.
TEST(Transport, BadBatchOnOneStreamEndsTheRoundOnAllStreams) {
  TransportOptions options;
  options.streams = 3;
  auto listener = Listener::listen(*parse_endpoint("127.0.0.1:0"), options);
  ASSERT_TRUE(listener.ok());
  std::vector<uint8_t> src(1024 * kPageSize, 1), dst(512 * kPageSize, 0);
  std::thread sender([&] {
    auto conn = connect(listener->endpoint(), options);
    ASSERT_TRUE(conn.ok());
    RoundSender out(*conn, kWireVersion,
                    [&](uint64_t gpa, uint64_t len) { return gpa + len <= src.size() ? src.data() + gpa : nullptr; },
                    false);
    std::vector<PageRun> all = {{0, 1024}};
    // May succeed: socket buffers can swallow the whole round before the peer objects; the
    // source learns of it on the control stream. It must return, not hang.
    (void)out.send(1, split_batches(all, 16, 16));
  });
  auto conn = listener->accept();
  ASSERT_TRUE(conn.ok());
  MemoryLayout small{{{0, dst.size()}}};
  RoundReceiver in(*conn, kWireVersion, small,
                   [&](uint64_t gpa, uint64_t len) { return gpa + len <= dst.size() ? dst.data() + gpa : nullptr; });
  auto got = in.receive(1);
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(wire_code_of(got.error()), WireCode::gpa_out_of_range) << got.error().message;
  conn->control.reset();
  conn->data.clear();  // closes the sockets: the sender's blocked writes fail
  sender.join();
}

TEST(Transport, UnixSocket) {
  std::string path = ::testing::TempDir() + "kvmig-transport-" + std::to_string(::getpid());
  ::unlink(path.c_str());
  move_pages(*parse_endpoint("unix:" + path), 2);
  ::unlink(path.c_str());
}

TEST(Transport, ListenerIgnoresStrangersAndTimesOutOnMissingStreams) {
  TransportOptions options;
  options.streams = 2;
  options.accept_timeout_ms = 300;
  auto listener = Listener::listen(*parse_endpoint("127.0.0.1:0"), options);
  ASSERT_TRUE(listener.ok());
  Endpoint ep = listener->endpoint();
  std::thread stranger([&] {
    // A port scanner, then a peer that sends only its control stream's preamble.
    Fd fd = connect_loopback(ep.port);
    ASSERT_TRUE(fd.valid());
    ASSERT_EQ(::write(fd.get(), "GET / HTTP/1.0\r\n\r\n", 18), 18);
  });
  stranger.join();
  std::thread partial([&] {
    Fd fd = connect_loopback(ep.port);
    ASSERT_TRUE(fd.valid());
    ByteWriter w;
    w.u32(0x5453474b);
    w.u16(0);
    w.u16(3);
    w.u64(99);
    ASSERT_EQ(::write(fd.get(), w.buffer().data(), 16), 16);
    ::usleep(500 * 1000);  // outlive the 300 ms group timeout
  });
  auto conn = listener->accept();
  partial.join();
  ASSERT_FALSE(conn.ok());
  EXPECT_EQ(wire_code_of(conn.error()), WireCode::truncated) << conn.error().message;
}

TEST(Transport, ConnectRefusedIsAClearError) {
  auto listener = Listener::listen(*parse_endpoint("127.0.0.1:0"), {});
  ASSERT_TRUE(listener.ok());
  Endpoint ep = listener->endpoint();
  *listener = std::move(*Listener::listen(*parse_endpoint("127.0.0.1:0"), {}));  // closes ep
  TransportOptions options;
  auto conn = connect(ep, options);
  ASSERT_FALSE(conn.ok());
  EXPECT_NE(conn.error().message.find("Connection refused"), std::string::npos)
      << conn.error().message;
  options.streams = 0;
  EXPECT_FALSE(connect(ep, options).ok());
}

}  // namespace
}  // namespace kvmig::helper
