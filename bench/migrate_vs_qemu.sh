#!/usr/bin/env bash
# kvmig vs QEMU live migration, side by side, on this host over loopback TCP, with the test
# guest (docs/guest.md) in three scenarios:
#   idle    near idle                       "idle=1"             (64 MiB touched once)
#   hot256  256 MiB rewritten at full speed "ws=256M pattern=seq"
#   hot1g   1 GiB rewritten at full speed   "ws=1G pattern=seq"
# each with the tool's default settings and with a 10 ms downtime limit. QEMU rows come from
# bench/qemu_migration (QMP), kvmig rows from `kvmig vm run` + `kvmig receive` +
# `kvmig migrate --json`. Both report the same fields (total_ms, downtime_ms, setup_ms,
# bytes, iterations, zero_pages, pages, dirty_rate, bandwidth_mbps, result); a row counts
# as completed only if the guest then kept passing on the destination with no corrupt page.
#
# Usage: bench/migrate_vs_qemu.sh [--qemu-only] [--kvmig-only] [--scenarios "idle hot256 hot1g"]
# Env: BUILD (build dir, default ./build), ACCEL (kvm|tcg, QEMU only), MEMORY (1280M),
#      TIMEOUT (s per migration, 60), QEMU_MAX_BANDWIDTH (bytes/s, default QEMU's 128 MiB/s),
#      OUT (results directory, default $BUILD/bench-results), KVMIG_ARGS (more `kvmig migrate`
#      options for every kvmig row, e.g. "--compress auto"; named in the config column).
# Exit: 0 when every requested row ran, 1 when some row could not run (e.g. kvmig's migrate
# is missing), 2 bad usage. A migration that ran and failed is a result, not an exit error.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD:-$SRC/build}
ACCEL=${ACCEL:-kvm}
MEMORY=${MEMORY:-1280M}
TIMEOUT=${TIMEOUT:-60}
OUT=${OUT:-$BUILD/bench-results}
QEMU_BENCH=$BUILD/bench/qemu_migration
KVMIG=$BUILD/cli/kvmig
GUEST=$BUILD/tests/guests/kvmig-guest.elf
run_qemu=1 run_kvmig=1 scenarios="idle hot256 hot1g"

die() { echo "migrate_vs_qemu: $*" >&2; exit 2; }
# shellcheck source=bench/lib.sh
. "$SRC/bench/lib.sh"
while [ $# -gt 0 ]; do
  case $1 in
    --qemu-only) run_kvmig=0 ;;
    --kvmig-only) run_qemu=0 ;;
    --scenarios) [ $# -ge 2 ] || die "--scenarios needs a value"; scenarios=$2; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
case $TIMEOUT in ''|*[!0-9]*) die "TIMEOUT must be whole seconds, not '$TIMEOUT'" ;; esac
command -v jq >/dev/null || die "jq is needed to read the JSON reports (apt-get install jq)"
[ -f "$GUEST" ] || die "no test guest at $GUEST; build it: cmake --build $BUILD --target kvmig_guest"

cmdline_of() {
  case $1 in
    idle) echo "idle=1" ;;
    hot256) echo "ws=256M pattern=seq" ;;
    hot1g) echo "ws=1G pattern=seq" ;;
    *) die "unknown scenario '$1' (idle, hot256, hot1g)" ;;
  esac
}
for s in $scenarios; do cmdline_of "$s" >/dev/null; done

results=$(new_results results) || exit 2
not_run=()

# ---- QEMU ---------------------------------------------------------------------------------
qemu_row() {  # scenario config extra-args...
  local scenario=$1 config=$2; shift 2
  local extra=()
  [ -n "${QEMU_MAX_BANDWIDTH:-}" ] && extra+=(--max-bandwidth "$QEMU_MAX_BANDWIDTH")
  echo "qemu   $scenario ($config) ..." >&2
  local line
  line=$("$QEMU_BENCH" --accel "$ACCEL" --memory "$MEMORY" --cmdline "$(cmdline_of "$scenario")" \
           --scenario "$scenario" --timeout "$TIMEOUT" "${extra[@]}" "$@" || true)
  if [ -z "$line" ] || ! jq -e "type == \"object\"" >/dev/null 2>&1 <<<"$line"; then
    not_run+=("qemu $scenario ($config): qemu_migration printed no report")
    return
  fi
  jq -c --arg c "$config" '. + {config: $c}' <<<"$line" >>"$results"
}

# ---- kvmig --------------------------------------------------------------------------------
# Last pass count of vCPU 0 in a console file (0 if none yet).
last_pass() { { grep -a 'kvmig-guest: pass vcpu=0 ' "$1" 2>/dev/null || true; } | tail -n1 | sed -n 's/.* n=\([0-9]*\) .*/\1/p' | grep . || echo 0; }
passes_at_least() { [ "$(last_pass "$1")" -ge "$2" ]; }

kvmig_row() {  # scenario config migrate-args...
  local scenario=$1 config=$2; shift 2
  echo "kvmig  $scenario ($config) ..." >&2
  local dir; dir=$(mktemp -d /tmp/kvmig-vs-qemu-XXXXXX)
  local rpid spid port report why=""
  "$KVMIG" receive --listen 127.0.0.1:0 --console "$dir/dst.console" --control "$dir/dst.sock" \
    >"$dir/receive.out" 2>"$dir/receive.log" & rpid=$!
  "$KVMIG" vm run --kernel "$GUEST" --memory "$MEMORY" --vcpus 1 --cmdline "$(cmdline_of "$scenario")" \
    --console "$dir/src.console" --control "$dir/src.sock" >"$dir/run.out" 2>"$dir/run.log" & spid=$!
  if ! wait_until 120 grep -q 'listening on' "$dir/receive.log"; then why="kvmig receive did not listen: $(tail -c 300 "$dir/receive.log")"
  elif ! wait_until 180 passes_at_least "$dir/src.console" 2; then why="source guest did not reach pass 2: $(tail -c 300 "$dir/run.log")"
  fi
  if [ -z "$why" ]; then
    port=$(sed -n 's/.*listening on [^ ]*:\([0-9]*\).*/\1/p' "$dir/receive.log" | head -n1)
    # shellcheck disable=SC2086  # KVMIG_ARGS is a list of options
    report=$("$KVMIG" migrate "$dir/src.sock" --to "127.0.0.1:$port" --json --no-progress \
               --timeout "$TIMEOUT" "$@" ${KVMIG_ARGS:-} 2>"$dir/migrate.log" || true)
    if [ -z "$report" ] || ! jq -e "type == \"object\"" >/dev/null 2>&1 <<<"$report"; then
      why="kvmig migrate gave no JSON report: $(tr '\n' ' ' <"$dir/migrate.log" | tail -c 300)"
    else
      local verdict=completed at; at=$(last_pass "$dir/src.console")
      if [ "$(jq -r .result <<<"$report")" = completed ]; then
        wait_until 60 passes_at_least "$dir/dst.console" $((at + 3)) || verdict="failed: destination guest stopped passing"
        grep -aq 'kvmig-guest: \(corrupt\|error\|fault\)' "$dir/dst.console" "$dir/src.console" && verdict="failed: guest reported corruption"
      else
        verdict=$(jq -r .result <<<"$report")
      fi
      jq -c --arg s "$scenario" --arg c "$config" --arg v "$verdict" \
        '. + {tool: "kvmig", scenario: $s, config: $c} + (if $v == "completed" then {} else {result: $v} end)' \
        <<<"$report" >>"$results"
    fi
  fi
  kill "$spid" "$rpid" 2>/dev/null || true
  wait "$spid" "$rpid" 2>/dev/null || true
  [ -n "$why" ] && not_run+=("kvmig $scenario ($config): $why")
  rm -rf "$dir"
}

kvmig_available() {
  [ -x "$KVMIG" ] || { echo "no kvmig binary at $KVMIG"; return 1; }
  "$KVMIG" migrate --help >/dev/null 2>&1 || { echo "'kvmig migrate' does not exist yet"; return 1; }
  "$KVMIG" receive --help >/dev/null 2>&1 || { echo "'kvmig receive' does not exist yet"; return 1; }
}

if [ $run_qemu = 1 ]; then
  [ -x "$QEMU_BENCH" ] || die "no $QEMU_BENCH; build it: cmake --build $BUILD --target qemu_migration"
  for s in $scenarios; do
    qemu_row "$s" default
    qemu_row "$s" "downtime 10 ms" --downtime-ms 10
  done
fi
if [ $run_kvmig = 1 ]; then
  if why=$(kvmig_available); then
    for s in $scenarios; do
      kvmig_row "$s" "default${KVMIG_ARGS:+, $KVMIG_ARGS}"
      kvmig_row "$s" "downtime 10 ms${KVMIG_ARGS:+, $KVMIG_ARGS}" --max-downtime 10
    done
  else
    not_run+=("kvmig rows: NOT RUN: $why")
  fi
fi

# ---- the table ----------------------------------------------------------------------------
echo
echo "| scenario | tool | config | result | total ms | downtime ms | setup ms | MiB sent | iterations | pages | zero pages | dirty MB/s | MB/s |"
echo "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
jq -r '[.scenario, .tool, .config, .result,
        (.total_ms|floor), (if .downtime_ms == null then "-" else (.downtime_ms*10|round/10) end),
        (.setup_ms|floor), (.bytes/1048576*10|round/10), .iterations, .pages, .zero_pages,
        (.dirty_rate/1e6|round), (.bandwidth_mbps|round)] | "| " + (map(tostring) | join(" | ")) + " |"' \
  <(jq -s -c 'sort_by(({"idle": 0, "hot256": 1, "hot1g": 2}[.scenario] // 9), .config, .tool) | .[]' "$results")
end_report "$results" "COULD NOT RUN" "${not_run[@]}"
