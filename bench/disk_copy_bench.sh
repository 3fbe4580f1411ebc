#!/bin/sh
# Disk copy, side by side: a 4 GiB raw image, half data (random) and half holes, copied by
# `kvmig disk copy` over loopback, `dd bs=1M oflag=direct`, `cp` and `qemu-img convert`, next
# to fio sequential read and write (io_uring, O_DIRECT, 1 MiB, depth 32), alone and both at once, on the same file
# system as the device limit. Every copy ends durable (kvmig fdatasyncs; the others are
# followed by `sync`) and starts with the source evicted from the page cache
# (dd iflag=nocache count=0), so no tool reads from memory what another read from disk.
# Usage: bench/disk_copy_bench.sh [WORKDIR]   env: KVMIG=path/to/kvmig SIZE_MIB=4096
# Needs ~12 GiB free in WORKDIR (default: build-bench/disk next to this script).
set -eu
SRC=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-$SRC/build-bench/disk}
KVMIG=${KVMIG:-$SRC/build/cli/kvmig}
SIZE_MIB=${SIZE_MIB:-4096}
DATA_MIB=$((SIZE_MIB / 2))
mkdir -p "$DIR/root"
IMG=$DIR/image.raw
rm -f "$IMG" "$DIR"/out.* "$DIR/root/kvmig.img" "$DIR/root/kvmig.img.kvmig-partial" "$DIR/fio.dat"

now() { date +%s.%N; }
evict() { dd if="$1" iflag=nocache count=0 status=none 2>/dev/null || true; }
rate() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.0f", b / s / 1048576 }'; }

# The image: 64 MiB of random data, then 64 MiB of hole, alternating.
. "$SRC/bench/disk_image.sh"
make_half_hole_image "$IMG" "$SIZE_MIB"
sync
BYTES=$((SIZE_MIB * 1048576))
DATA=$(du -B1 "$IMG" | cut -f1)

# fio: the device limit, on the same file system.
fio_bw() {  # rw -> MiB/s
  fio --name=limit --filename="$DIR/fio.dat" --rw="$1" --bs=1M --size="${DATA_MIB}M" --direct=1 \
      --ioengine=io_uring --iodepth=32 --output-format=json 2>/dev/null |
    jq -r ".jobs[0].$2.bw_bytes / 1048576 | floor"
}
FIO_W=$(fio_bw write write)
FIO_R=$(fio_bw read read)
# A copy reads and writes the same device at once: one read job and one write job together
# give the limit a copy on this file system can reach (each runs the same size; the slower
# one's rate counts, since a copy moves each byte once in each direction).
fio --output-format=json --output="$DIR/fio-rw.json" \
    --name=r --filename="$DIR/fio.dat" --rw=read --bs=1M --size="${DATA_MIB}M" --direct=1 \
    --ioengine=io_uring --iodepth=32 \
    --name=w --filename="$DIR/fio2.dat" --rw=write --bs=1M --size="${DATA_MIB}M" --direct=1 \
    --ioengine=io_uring --iodepth=32 >/dev/null 2>&1
FIO_RW=$(jq -r '[.jobs[0].read.bw_bytes, .jobs[1].write.bw_bytes] | min / 1048576 | floor' "$DIR/fio-rw.json")
rm -f "$DIR/fio.dat" "$DIR/fio2.dat" "$DIR/fio-rw.json"

row() {  # name seconds note
  printf '| %-28s | %7.2f | %9s | %10s | %s |\n' "$1" "$2" "$(rate "$BYTES" "$2")" "$(rate "$DATA" "$2")" "$3"
}

echo "image: ${SIZE_MIB} MiB, $((DATA / 1048576)) MiB data, rest holes; fio write ${FIO_W} MiB/s, read ${FIO_R} MiB/s, both at once ${FIO_RW} MiB/s"
echo "load before the copies: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs"
echo
echo '| tool                         |       s | image MiB/s | data MiB/s | notes |'
echo '|------------------------------|---------|-----------|------------|-------|'

# kvmig over loopback.
rm -f "$DIR/serve.log"
"$KVMIG" disk serve --listen 127.0.0.1:0 --root "$DIR/root" 2>"$DIR/serve.log" &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true' EXIT
for _ in 1 2 3 4 5 6 7 8 9 10; do
  # The server's shell may not have created its log yet: not an error (set -e), try again.
  PORT=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$DIR/serve.log" 2>/dev/null || true)
  [ -n "$PORT" ] && break
  sleep 0.2
done
evict "$IMG"
T0=$(now)
"$KVMIG" disk copy "$IMG" "127.0.0.1:$PORT:kvmig.img" --json >"$DIR/kvmig.json"
T1=$(now)
row "kvmig disk copy (loopback)" "$(echo "$T1 - $T0" | bc)" "verified digest, $(du -B1M "$DIR/root/kvmig.img" | cut -f1) MiB allocated"

evict "$IMG"
T0=$(now)
dd if="$IMG" of="$DIR/out.dd" bs=1M oflag=direct status=none
sync
T1=$(now)
row "dd bs=1M oflag=direct" "$(echo "$T1 - $T0" | bc)" "$(du -B1M "$DIR/out.dd" | cut -f1) MiB allocated"

evict "$IMG"
T0=$(now)
cp "$IMG" "$DIR/out.cp"
sync
T1=$(now)
row "cp (+ sync)" "$(echo "$T1 - $T0" | bc)" "$(du -B1M "$DIR/out.cp" | cut -f1) MiB allocated"

evict "$IMG"
T0=$(now)
qemu-img convert -f raw -O raw "$IMG" "$DIR/out.qemu"
sync
T1=$(now)
row "qemu-img convert (+ sync)" "$(echo "$T1 - $T0" | bc)" "$(du -B1M "$DIR/out.qemu" | cut -f1) MiB allocated"

for f in out.dd out.cp out.qemu root/kvmig.img; do
  cmp -s "$IMG" "$DIR/$f" || echo "MISMATCH: $f differs from the image"
done
printf '| %-28s | %7s | %9s | %10s | %s |\n' "fio write (limit)" "" "" "$FIO_W" "io_uring, O_DIRECT, 1 MiB, depth 32"
printf '| %-28s | %7s | %9s | %10s | %s |\n' "fio read (limit)" "" "" "$FIO_R" "io_uring, O_DIRECT, 1 MiB, depth 32"
printf '| %-28s | %7s | %9s | %10s | %s |\n' "fio read + write at once" "" "" "$FIO_RW" "the slower of the two jobs run together: a copy's limit"
rm -f "$IMG" "$DIR"/out.* "$DIR/root/kvmig.img"
