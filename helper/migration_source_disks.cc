// The source session's disk part (docs/disk-migration.md): declare the VM's disks after
// HELLO_ACK, one disk round after each memory round, the disks' say in the switch-over
// decision, and the final disk blocks while paused, before the vCPU state.
#include <fcntl.h>

#include <algorithm>
#include <cmath>

#include "helper/disk_chain_migration.h"
#include "helper/migration_source_session.h"
#include "kvm/block_device.h"

namespace kvmig::helper {
namespace {

// A disk round sends at most this much, so a long bulk copy lets memory rounds interleave
// (at ~1 GB/s, a memory round every ~70 ms).
constexpr uint64_t kDiskRoundBytes = 64ull << 20;

}  // namespace

Result<void> SourceSession::disks_setup() {
  std::vector<kvm::Machine::DiskInfo> infos = vm_.disks();
  if (infos.empty()) return ok();
  if (!(features_ & kFeatureDisks))
    return wire_error(WireCode::config_mismatch,
                      "the VM has " + std::to_string(infos.size()) +
                          " disk(s) and the destination takes none (give it `kvmig receive --disk PATH`)");
  std::vector<DiskSource> sources;
  std::vector<SourceChain> chains;  // a chained disk's lower layers (docs/disk-migration.md)
  for (const auto& d : infos) {
    // A second, O_DIRECT descriptor for the bulk reads: they then bypass (and do not evict)
    // the page cache the running guest works with. Buffered reads where it is refused.
    disk_direct_fds_.emplace_back(::open(d.path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT));
    sources.push_back({d.fd, disk_direct_fds_.back().get(), d.write_log, {}});
    KVMIG_ASSIGN(SourceChain chain, source_chain(d.path));
    if (!chain.lower.empty()) {
      KVMIG_ASSIGN(std::unique_ptr<ChainHoleFiller> f, ChainHoleFiller::open(d.fd, chain.lower_paths, d.size));
      std::shared_ptr<ChainHoleFiller> filler = std::move(f);
      sources.back().fill_holes = [filler](uint64_t off, uint8_t* buf, uint64_t len) { return filler->fill(off, buf, len); };
    }
    chains.push_back(std::move(chain));
  }
  DiskSenderOptions dopt;
  dopt.plan.pause_budget = opt_.max_disk_downtime;
  KVMIG_ASSIGN(disks_, DiskPrecopySender::create(std::move(sources), dopt));
  for (size_t i = 0; i < chains.size(); ++i)
    if (!chains[i].lower.empty()) disks_->set_lower(i, chains[i].lower);
  KVMIG_TRY(disks_->declare(*conn_.control, version_));
  // Lower layers the destination lacks go first, whole; it checks their IDs before the first
  // block of a disk. Held ones cost nothing.
  KVMIG_ASSIGN(LayerCopyStats layers, send_missing_layers(*conn_.control, version_, chains, disks_->ready()));
  report_.disk_layers_held = layers.held;
  report_.disk_layers_copied = layers.copied;
  report_.disk_layer_bytes = layers.wire_bytes;
  report_.disk_bytes += layers.wire_bytes;
  report_.disk_blocks += layers.blocks;
  report_.bytes += layers.wire_bytes;
  report_.disks = static_cast<uint32_t>(infos.size());
  disk_observed_at_ = Clock::now();
  return ok();
}

bool SourceSession::disks_converged() {
  if (!disks_) return true;
  auto now = Clock::now();
  double since = std::chrono::duration<double>(now - disk_observed_at_).count();
  disk_observed_at_ = now;
  uint64_t written = disks_->observe();
  disk_dirty_rate_ = since > 0 ? written / since : 0;
  DiskConvergence c = disks_->convergence(disk_dirty_rate_);
  report_.disk_expected_pause_ms = std::isfinite(c.expected_pause) ? c.expected_pause * 1000 : -1;
  return c.converged;
}

Result<void> SourceSession::disk_round() {
  if (!disks_) return ok();
  KVMIG_ASSIGN(DiskRoundStats st, disks_->send_round(*conn_.control, version_, kDiskRoundBytes));
  report_.disk_bytes += st.wire_bytes;
  report_.disk_blocks += st.blocks;
  report_.disk_rounds = disks_->rounds();
  report_.disk_hot_deferred = std::max(report_.disk_hot_deferred, st.deferred_blocks);
  report_.bytes += st.wire_bytes;
  progress_->transferred.store(report_.bytes);
  return ok();
}

Result<void> SourceSession::disk_final() {
  if (!disks_) return ok();
  auto begin = Clock::now();
  // The vCPUs are parked, so no new request starts; wait for the ones in flight, whose
  // completions mark the log, before the last harvest.
  for (size_t i = 0; i < vm_.disks().size(); ++i) KVMIG_TRY(vm_.disk(i).drain());
  KVMIG_ASSIGN(DiskRoundStats st, disks_->send_final(*conn_.control, version_));
  report_.disk_final_blocks = st.blocks;
  report_.disk_final_hot = st.deferred_blocks;
  report_.disk_bytes += st.wire_bytes;
  report_.disk_blocks += st.blocks;
  report_.disk_rounds = disks_->rounds();
  report_.bytes += st.wire_bytes;
  report_.disk_pause_ms = ms_between(begin, Clock::now());
  trace_.push_back({"final_disk", Clock::now()});
  return ok();
}

void SourceSession::disks_stop() {
  if (disks_) disks_->stop_tracking();
}

}  // namespace kvmig::helper
