#!/bin/sh
# Builds bench/dirty_log_check (and the test guest) in $BUILD and runs it: pre-copy rounds
# into an in-memory shadow of guest RAM, pause, compare. No network, compression or
# destination: a page lost here was lost by the dirty log (KVM), not by kvmig's sender.
# Usage: bench/dirty_log_check.sh [dirty_log_check options...]
#   e.g. bench/dirty_log_check.sh --iterations 200 --busy 4            (bitmap, as migrate)
#        bench/dirty_log_check.sh --iterations 200 --busy 4 --ring 65536
# Exit: 0 nothing lost, 1 pages lost (each one printed), 125 setup error.
set -eu
SRC=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD:-$SRC/build-bench}
[ -w /dev/kvm ] || { echo "dirty_log_check.sh: /dev/kvm is not available" >&2; exit 125; }
cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
ninja -C "$BUILD" -j"${JOBS:-2}" dirty_log_check >&2
exec "$BUILD/bench/dirty_log_check" "$@"
