#!/bin/bash
# bench/status_bench.sh [KVMIG] [VMS]: `kvmig status` over VMS (default 10,000) recorded VMs.
# Seeds a fresh site: groups of 100 VMs per migration; 90% completed (started, placeholder,
# completed), 5% stopped after the placeholder, 5% stopped after the started record - so
# every branch of the decision path is taken. Then times `kvmig status` (all migrations,
# text and JSON, and one migration), best and median of 5 runs. Goal: < 1 s for 10,000.
# The rows follow the schema of docs/control-plane.md (site schema version 1).
set -euo pipefail

KVMIG=${1:-${KVMIG:-$(dirname "$0")/../build/cli/kvmig}}
VMS=${2:-10000}
command -v sqlite3 >/dev/null || { echo "status_bench: needs the sqlite3 shell" >&2; exit 1; }
[ -x "$KVMIG" ] || { echo "status_bench: no kvmig binary at $KVMIG (pass it as \$1)" >&2; exit 1; }
SITE=$(mktemp -d /tmp/kvmig-status-bench.XXXXXX)
trap 'rm -rf "$SITE"' EXIT

"$KVMIG" site init "$SITE" >/dev/null
seed_start=$(date +%s.%N)
sqlite3 "$SITE/site.db" <<SQL
PRAGMA synchronous=NORMAL;
BEGIN;
CREATE TEMP TABLE n(i INTEGER PRIMARY KEY);
WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i + 1 < $VMS) INSERT INTO n SELECT i FROM c;
CREATE TEMP VIEW v AS SELECT i, 'bench-' || (i / 100) AS mig,
  printf('%08x-0000-4000-8000-%012x', i, i) AS uuid, strftime('%s','now') * 1000 AS t FROM n;
INSERT INTO records(migration_id, vm_uuid, kind, at_ms) SELECT mig, uuid, 'migration_started', t FROM v;
INSERT INTO records(migration_id, vm_uuid, kind, at_ms, detail)
  SELECT mig, uuid, 'placeholder_created', t, 'microvm' FROM v WHERE i % 20 != 19;
INSERT INTO vms(uuid, name, state, migration_id, created_ms, completed_ms)
  SELECT uuid, 'vm-' || i, CASE WHEN i % 20 < 18 THEN 'completed' ELSE 'placeholder' END, mig, t,
         CASE WHEN i % 20 < 18 THEN t END FROM v WHERE i % 20 != 19;
INSERT INTO records(migration_id, vm_uuid, kind, at_ms) SELECT mig, uuid, 'migration_completed', t FROM v WHERE i % 20 < 18;
COMMIT;
SQL
seed_end=$(date +%s.%N)

time_runs() {  # time_runs LABEL ARGS...: best and median of 5, in ms; checks the line count
  local label=$1; shift
  local times=() s e lines
  for _ in 1 2 3 4 5; do
    s=$(date +%s%N)
    lines=$("$KVMIG" status --site "$SITE" "$@" | wc -l) || true
    e=$(date +%s%N)
    times+=($(( (e - s) / 1000000 )))
  done
  local sorted
  sorted=$(printf '%s\n' "${times[@]}" | sort -n)
  printf '| %-34s | %6s | %8s | %8s |\n' "$label" "$lines" "$(echo "$sorted" | head -1)" "$(echo "$sorted" | sed -n 3p)"
}

echo "status_bench: $VMS VMs seeded in $(echo "$seed_end - $seed_start" | bc) s; site $(du -sh "$SITE" | cut -f1)"
printf '| %-34s | %6s | %8s | %8s |\n' "kvmig status" "lines" "best ms" "median ms"
printf '|%s|%s|%s|%s|\n' "------------------------------------" "--------" "----------" "----------"
time_runs "all $VMS VMs, text" 
time_runs "all $VMS VMs, --json" --json
time_runs "one migration (100 VMs)" --migration bench-7
