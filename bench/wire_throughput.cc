// Pushes MEM_PAGES batches through a real loopback (or unix) connection with N data streams,
// sender and receiver in one process, each stream on its own thread, pages going from a
// source buffer to a destination buffer exactly as they would between two guests' memory.
// Prints one line of results; bench/wire_throughput.sh runs it for 1..4 streams.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "helper/messages.h"
#include "helper/transport.h"
#include "helper/transport_pages.h"
#include "helper/wire_pages.h"

using namespace kvmig;
using namespace kvmig::helper;

namespace {

struct Args {
  int streams = 1;
  double seconds = 3;
  uint64_t mib = 512;        // guest memory per side
  uint32_t batch_pages = 256;
  bool compress = false;
  int zero_percent = 0;
  std::string endpoint = "127.0.0.1:0";
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "wire_throughput: %s\nusage: wire_throughput [--streams N] [--seconds S] "
               "[--mib M] [--batch-pages P] [--compress] [--zero-percent Z] [--endpoint E]\n",
               why);
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value for " + k).c_str());
      return argv[++i];
    };
    try {
      if (k == "--streams") a.streams = std::stoi(val());
      else if (k == "--seconds") a.seconds = std::stod(val());
      else if (k == "--mib") a.mib = std::stoull(val());
      else if (k == "--batch-pages") a.batch_pages = static_cast<uint32_t>(std::stoul(val()));
      else if (k == "--compress") a.compress = true;
      else if (k == "--zero-percent") a.zero_percent = std::stoi(val());
      else if (k == "--endpoint") a.endpoint = val();
      else usage(("unknown option " + k).c_str());
    } catch (const std::exception&) {
      usage(("bad value for " + k).c_str());
    }
  }
  if (a.streams < 1 || a.streams > kMaxStreams) usage("--streams out of range");
  if (a.mib < 4 || a.batch_pages < 1 || a.batch_pages > 16384) usage("bad --mib/--batch-pages");
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  Args args = parse(argc, argv);
  const uint64_t bytes = args.mib << 20, pages = bytes / kPageSize;
  std::vector<uint8_t> src(bytes), dst(bytes);
  std::mt19937_64 rng(42);
  for (uint64_t p = 0; p < pages; ++p) {
    uint8_t* page = &src[p * kPageSize];
    if (static_cast<int>(rng() % 100) < args.zero_percent) continue;
    for (uint64_t i = 0; i < kPageSize; i += 8) {
      uint64_t x = rng();
      std::memcpy(page + i, &x, 8);
    }
  }
  std::memset(dst.data(), 1, dst.size());  // fault it in before timing
  auto resolver = [](std::vector<uint8_t>& mem) {
    return [&mem](uint64_t gpa, uint64_t len) -> uint8_t* {
      return gpa + len <= mem.size() ? mem.data() + gpa : nullptr;
    };
  };
  MemoryLayout layout{{{0, bytes}}};

  auto ep = parse_endpoint(args.endpoint);
  if (!ep.ok()) usage(ep.error().message.c_str());
  TransportOptions options;
  options.streams = args.streams;
  auto listener = Listener::listen(*ep, options);
  if (!listener.ok()) usage(listener.error().message.c_str());

  std::vector<PageRun> all = {{0, static_cast<uint32_t>(pages)}};
  auto batches = split_batches(all, args.batch_pages, 16384);
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::duration<double>(args.seconds);
  auto start = std::chrono::steady_clock::now();
  uint64_t wire_bytes = 0;

  // Every round sends all of memory; ROUND_END's barrier keeps rounds apart, as in pre-copy.
  std::thread source([&] {
    auto conn = connect(listener->endpoint(), options);
    if (!conn.ok()) usage(conn.error().message.c_str());
    RoundSender out(*conn, kWireVersion, resolver(src), args.compress);
    uint32_t round = 1;
    for (; std::chrono::steady_clock::now() < deadline; ++round) {
      auto r = out.send(round, batches);
      if (!r.ok()) usage(r.error().message.c_str());
      wire_bytes += r->wire_bytes;
    }
    // An empty round tells the receiver that timing is over.
    if (auto r = out.send(round, {}); !r.ok()) usage(r.error().message.c_str());
    auto r = send_message(*conn->control, kWireVersion, MsgType::done);
    if (!r.ok()) usage(r.error().message.c_str());
  });

  auto conn = listener->accept();
  if (!conn.ok()) usage(conn.error().message.c_str());
  RoundReceiver in(*conn, kWireVersion, layout, resolver(dst));
  uint64_t page_bytes = 0;
  for (uint32_t round = 1;; ++round) {
    auto got = in.receive(round);
    if (!got.ok()) usage(got.error().message.c_str());
    if (got->pages == 0) break;
    page_bytes += got->pages * kPageSize;
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  source.join();
  auto done = read_message(*conn->control, kWireVersion, {});
  if (!done.ok() || done->type() != MsgType::done) usage("no DONE from the source");
  bool same = std::memcmp(src.data(), dst.data(), bytes) == 0;
  std::printf("streams=%d batch_pages=%u compress=%d zero_percent=%d  guest %.2f GB/s  wire %.2f GB/s"
              "  (%.1f GiB in %.2f s)%s\n",
              args.streams, args.batch_pages, args.compress, args.zero_percent,
              page_bytes / secs / 1e9, wire_bytes / secs / 1e9, page_bytes / double(1ull << 30),
              secs, same ? "" : "  MISMATCH");
  return same ? 0 : 1;
}
