#!/bin/sh
# A/B of two kvmig binaries on `kvmig disk copy`, for a change to the disk-copy path: ROUNDS
# rounds of (fio read + write at once, binary A, binary B), alternating, so that both see the
# same load; on a shared machine only the ratios within one round mean anything. The image is
# bench/disk_copy_bench.sh's (64 MiB of random data, 64 MiB of hole, alternating), the copy goes
# over loopback into the same file system, starts with the source evicted from the page cache
# and ends verified and durable. Prints one markdown row per round: seconds and data MiB/s of
# each, CPU seconds (user+sys) of source and destination, and fio's slower job (a copy's limit).
# Usage: bench/disk_copy_ab.sh OLD_KVMIG NEW_KVMIG [WORKDIR]   env: SIZE_MIB=2048 ROUNDS=5
# WORKDIR must not be tmpfs (O_DIRECT, holes); default: build-bench/disk-ab next to this script.
set -eu
SRC=$(cd "$(dirname "$0")/.." && pwd)
A=$1 B=$2
DIR=${3:-$SRC/build-bench/disk-ab}
SIZE_MIB=${SIZE_MIB:-2048}
ROUNDS=${ROUNDS:-5}
DATA_MIB=$((SIZE_MIB / 2))
mkdir -p "$DIR/root"
IMG=$DIR/image.raw
. "$SRC/bench/disk_image.sh"
make_half_hole_image "$IMG" "$SIZE_MIB"
fio --name=prep --filename="$DIR/fio.dat" --rw=write --bs=1M --size="${DATA_MIB}M" --direct=1 \
    --ioengine=io_uring --iodepth=32 >/dev/null 2>&1
sync
DATA=$(du -B1 "$IMG" | cut -f1)

fio_limit() {  # the slower of a read and a write job run together, MiB/s
  fio --output-format=json --output="$DIR/fio-rw.json" \
      --name=r --filename="$DIR/fio.dat" --rw=read --bs=1M --size="${DATA_MIB}M" --direct=1 \
      --ioengine=io_uring --iodepth=32 \
      --name=w --filename="$DIR/fio2.dat" --rw=write --bs=1M --size="${DATA_MIB}M" --direct=1 \
      --ioengine=io_uring --iodepth=32 >/dev/null 2>&1
  jq -r '[.jobs[0].read.bw_bytes, .jobs[1].write.bw_bytes] | min / 1048576 | floor' "$DIR/fio-rw.json"
  rm -f "$DIR/fio2.dat" "$DIR/fio-rw.json"
}

copy() {  # kvmig -> "seconds MiB/s src_cpu dst_cpu"
  rm -f "$DIR/root/out.img" "$DIR/root/out.img.kvmig-partial" "$DIR/serve.log"
  "$1" disk serve --listen 127.0.0.1:0 --root "$DIR/root" 2>"$DIR/serve.log" &
  serve=$!
  port=
  for _ in $(seq 1 50); do
    port=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$DIR/serve.log" 2>/dev/null || true)
    [ -n "$port" ] && break
    sleep 0.1
  done
  dd if="$IMG" iflag=nocache count=0 status=none 2>/dev/null || true
  t0=$(date +%s.%N)
  /usr/bin/time -f "%U %S" -o "$DIR/time.log" "$1" disk copy "$IMG" "127.0.0.1:$port:out.img" 2>/dev/null
  t1=$(date +%s.%N)
  # The server's own CPU time, read before it is stopped (utime + stime, in clock ticks).
  dst=$(awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$serve/stat")
  kill "$serve"
  wait "$serve" 2>/dev/null || true
  cmp -s "$IMG" "$DIR/root/out.img" || echo "MISMATCH: $1 made a copy that differs" >&2
  awk -v t0="$t0" -v t1="$t1" -v b="$DATA" -v src="$(awk '{ print $1 + $2 }' "$DIR/time.log")" \
      -v dst="$dst" 'BEGIN { printf "%.2f %.0f %.2f %.2f", t1 - t0, b / (t1 - t0) / 1048576, src, dst }'
}

echo "image: ${SIZE_MIB} MiB, $((DATA / 1048576)) MiB data; A = $A, B = $B"
echo
echo '| round | load | fio r+w limit MiB/s | A s | A MiB/s | A cpu src/dst | B s | B MiB/s | B cpu src/dst | A/B time |'
echo '|---|---|---|---|---|---|---|---|---|---|'
for r in $(seq 1 "$ROUNDS"); do
  limit=$(fio_limit)
  load=$(cut -d' ' -f1 /proc/loadavg)
  set -- $(copy "$A")
  a_s=$1 a_r=$2 a_cpu="$3/$4"
  set -- $(copy "$B")
  echo "| $r | $load | $limit | $a_s | $a_r | $a_cpu | $1 | $2 | $3/$4 | $(awk -v a="$a_s" -v b="$1" 'BEGIN { printf "%.2f", a / b }') |"
done
rm -f "$IMG" "$DIR/fio.dat" "$DIR/root/out.img" "$DIR/serve.log" "$DIR/time.log"
