#!/usr/bin/env bash
# Live disk migration (docs/disk-migration.md): the test guest writes its 2 GiB disk at up to
# 50 MiB/s (disk=1 drate=50 in 64 KiB blocks, each pattern; the rate it really managed, over
# BEFORE_S seconds just before the move and during the move, is measured from its console
# lines) while `kvmig migrate` moves it, memory and disk,
# to a `kvmig receive --disk` on this host over loopback TCP. Reported per pattern: whether
# pre-copy converged and the migration completed, total time, downtime, the disk part of the
# pause (drain + last harvest + final blocks, from the report), disk bytes and rounds, hot
# blocks deferred to the switch-over, and whether the guest went on verifying its memory and
# its disk at the destination with no error.
#
# The comparison, in the same run: the pause a stop-and-copy disk move would cost, i.e.
# copying the same image while the VM is paused (measured with `kvmig disk copy`, the fastest
# copy tool here, docs/benchmarks.md) - what live disk migration saves.
#
# Usage: bench/disk_migration.sh [--patterns "seq random hotcold"]
# Env: BUILD (default ./build), DISK_MIB (2048), FILL_MIB (data written into the image before
#      the run, 1024), RATE (guest disk MiB/s, 50), DBLOCK_K (guest block KiB, 64), DQD (guest
#      requests in flight, 32: with the bulk copy on the same host disk each request waits
#      longer, and the guest's rate is about DQD * block / latency), MEMORY
#      (256M), TIMEOUT (s, 120), BEFORE_S (s the rate before the move is measured over, 5),
#      OUT (results dir, default $BUILD/bench-results).
# Exit: 0 when every row ran, 1 when some row could not run, 2 bad usage.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD:-$SRC/build}
DISK_MIB=${DISK_MIB:-2048}
FILL_MIB=${FILL_MIB:-1024}
RATE=${RATE:-50}
DBLOCK_K=${DBLOCK_K:-64}
DQD=${DQD:-32}
BEFORE_S=${BEFORE_S:-5}
MEMORY=${MEMORY:-256M}
TIMEOUT=${TIMEOUT:-120}
OUT=${OUT:-$BUILD/bench-results}
KVMIG=$BUILD/cli/kvmig
GUEST=$BUILD/tests/guests/kvmig-guest.elf
patterns="seq random hotcold"

die() { echo "disk_migration: $*" >&2; exit 2; }
# shellcheck source=bench/lib.sh
. "$SRC/bench/lib.sh"
while [ $# -gt 0 ]; do
  case $1 in
    --patterns) [ $# -ge 2 ] || die "--patterns needs a value"; patterns=$2; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
for v in DISK_MIB FILL_MIB RATE TIMEOUT DBLOCK_K DQD BEFORE_S; do
  case ${!v} in ''|*[!0-9]*) die "$v must be a whole number, not '${!v}'" ;; esac
done
[ "$FILL_MIB" -le "$DISK_MIB" ] || die "FILL_MIB ($FILL_MIB) exceeds DISK_MIB ($DISK_MIB)"
for p in $patterns; do case $p in seq|random|hotcold) ;; *) die "unknown pattern '$p'" ;; esac; done
command -v jq >/dev/null || die "jq is needed to read the JSON reports (apt-get install jq)"
[ -x "$KVMIG" ] || die "no kvmig at $KVMIG; build it first (scripts/build)"
[ -f "$GUEST" ] || die "no test guest at $GUEST"

results=$(new_results disk-migration) || exit 2
not_run=()

last_n() {  # file regex: the n= of the last matching console line (0 if none)
  { grep -a "$2" "$1" 2>/dev/null || true; } | tail -n1 | sed -n 's/.* n=\([0-9]*\).*/\1/p' | grep . || echo 0
}
last_writes() { { grep -a 'kvmig-guest: disk pass n=' "$1" 2>/dev/null || true; } | tail -n1 | sed -n 's/.* writes=\([0-9]*\).*/\1/p' | grep . || echo 0; }
disk_passes_at_least() { [ "$(last_n "$1" 'kvmig-guest: disk pass n=')" -ge "$2" ]; }

row() {  # pattern
  local pattern=$1 dir why="" rpid spid port report
  dir=$(mktemp -d /var/tmp/kvmig-diskmig-XXXXXX)
  echo "kvmig  $pattern: preparing a ${DISK_MIB} MiB image with ${FILL_MIB} MiB of data ..." >&2
  truncate -s "${DISK_MIB}M" "$dir/src.raw"
  # fsync: an image in use is not 1 GiB of dirty page cache, which the guest's O_DIRECT writes
  # and the bulk copy's O_DIRECT reads would first have to write back.
  dd if=/dev/urandom of="$dir/src.raw" bs=1M count="$FILL_MIB" conv=notrunc,fsync status=none
  # A small memory working set written at a modest rate: the disk is what this measures.
  # dpass=64: a disk pass line every ~80 ms at 50 MiB/s, so the rates read from those lines are
  # off by at most one pass (the one cut by the pause) - a few % of a 2 s move.
  local cmdline="ws=1M rate=64 disk=1 dpass=64 dverify=4 dpattern=$pattern drate=$RATE dblock=${DBLOCK_K}K dqd=$DQD"
  "$KVMIG" receive --listen 127.0.0.1:0 --disk "$dir/dst.raw" --console "$dir/dst.console" \
    --control "$dir/dst.sock" >"$dir/receive.out" 2>"$dir/receive.log" & rpid=$!
  "$KVMIG" vm run --kernel "$GUEST" --memory "$MEMORY" --vcpus 1 --disk "$dir/src.raw" \
    --cmdline "$cmdline" --console "$dir/src.console" --control "$dir/src.sock" \
    >"$dir/run.out" 2>"$dir/run.log" & spid=$!
  if ! wait_until 120 grep -qs 'listening on' "$dir/receive.log"; then why="receive did not listen: $(tail -c 300 "$dir/receive.log")"
  elif ! wait_until 180 disk_passes_at_least "$dir/src.console" 3; then why="source guest did no disk passes: $(tail -c 300 "$dir/run.log")"
  fi
  if [ -z "$why" ]; then
    port=$(sed -n 's/.*listening on [^ ]*:\([0-9]*\).*/\1/p' "$dir/receive.log" | head -n1)
    # The guest's own rate just before the move, the baseline for the rate during it.
    local wa ta w0 t0
    wa=$(last_writes "$dir/src.console"); ta=$(date +%s%N)
    sleep "$BEFORE_S"
    w0=$(last_writes "$dir/src.console"); t0=$(date +%s%N)
    local before_mibps; before_mibps=$(( (w0 - wa) * DBLOCK_K * 1000000000 / 1024 * 10 / (t0 - ta) ))
    report=$("$KVMIG" migrate "$dir/src.sock" --to "127.0.0.1:$port" --json --no-progress \
               --timeout "$TIMEOUT" 2>"$dir/migrate.log" || true)
    if [ -z "$report" ] || ! jq -e 'type == "object"' >/dev/null 2>&1 <<<"$report"; then
      why="migrate gave no JSON report: $(tr '\n' ' ' <"$dir/migrate.log" | tail -c 300)"
    else
      local verdict=completed at w1
      # What the guest really wrote during the migration (its disk pass lines count block
      # writes; the source console ends at the pause).
      w1=$(last_writes "$dir/src.console")
      at=$(last_n "$dir/src.console" 'kvmig-guest: disk pass n=')
      if [ "$(jq -r .result <<<"$report")" = completed ]; then
        wait_until 60 disk_passes_at_least "$dir/dst.console" $((at + 3)) || verdict="failed: destination stopped its disk passes"
        # The guest verifies every block it reads against its shadow table (version + checksum):
        # a block lost or stale in the move shows up here as "disk corrupt".
        grep -aq 'kvmig-guest: \(corrupt\|disk corrupt\|error\|fault\)' "$dir/dst.console" && verdict="failed: guest reported corruption"
      else
        verdict=$(jq -r .result <<<"$report")
      fi
      # The comparison: a stop-and-copy move of the same image would pause the VM this long.
      local copy_ms
      "$KVMIG" disk serve --listen 127.0.0.1:0 --root "$dir" >"$dir/serve.out" 2>"$dir/serve.log" & local serve=$!
      wait_until 30 grep -qs 'listening on' "$dir/serve.log" || true
      local sport; sport=$(sed -n 's/.*listening on [^ ]*:\([0-9]*\).*/\1/p' "$dir/serve.log" | head -n1)
      local t0; t0=$(date +%s%N)
      if [ -n "$sport" ] && "$KVMIG" disk copy "$dir/src.raw" "127.0.0.1:$sport:copy.raw" >"$dir/copy.out" 2>&1; then
        copy_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
      else
        copy_ms=null
      fi
      kill "$serve" 2>/dev/null || true; wait "$serve" 2>/dev/null || true
      # The destination's share of the disk pause: its last drain + fdatasync before READY.
      local sync_ms; sync_ms=$(sed -n 's/.*final sync \([0-9.]*\) ms.*/\1/p' "$dir/receive.log" | head -n1)
      jq -c --arg p "$pattern" --arg v "$verdict" --argjson copy "$copy_ms" --argjson sync "${sync_ms:-null}" \
        --argjson w "$((w1 - w0))" --argjson bk "$DBLOCK_K" --argjson before "$before_mibps" \
        --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" \
        '. + {pattern: $p, stop_and_copy_ms: $copy, dst_disk_sync_ms: $sync, load: $load,
              guest_disk_mibps_before: ($before / 10),
              guest_disk_mibps: ($w * $bk / 1024 / (.total_ms / 1000))} + (if $v == "completed" then {} else {result: $v} end)' \
        <<<"$report" >>"$results"
    fi
  fi
  kill "$spid" "$rpid" 2>/dev/null || true
  wait "$spid" "$rpid" 2>/dev/null || true
  [ -n "$why" ] && not_run+=("$pattern: $why")
  rm -rf "$dir"
}

for p in $patterns; do row "$p"; done

echo
echo "| pattern | guest disk MiB/s before / during the move | max vCPU throttle | result | total ms | downtime ms | disk pause ms (src send + dst sync) | disk MiB sent | disk rounds | hot blocks deferred | final disk blocks | stop-and-copy pause ms | load avg |"
echo "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
jq -r '[.pattern, ((.guest_disk_mibps_before*10|round/10|tostring) + " / " + (.guest_disk_mibps*10|round/10|tostring)),
        ((.max_throttle // 0)*100|round|tostring) + " %", .result, (.total_ms|floor), (.downtime_ms*100|round/100),
        ((((.disk.pause_ms // 0) + (.dst_disk_sync_ms // 0))*100|round/100|tostring) + " (" +
         ((.disk.pause_ms // 0)*100|round/100|tostring) + " + " + ((.dst_disk_sync_ms // 0)*100|round/100|tostring) + ")"),
        ((.disk.bytes // 0)/1048576|floor), (.disk.rounds // 0),
        (.disk.final_hot_blocks // 0), (.disk.final_blocks // 0), (.stop_and_copy_ms // "-"), .load]
       | "| " + (map(tostring) | join(" | ")) + " |"' "$results"
end_report "$results" "COULD NOT RUN" "${not_run[@]}"
