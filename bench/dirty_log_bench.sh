#!/bin/sh
# Builds and runs the dirty-tracking micro-benchmark (bench/dirty_log_bench.cc) straight
# with g++, so it needs only the kvm/ dirty-tracking sources, not the whole tree.
set -eu
src=$(cd "$(dirname "$0")/.." && pwd)
out=${TMPDIR:-/tmp}/kvmig_dirty_log_bench
g++ -std=c++20 -O2 -I"$src" -I"$src/tests/integration" "$src/bench/dirty_log_bench.cc" \
  "$src/kvm/dirty_tracker.cc" "$src/kvm/dirty_bitmap_log.cc" "$src/kvm/dirty_ring_log.cc" \
  "$src/kvm/device_dirty.cc" -o "$out"
exec "$out"
