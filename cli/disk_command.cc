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
#include "helper/disk_chain_source.h"
#include "helper/disk_copy_sink.h"
#include "helper/disk_copy_source.h"
#include "helper/disk_layer_id.h"
#include "helper/transport.h"
#include "helper/uring_engine.h"
#include "host/disk_chain.h"

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
  uint64_t handoff_after = 0, fault_drop_after = 0, expect_size = 0, max_rate = 0;
  uint64_t block_size = 64 << 10, chunk = 1 << 20;
  unsigned queue_depth = h::kDefaultQueueDepth;
  int retries = 5, retry_delay_ms = 500;
  bool no_direct = false, overwrite = false, json = false;
};

// One `disk copy` run: the connections it made, where it now sends (a hand-off moves that),
// and its totals, across every image (layer) it copies.
struct CopyRun {
  const CopyOptions& o;
  Target target;
  std::optional<h::Endpoint> handoff;
  bool handed_off = false;
  int retries_left = 0, attempts = 0;
  uint64_t data = 0, zero = 0, holes = 0, handoff_at = 0;
  nlohmann::json connections = nlohmann::json::array();

  // Copies one image to `dest` (on the current target), reconnecting to resume after a
  // broken connection and following a hand-off. Fails the command on a final error.
  h::DiskCopyReport copy(h::DiskImage& image, const std::string& dest, const h::DiskSourceOptions& opt) {
    for (;;) {
      ++attempts;
      h::TransportOptions topt;
      topt.streams = 1;
      h::DiskSourceOptions run = opt;
      run.fault_drop_after = attempts == 1 ? o.fault_drop_after : 0;
      if (handoff && !handed_off) {
        run.stop_after = o.handoff_after;
        run.stop_request = &g_handoff_now;
      }
      auto conn = h::connect(target.endpoint, topt);
      kvmig::Result<h::DiskCopyReport> r =
          conn.ok() ? h::copy_disk(image, *conn, dest, run) : kvmig::Result<h::DiskCopyReport>(conn.error());
      if (!r.ok()) {
        std::string where = h::to_string(target.endpoint) + ":" + dest;
        if (h::disk_error_retriable(r.error()) && retries_left-- > 0) {
          std::fprintf(stderr, "kvmig: disk copy: connection %d to %s failed (%s); resuming\n", attempts,
                       where.c_str(), r.error().message.c_str());
          std::this_thread::sleep_for(std::chrono::milliseconds(o.retry_delay_ms));
          continue;
        }
        fail("copy", image.path + " -> " + where + ": " + r.error().message);
      }
      data += r->data_bytes;
      zero += r->zero_bytes;
      holes += r->hole_bytes;
      connections.push_back({{"endpoint", h::to_string(target.endpoint)},
                             {"path", dest},
                             {"resumed_from", r->resumed_from},
                             {"end_offset", r->end_offset},
                             {"data_bytes", r->data_bytes},
                             {"acks", r->acks},
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
      return *r;
    }
  }

  // A chain request (CHAIN or LINK) on a connection of its own, retried like a copy.
  template <class F>
  auto request(const char* what, F&& f) -> decltype(f(std::declval<h::Connection&>())) {
    for (;;) {
      h::TransportOptions topt;
      topt.streams = 1;
      auto conn = h::connect(target.endpoint, topt);
      auto r = conn.ok() ? f(*conn) : decltype(f(*conn))(conn.error());
      if (r.ok()) return r;
      if (h::disk_error_retriable(r.error()) && retries_left-- > 0) {
        std::this_thread::sleep_for(std::chrono::milliseconds(o.retry_delay_ms));
        continue;
      }
      fail("copy", std::string(what) + " at " + h::to_string(target.endpoint) + ": " + r.error().message);
    }
  }
};

h::DiskSourceOptions source_options(const CopyOptions& o) {
  if (o.block_size > UINT32_MAX || o.chunk > UINT32_MAX) fail("copy", "--block-size / --chunk too large");
  h::DiskSourceOptions opt;
  opt.block_size = static_cast<uint32_t>(o.block_size);
  opt.chunk = static_cast<uint32_t>(o.chunk);
  opt.queue_depth = o.queue_depth;
  opt.direct = !o.no_direct;
  opt.overwrite = o.overwrite;
  opt.expect_size = o.expect_size;
  opt.max_rate = o.max_rate;
  return opt;
}

std::string parent_dir(const std::string& p) {
  size_t slash = p.rfind('/');
  return slash == std::string::npos ? "" : p.substr(0, slash + 1);
}

std::string base_name(const std::string& p) { return p.substr(p.rfind('/') + 1); }

// A backing chain: content IDs, ask the destination what it holds, copy the rest next to
// DST (each layer under its own file name, the top as DST), then have it check and re-link.
int copy_chain(CopyRun& run, const std::vector<kvmig::host::ChainLayer>& layers,
               std::chrono::steady_clock::time_point started) {
  const CopyOptions& o = run.o;
  if (o.expect_size && layers.back().virtual_size != o.expect_size)
    fail("copy", o.source + " is a " + std::to_string(layers.back().virtual_size) + "-byte disk, declared " +
                     std::to_string(o.expect_size));
  h::DiskChain chain;
  nlohmann::json report = nlohmann::json::array();
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& l = layers[i];
    auto id = h::layer_content_id(l.path, l.format == h::LayerFormat::kvmig_delta);
    if (!id.ok()) fail("copy", id.error().message);
    std::string dest = i + 1 == layers.size() ? run.target.path : parent_dir(run.target.path) + base_name(l.path);
    for (const auto& earlier : chain.layers)
      if (earlier.path == dest) fail("copy", "two layers would both be copied to " + dest + " (same file name)");
    chain.layers.push_back({l.format, l.file_size, id->id.hi, id->id.lo, dest});
    report.push_back({{"path", l.path}, {"dest", dest}, {"format", h::layer_format_name(l.format)},
                      {"size", l.file_size}, {"content_id", id->id.hex()}, {"id_cached", id->from_cache}});
  }
  if (auto v = h::validate(chain); !v.ok()) fail("copy", v.error().message);
  auto statuses = run.request("CHAIN", [&](h::Connection& c) { return h::query_disk_chain(c, chain); });
  for (size_t i = 0; i < layers.size(); ++i)
    if ((*statuses)[i] == h::LayerStatus::differs && !o.overwrite)
      fail("copy", "layer " + chain.layers[i].path + " exists at the destination with another content ID " +
                       "(use --overwrite to replace it)");
  size_t copied = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    h::LayerStatus status = (*statuses)[i];
    report[i]["status"] = h::layer_status_name(status);
    report[i]["data_bytes"] = 0;
    if (status == h::LayerStatus::held) continue;
    h::DiskSourceOptions opt = source_options(o);
    opt.expect_size = 0;
    opt.keep_allocation = layers[i].format == h::LayerFormat::kvmig_delta;
    opt.any_size = layers[i].format == h::LayerFormat::qcow2;
    auto image = h::open_disk_image(layers[i].path, opt);
    if (!image.ok()) fail("copy", image.error().message);
    uint64_t sent_before = run.data;
    run.copy(*image, chain.layers[i].path, opt);
    report[i]["data_bytes"] = run.data - sent_before;  // on the connections that completed
    ++copied;
  }
  (void)run.request("LINK", [&](h::Connection& c) { return h::link_disk_chain(c, chain); });
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (o.json) {
    nlohmann::json j{{"source", o.source}, {"image_size", layers.back().virtual_size},
                     {"data_bytes", run.data}, {"zero_bytes", run.zero}, {"hole_bytes", run.holes},
                     {"layers", report}, {"handed_off", run.handed_off}, {"attempts", run.attempts},
                     {"seconds", secs}, {"connections", run.connections}};
    std::printf("%s\n", j.dump().c_str());
  }
  std::fprintf(stderr,
               "kvmig: disk copy: chain of %zu layers %s -> %s:%s re-linked: %zu held (skipped), %zu copied, "
               "%llu bytes sent as data, %.2f s\n",
               layers.size(), o.source.c_str(), h::to_string(run.target.endpoint).c_str(), run.target.path.c_str(),
               layers.size() - copied, copied, (unsigned long long)run.data, secs);
  return 0;
}

int run_copy(const CopyOptions& o) {
  auto started = std::chrono::steady_clock::now();
  auto primary = parse_target(o.target);
  if (!primary.ok()) fail("copy", primary.error().message);
  CopyRun run{o, *primary};
  run.retries_left = o.retries;
  if (!o.handoff.empty()) {
    auto ep = h::parse_endpoint(o.handoff);
    if (!ep.ok()) fail("copy", "--handoff: " + ep.error().message);
    run.handoff = *ep;
    struct sigaction sa {};
    sa.sa_handler = on_sigusr1;
    ::sigaction(SIGUSR1, &sa, nullptr);
  }
  h::DiskSourceOptions opt = source_options(o);
  auto layers = kvmig::host::read_disk_chain(o.source);
  if (!layers.ok()) fail("copy", layers.error().message);
  if (layers->size() > 1) return copy_chain(run, *layers, started);
  opt.any_size = layers->front().format == h::LayerFormat::qcow2;
  auto image = h::open_disk_image(o.source, opt);
  if (!image.ok()) fail("copy", image.error().message);
  h::DiskCopyReport r = run.copy(*image, run.target.path, opt);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (o.json) {
    nlohmann::json j{{"source", o.source},         {"image_size", image->size},
                     {"data_bytes", run.data},     {"zero_bytes", run.zero},
                     {"hole_bytes", run.holes},    {"xxh3", r.xxh3},
                     {"handoff_at", run.handoff_at}, {"handed_off", run.handed_off},
                     {"attempts", run.attempts},
                     {"seconds", secs},            {"connections", run.connections}};
    std::printf("%s\n", j.dump().c_str());
  }
  std::fprintf(stderr,
               "kvmig: disk copy: %s -> %s:%s verified (xxh3 %016llx): %llu bytes, %llu sent as data, "
               "%llu zero, %llu holes, %zu connection(s), %.2f s, %.0f MiB/s\n",
               o.source.c_str(), h::to_string(run.target.endpoint).c_str(), run.target.path.c_str(),
               (unsigned long long)r.xxh3, (unsigned long long)image->size, (unsigned long long)run.data,
               (unsigned long long)run.zero, (unsigned long long)run.holes, run.connections.size(), secs,
               image->size / secs / (1 << 20));
  return 0;
}

int run_snapshot(const std::string& image, const std::string& output) {
  auto top = kvmig::host::snapshot_disk(image, output);
  if (!top.ok()) fail("snapshot", top.error().message);
  std::printf("%s\n", top->c_str());
  return 0;
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
  std::string root_path = o.root;
  opt.relink = [root_path](const h::DiskChainLayer& child, const h::DiskChainLayer& parent) {
    return kvmig::host::relink_layer(root_path, child, parent);
  };
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
    if (r->request != h::DiskMsg::open) {
      std::fprintf(stderr, "kvmig: disk serve: chain of %s %s\n", r->path.c_str(),
                   r->request == h::DiskMsg::link ? "checked and re-linked" : "queried");
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
  auto* disk = app.add_subcommand("disk", "Copy disk images (and their backing chains) that are not in use between hosts");
  disk->require_subcommand(1);

  auto copy = std::make_shared<CopyOptions>();
  auto* c = disk->add_subcommand("copy", "Copy an image to a `kvmig disk serve`; resumable, movable");
  c->add_option("SRC", copy->source, "Image file or block device (only read); the top of a chain "
                                      "copies the chain")->required();
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
  c->add_option("--max-rate", copy->max_rate, "Send at most this many data bytes per second (e.g. 200M)")
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

  auto snap = std::make_shared<std::pair<std::string, std::string>>();
  auto* sn = disk->add_subcommand("snapshot", "Put a new empty delta on top of an image (its chain); "
                                              "the image becomes a read-only lower layer");
  sn->add_option("IMAGE", snap->first, "Top of a raw, kvmig-delta or qcow2 chain")->required();
  sn->add_option("--output", snap->second, "The new top (default: <stem>.deltaN<ext> next to IMAGE)");
  sn->callback([snap] {
    if (int status = run_snapshot(snap->first, snap->second); status != 0) throw CLI::RuntimeError(status);
  });

  auto serve = std::make_shared<ServeOptions>();
  auto* s = disk->add_subcommand("serve", "Receive disk copies, writing only beneath --root");
  s->add_option("--listen", serve->listen, "ADDR:PORT (port 0: any) or unix:/path")->required();
  s->add_option("--root", serve->root, "Directory every destination path is resolved beneath")->required();
  s->add_option("--queue-depth", serve->queue_depth, "Writes in flight")->check(CLI::Range(1, 1024));
  s->add_option("--ack-every", serve->ack_every, "fdatasync and acknowledge every this many bytes written")
      ->transform(CLI::AsSizeValue(false));
  s->add_flag("--no-direct", serve->no_direct, "Do not use O_DIRECT");
  s->add_flag("--once", serve->once, "Exit after the first verified copy");
  s->callback([serve] {
    if (int status = run_serve(*serve); status != 0) throw CLI::RuntimeError(status);
  });
}
