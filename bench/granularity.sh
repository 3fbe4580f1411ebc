#!/usr/bin/env bash
# Trace granularity (kvmig migrate --trace-granularity 4K..2M): its effect on the guest's
# slowdown during pre-copy and on the bytes a migration sends, measured with the test guest
# (docs/guest.md) in the same run for every granularity, over loopback TCP on this host.
#
# Workloads (guest command lines):
#   full   "ws=$WS pattern=random report_ms=20"            random page writes at full speed
#   paced  "ws=$WS pattern=random rate=$RATE report_ms=20"  the same at a fixed $RATE MiB/s
# Slowdown is the guest's own progress: its cumulative write counter per TSC tick (the
# "pass" lines it prints), over the migration (from the last line before `kvmig migrate`
# starts to the source's last line) against the same guest's rate over the lines before.
# 1.00 = no slowdown, 0.50 = the guest did half its writes per unit of time.
#
# Usage: bench/granularity.sh [--granularities "4K 64K 2M"] [--workloads "full paced"]
# Env: BUILD (default ./build), MEMORY (512M), WS (64M), RATE (MiB/s for paced, 64),
#      MAX_DOWNTIME (ms, 5), OUT (results directory, default $BUILD/bench-results).
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD:-$SRC/build}
MEMORY=${MEMORY:-512M}
WS=${WS:-64M}
RATE=${RATE:-64}
MAX_DOWNTIME=${MAX_DOWNTIME:-5}
OUT=${OUT:-$BUILD/bench-results}
KVMIG=$BUILD/cli/kvmig
GUEST=$BUILD/tests/guests/kvmig-guest.elf
granularities="4K 64K 2M" workloads="full paced"

die() { echo "granularity: $*" >&2; exit 2; }
# shellcheck source=bench/lib.sh
. "$SRC/bench/lib.sh"
while [ $# -gt 0 ]; do
  case $1 in
    --granularities) [ $# -ge 2 ] || die "--granularities needs a value"; granularities=$2; shift ;;
    --workloads) [ $# -ge 2 ] || die "--workloads needs a value"; workloads=$2; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
command -v jq >/dev/null || die "jq is needed to read the JSON reports (apt-get install jq)"
[ -x "$KVMIG" ] || die "no kvmig at $KVMIG; build it: cmake --build $BUILD --target kvmig"
[ -f "$GUEST" ] || die "no test guest at $GUEST; build it: cmake --build $BUILD --target kvmig_guest"
case $RATE in ''|*[!0-9]*) die "RATE must be whole MiB/s, not '$RATE'" ;; esac

cmdline_of() {
  case $1 in
    full) echo "ws=$WS pattern=random report_ms=20" ;;
    paced) echo "ws=$WS pattern=random rate=$RATE report_ms=20" ;;
    *) die "unknown workload '$1' (full, paced)" ;;
  esac
}
for w in $workloads; do cmdline_of "$w" >/dev/null; done

results=$(new_results granularity) || exit 2
failed=()

pass_lines() { grep -a 'kvmig-guest: pass vcpu=0 ' "$1" 2>/dev/null || true; }
passes_at_least() { [ "$(pass_lines "$1" | tail -n1 | sed -n 's/.* n=\([0-9]*\) .*/\1/p' | grep . || echo 0)" -ge "$2" ]; }

# Writes per TSC tick from pass lines (writes=W ... tsc=T): over lines [from, to] (1-based).
rate_between() {  # file from to
  pass_lines "$1" | sed -n "$2p;$3p" | sed -n 's/.* writes=\([0-9]*\) .* tsc=\([0-9]*\).*/\1 \2/p' |
    awk 'NR == 1 { w = $1; t = $2 } NR == 2 { if ($2 > t) printf "%.6g\n", ($1 - w) / ($2 - t); else print 0 }'
}

row() {  # workload granularity
  local workload=$1 gran=$2
  echo "kvmig $workload --trace-granularity $gran ..." >&2
  local dir; dir=$(mktemp -d /tmp/kvmig-granularity-XXXXXX)
  local rpid spid port report why=""
  "$KVMIG" receive --listen 127.0.0.1:0 --console "$dir/dst.console" --control "$dir/dst.sock" \
    >"$dir/receive.out" 2>"$dir/receive.log" & rpid=$!
  "$KVMIG" vm run --kernel "$GUEST" --memory "$MEMORY" --vcpus 1 --cmdline "$(cmdline_of "$workload")" \
    --console "$dir/src.console" --control "$dir/src.sock" >"$dir/run.out" 2>"$dir/run.log" & spid=$!
  if ! wait_until 120 grep -q 'listening on' "$dir/receive.log"; then why="kvmig receive did not listen"
  elif ! wait_until 180 passes_at_least "$dir/src.console" 3; then why="source guest did not reach pass 3"
  fi
  if [ -z "$why" ]; then
    sleep 1  # a second of undisturbed progress for the baseline
    port=$(sed -n 's/.*listening on [^ ]*:\([0-9]*\).*/\1/p' "$dir/receive.log" | head -n1)
    local mark; mark=$(pass_lines "$dir/src.console" | wc -l)
    report=$("$KVMIG" migrate "$dir/src.sock" --to "127.0.0.1:$port" --json --no-progress \
               --trace-granularity "$gran" --max-downtime "$MAX_DOWNTIME" 2>"$dir/migrate.log" || true)
    wait "$spid" 2>/dev/null || true  # the source ends once the destination runs the VM
    local last; last=$(pass_lines "$dir/src.console" | wc -l)
    local base_from=$((mark > 10 ? mark - 10 : 1))
    local before during
    before=$(rate_between "$dir/src.console" "$base_from" "$mark")
    during=$(rate_between "$dir/src.console" "$mark" "$last")
    if [ -z "$report" ] || ! jq -e 'type == "object"' >/dev/null 2>&1 <<<"$report"; then
      why="kvmig migrate gave no JSON report: $(tr '\n' ' ' <"$dir/migrate.log" | tail -c 300)"
    elif grep -aq 'kvmig-guest: \(corrupt\|error\|fault\)' "$dir/src.console" "$dir/dst.console"; then
      why="the guest reported corruption"
    else
      jq -c --arg w "$workload" --arg g "$gran" --arg b "${before:-0}" --arg d "${during:-0}" \
        --argjson lines $((last - mark)) \
        '{workload: $w, granularity: $g, result, total_ms, downtime_ms, bytes, iterations, pages,
          zero_pages, max_throttle, rate_before: ($b|tonumber), rate_during: ($d|tonumber),
          lines_during: $lines}' <<<"$report" >>"$results"
    fi
  fi
  kill "$spid" "$rpid" 2>/dev/null || true
  wait "$spid" "$rpid" 2>/dev/null || true
  [ -n "$why" ] && failed+=("$workload $gran: $why (kept $dir)") || rm -rf "$dir"
}

for w in $workloads; do
  for g in $granularities; do row "$w" "$g"; done
done

echo
echo "| workload | granularity | result | total ms | downtime ms | MiB sent | iterations | pages sent | max throttle | guest progress during pre-copy |"
echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
jq -r '[.workload, .granularity, .result, (.total_ms|floor), (.downtime_ms*10|round/10),
        (.bytes/1048576*10|round/10), .iterations, .pages, (.max_throttle*100|round|tostring + " %"),
        (if .rate_before > 0 and .lines_during > 0 then (.rate_during / .rate_before * 100 | round | tostring) + " %"
         else "-" end)] | "| " + (map(tostring) | join(" | ")) + " |"' "$results"
end_report "$results" FAILED "${failed[@]}"
