// The source side of a live migration (docs/protocol.md, DESIGN.md "The migration session"):
// connect, HELLO, write-traced pre-copy rounds while the VM runs, then pause, last pages,
// vCPU/device state, READY, COMMIT, DONE.
//
// The invariant it keeps: before COMMIT is sent, any failure stops the traces, resumes the
// VM if this session paused it, and reports "failed": the VM runs on here. After COMMIT the
// VM never resumes on its own: without DONE the result is "in-doubt" and it stays paused
// until the status checker decides from the destination's records.
#pragma once

#include <cstdint>
#include <string>

#include <array>

#include "helper/compress.h"
#include "helper/migration_report.h"
#include "helper/session_events.h"
#include "helper/transport.h"
#include "kvm/machine.h"

namespace kvmig::helper {

struct SourceOptions {
  Endpoint to;
  int streams = 1;
  CompressMode compress = CompressMode::automatic;  // zstd on page batches (helper/compress.h)
  bool verify = false;                  // XXH3 of all guest RAM compared before COMMIT
  bool ring = false;                    // dirty ring instead of the bitmap
  uint64_t granularity = 4096;          // trace granularity, 4 KiB .. 2 MiB
  double max_downtime = 0.005;          // seconds
  double max_disk_downtime = 0.020;     // seconds of the pause the disks may take (docs/disk-migration.md)
  double timeout = 60;                  // seconds of pre-copy before giving up; 0 = none
  uint8_t hot_rounds = 3;               // rounds in a row dirty before a page counts as hot
  std::string migration_id;             // empty: a random one
  std::array<uint8_t, 16> vm_uuid{};    // the VM's UUID (all zero: a random one)
  std::string vm_name;                  // in HELLO (wire version 2): the placeholder's name
  SourceEvents* events = nullptr;       // told on_released once DONE arrived; may be null
};

// Migrates `machine` (running, or paused by the caller) away. Never throws; the report's
// result says how it ended. `progress` (may be null) is updated as it goes.
MigrationReport migrate_machine(kvm::Machine& machine, const SourceOptions& options,
                                MigrationProgress* progress);

}  // namespace kvmig::helper
