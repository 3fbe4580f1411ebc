// `kvmig disk copy SRC HOST:PORT:DST` and `kvmig disk serve --listen ADDR:PORT --root DIR`:
// moving a disk image that is not in use between hosts, resumable and movable (hand-off).
// The protocol and the exact semantics are in docs/protocol.md, section "Disk copy".
#include <signal.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>

#include "cli/command_args.h"
#include "helper/disk_copy_sink.h"
#include "helper/disk_copy_source.h"
#include "helper/transport.h"
#include "helper/uring_engine.h"

namespace {

namespace h = kvmig::helper;

constexpr int kFailed = 1;

std::atomic<bool> g_handoff_now{false};

void on_sigusr1(int) { g_handoff_now.store(true); }

[[noreturn]] void fail(const char* command, const std::string& message) {
  kvmig::cli::command_fail((std::string("disk ") + command).c_str(), kFailed, message);
}

struct Target {
  h::Endpoint endpoint;
  std::string path;
};

// "host:port:path" or "[v6addr]:port:path". The path is relative to the server's --root.
kvmig::Result<Target> parse_target(const std::string& text) {
  size_t host_end = 0;
  if (!text.empty() && text.front() == '[') {
    host_end = text.find(']');
    if (host_end == std::string::npos) return kvmig::Error{"'" + text + "': unclosed '['"};
    ++host_end;
  } else {
    host_end = text.find(':');
  }
  size_t port_end = host_end == std::string::npos ? std::string::npos : text.find(':', host_end + 1);
  if (host_end == std::string::npos || port_end == std::string::npos || port_end + 1 >= text.size())
    return kvmig::Error{"'" + text + "': want HOST:PORT:DST (DST relative to the server's --root)"};
  Target t;
  KVMIG_ASSIGN(t.endpoint, h::parse_endpoint(text.substr(0, port_end)));
  t.path = text.substr(port_end + 1);
  return t;
}

struct CopyOptions {
  std::string source, target, handoff;
  uint64_t handoff_after = 0, fault_drop_after = 0, expect_size = 0;
  uint64_t block_size = 64 << 10, chunk = 1 << 20;
  unsigned queue_depth = h::kDefaultQueueDepth;
  int retries = 5, retry_delay_ms = 500;
  bool no_direct = false, overwrite = false, json = false;
};

int run_copy(const CopyOptions& o) {
  auto started = std::chrono::steady_clock::now();
  auto primary = parse_target(o.target);
  if (!primary.ok()) fail("copy", primary.error().message);
  Target target = *primary;
  std::optional<h::Endpoint> handoff;
  if (!o.handoff.empty()) {
    auto ep = h::parse_endpoint(o.handoff);
    if (!ep.ok()) fail("copy", "--handoff: " + ep.error().message);
    handoff = *ep;
    struct sigaction sa {};
    sa.sa_handler = on_sigusr1;
    ::sigaction(SIGUSR1, &sa, nullptr);
  }
  if (o.block_size > UINT32_MAX || o.chunk > UINT32_MAX)
    fail("copy", "--block-size / --chunk too large");
  h::DiskSourceOptions opt;
  opt.block_size = static_cast<uint32_t>(o.block_size);
  opt.chunk = static_cast<uint32_t>(o.chunk);
  opt.queue_depth = o.queue_depth;
  opt.direct = !o.no_direct;
  opt.overwrite = o.overwrite;
  opt.expect_size = o.expect_size;
  auto image = h::open_disk_image(o.source, opt);
  if (!image.ok()) fail("copy", image.error().message);

  nlohmann::json connections = nlohmann::json::array();
  uint64_t data = 0, zero = 0, holes = 0, handoff_at = 0;
  int retries_left = o.retries;
  bool handed_off = false;
  for (int attempt = 1;; ++attempt) {
    h::TransportOptions topt;
    topt.streams = 1;
    h::DiskSourceOptions run = opt;
    run.fault_drop_after = attempt == 1 ? o.fault_drop_after : 0;
    if (handoff && !handed_off) {
      run.stop_after = o.handoff_after;
      run.stop_request = &g_handoff_now;
    }
    auto conn = h::connect(target.endpoint, topt);
    kvmig::Result<h::DiskCopyReport> r =
        conn.ok() ? h::copy_disk(*image, *conn, target.path, run)
                  : kvmig::Result<h::DiskCopyReport>(conn.error());
    if (!r.ok()) {
      std::string where = h::to_string(target.endpoint) + ":" + target.path;
      if (h::disk_error_retriable(r.error()) && retries_left-- > 0) {
        std::fprintf(stderr, "kvmig: disk copy: connection %d to %s failed (%s); resuming\n", attempt,
                     where.c_str(), r.error().message.c_str());
        std::this_thread::sleep_for(std::chrono::milliseconds(o.retry_delay_ms));
        continue;
      }
      fail("copy", o.source + " -> " + where + ": " + r.error().message);
    }
    data += r->data_bytes;
    zero += r->zero_bytes;
    holes += r->hole_bytes;
    connections.push_back({{"endpoint", h::to_string(target.endpoint)},
                           {"resumed_from", r->resumed_from},
                           {"end_offset", r->end_offset},
                           {"data_bytes", r->data_bytes},
                           {"outcome", r->outcome == h::DiskCopyOutcome::stopped ? "stopped" : "verified"},
                           {"direct", r->direct},
                           {"registered_buffers", r->registered},
                           {"seconds", r->seconds}});
    if (r->outcome == h::DiskCopyOutcome::stopped) {
      handed_off = true;
      handoff_at = r->end_offset;
      std::fprintf(stderr, "kvmig: disk copy: %s stopped at %llu; handing off to %s\n",
                   h::to_string(target.endpoint).c_str(), (unsigned long long)r->end_offset,
                   h::to_string(*handoff).c_str());
      target.endpoint = *handoff;
      continue;
    }
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    if (o.json) {
      nlohmann::json j{{"source", o.source},           {"image_size", image->size},
                       {"data_bytes", data},           {"zero_bytes", zero},
                       {"hole_bytes", holes},          {"xxh3", r->xxh3},
                       {"handoff_at", handoff_at},     {"handed_off", handed_off},
                       {"attempts", attempt},
                       {"seconds", secs},              {"connections", connections}};
      std::printf("%s\n", j.dump().c_str());
    }
    std::fprintf(stderr,
                 "kvmig: disk copy: %s -> %s:%s verified (xxh3 %016llx): %llu bytes, %llu sent as data, "
                 "%llu zero, %llu holes, %zu connection(s), %.2f s, %.0f MiB/s\n",
                 o.source.c_str(), h::to_string(target.endpoint).c_str(), target.path.c_str(),
                 (unsigned long long)r->xxh3, (unsigned long long)image->size, (unsigned long long)data,
                 (unsigned long long)zero, (unsigned long long)holes, connections.size(), secs,
                 image->size / secs / (1 << 20));
    return 0;
  }
}

struct ServeOptions {
  std::string listen, root;
  unsigned queue_depth = h::kDefaultQueueDepth;
  uint64_t ack_every = 64 << 20;
  bool no_direct = false, once = false;
};

int run_serve(const ServeOptions& o) {
  auto root = h::open_disk_root(o.root);
  if (!root.ok()) fail("serve", root.error().message);
  auto ep = h::parse_endpoint(o.listen);
  if (!ep.ok()) fail("serve", "--listen: " + ep.error().message);
  h::TransportOptions topt;
  auto listener = h::Listener::listen(*ep, topt);
  if (!listener.ok()) fail("serve", listener.error().message);
  std::fprintf(stderr, "kvmig: disk serve: listening on %s, root %s\n",
               h::to_string(listener->endpoint()).c_str(), o.root.c_str());
  h::DiskSinkOptions opt;
  opt.queue_depth = o.queue_depth;
  opt.direct = !o.no_direct;
  opt.ack_every = o.ack_every;
  for (;;) {
    auto conn = listener->accept();
    if (!conn.ok()) {
      std::fprintf(stderr, "kvmig: disk serve: accept: %s\n", conn.error().message.c_str());
      continue;
    }
    auto r = h::receive_disk(root->get(), *conn, opt);
    if (!r.ok()) {
      std::fprintf(stderr, "kvmig: disk serve: copy failed: %s\n", r.error().message.c_str());
      continue;
    }
    std::fprintf(stderr,
                 "kvmig: disk serve: %s %s at %llu of %llu (resumed from %llu, %llu written, %llu sparse, "
                 "%s, %.2f s)\n",
                 r->path.c_str(), r->verified ? "verified" : "stopped", (unsigned long long)r->end_offset,
                 (unsigned long long)r->image_size, (unsigned long long)r->resumed_from,
                 (unsigned long long)r->written, (unsigned long long)r->zero_bytes,
                 r->direct ? "O_DIRECT" : "buffered", r->seconds);
    if (o.once && r->verified) return 0;
  }
}

}  // namespace

void add_disk_command(CLI::App& app) {
  auto* disk = app.add_subcommand("disk", "Copy disk images that are not in use between hosts");
  disk->require_subcommand(1);

  auto copy = std::make_shared<CopyOptions>();
  auto* c = disk->add_subcommand("copy", "Copy an image to a `kvmig disk serve`; resumable, movable");
  c->add_option("SRC", copy->source, "Image file or block device (only read)")->required();
  c->add_option("TARGET", copy->target, "HOST:PORT:DST, DST relative to the server's --root")->required();
  c->add_option("--handoff", copy->handoff,
                "HOST2:PORT: on SIGUSR1 (or --handoff-after), stop the copy at the first server "
                "and let HOST2 copy the rest");
  c->add_option("--handoff-after", copy->handoff_after, "Hand off after this many data bytes")
      ->transform(CLI::AsSizeValue(false));
  c->add_option("--retries", copy->retries, "Reconnect and resume this many times")->check(CLI::Range(0, 1000));
  c->add_option("--retry-delay-ms", copy->retry_delay_ms, "Pause before reconnecting")->check(CLI::Range(0, 600000));
  c->add_option("--block-size", copy->block_size, "Zero-block granularity (power of two, 4K..16M)")
      ->transform(CLI::AsSizeValue(false));
  c->add_option("--chunk", copy->chunk, "Bytes per read and per message (4K..16M)")
      ->transform(CLI::AsSizeValue(false));
  c->add_option("--queue-depth", copy->queue_depth, "Reads in flight")->check(CLI::Range(1, 1024));
  c->add_option("--expect-size", copy->expect_size, "Fail unless the image has exactly this size")
      ->transform(CLI::AsSizeValue(false));
  c->add_flag("--no-direct", copy->no_direct, "Do not use O_DIRECT");
  c->add_flag("--overwrite", copy->overwrite, "Replace an existing complete destination file");
  c->add_flag("--json", copy->json, "Print a JSON report on stdout");
  c->add_option("--fault-drop-after", copy->fault_drop_after,
                "Testing: drop the first connection after this many data bytes")
      ->transform(CLI::AsSizeValue(false))
      ->group("");
  c->callback([copy] {
    if (int status = run_copy(*copy); status != 0) throw CLI::RuntimeError(status);
  });

  auto serve = std::make_shared<ServeOptions>();
  auto* s = disk->add_subcommand("serve", "Receive disk copies, writing only beneath --root");
  s->add_option("--listen", serve->listen, "ADDR:PORT (port 0: any) or unix:/path")->required();
  s->add_option("--root", serve->root, "Directory every destination path is resolved beneath")->required();
  s->add_option("--queue-depth", serve->queue_depth, "Writes in flight")->check(CLI::Range(1, 1024));
  s->add_option("--ack-every", serve->ack_every, "fdatasync and acknowledge every this many bytes")
      ->transform(CLI::AsSizeValue(false));
  s->add_flag("--no-direct", serve->no_direct, "Do not use O_DIRECT");
  s->add_flag("--once", serve->once, "Exit after the first verified copy");
  s->callback([serve] {
    if (int status = run_serve(*serve); status != 0) throw CLI::RuntimeError(status);
  });
}
