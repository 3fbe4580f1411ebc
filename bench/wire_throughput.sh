#!/bin/sh
# Page-batch throughput of the migration wire over loopback TCP with 1..4 data streams.
# Compiles bench/wire_throughput.cc with the wire sources it uses (nothing else of kvmig, so
# it builds even while other layers are mid-change) and prints one line per stream count.
# Goal: >= 2.5 GB/s with no zero pages.
# Usage: bench/wire_throughput.sh [seconds-each] [extra wire_throughput options...]
#   e.g. bench/wire_throughput.sh 3 --compress --zero-percent 50
set -eu
SRC=$(cd "$(dirname "$0")/.." && pwd)
OUT=${BUILD:-$SRC/build-bench}
SECONDS_EACH=${1:-3}
[ $# -gt 0 ] && shift
mkdir -p "$OUT"
BIN=$OUT/wire_throughput
c++ -std=c++20 -O2 -I"$SRC" "$SRC/bench/wire_throughput.cc" \
  "$SRC"/helper/wire.cc "$SRC"/helper/messages.cc "$SRC"/helper/wire_pages.cc \
  "$SRC"/helper/compress.cc "$SRC"/helper/transport.cc "$SRC"/helper/transport_socket.cc \
  "$SRC"/helper/transport_pages.cc \
  $(pkg-config --libs libzstd libxxhash) -lpthread -o "$BIN"
for n in 1 2 3 4; do
  "$BIN" --streams "$n" --seconds "$SECONDS_EACH" "$@"
done
