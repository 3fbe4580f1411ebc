#!/bin/sh
# Save and restore of a 4 GiB guest, in GB/s of guest RAM (kvmig's own timing of the state
# write/read, which includes zero-page detection and checksums; not VM creation).
#
#   bench/save_restore.sh [BUILD_DIR] [WS] [MEMORY]
#
# WS is the test guest's working set (default 3584M: most of RAM holds data; try 64M for a
# mostly-empty guest, where zero-page skipping dominates). The state file goes to $TMPDIR
# (default /tmp), so the figures are for the page cache of that file system, not the disk.
set -eu

BUILD=${1:-build}
WS=${2:-3584M}
MEMORY=${3:-4G}
KVMIG=$BUILD/cli/kvmig
GUEST=$BUILD/tests/guests/kvmig-guest.elf
[ -x "$KVMIG" ] || { echo "no kvmig binary at $KVMIG (build it first)" >&2; exit 1; }
[ -f "$GUEST" ] || { echo "no test guest at $GUEST (build target kvmig_guest)" >&2; exit 1; }

DIR=$(mktemp -d "${TMPDIR:-/tmp}/kvmig-bench-save-restore.XXXXXX")
VM_PID=
cleanup() {
  [ -n "$VM_PID" ] && kill "$VM_PID" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT INT TERM

# Waits until FILE contains PATTERN (at most $3 seconds).
wait_for() {
  i=0
  while ! grep -q "$2" "$1" 2>/dev/null; do
    i=$((i + 1))
    [ "$i" -gt $(($3 * 10)) ] && { echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1; }
    sleep 0.1
  done
}

echo "guest: $MEMORY RAM, working set $WS; state file in $DIR"
"$KVMIG" vm run --kernel "$GUEST" --memory "$MEMORY" --cmdline "ws=$WS passes=0 report_ms=500" \
  --console "$DIR/console1" --control "$DIR/vm1.sock" 2>"$DIR/vm1.err" &
VM_PID=$!
# After the first pass every page of the working set holds data.
wait_for "$DIR/console1" "pass vcpu=0 n=1 " 300

# (`kvmig vm run` must register the "save" command: cli/vm_state_command.h.)
"$KVMIG" vm save --control "$DIR/vm1.sock" --output "$DIR/state" 2>"$DIR/save1.err" ||
  { cat "$DIR/save1.err" >&2; exit 1; }
sed 's/^kvmig: /save:    /' "$DIR/save1.err"
wait "$VM_PID" || true
VM_PID=
echo "file:    $(du -h --apparent-size "$DIR/state" | cut -f1)"

"$KVMIG" vm restore "$DIR/state" --console "$DIR/console2" --control "$DIR/vm2.sock" 2>"$DIR/vm2.err" &
VM_PID=$!
wait_for "$DIR/vm2.err" "restored" 120
sed 's/^kvmig: /restore: /' "$DIR/vm2.err"
# The restored guest must be running on, not rebooted: wait for its next pass, then end it.
wait_for "$DIR/console2" "kvmig-guest: pass" 300
if grep -q "corrupt\|kvmig-guest: start" "$DIR/console2"; then
  echo "restored guest reports corruption or rebooted:" >&2
  cat "$DIR/console2" >&2
  exit 1
fi
"$KVMIG" vm save --control "$DIR/vm2.sock" --output "$DIR/state" 2>"$DIR/save2.err" ||
  { cat "$DIR/save2.err" >&2; exit 1; }
sed 's/^kvmig: /save 2:  /' "$DIR/save2.err"
wait "$VM_PID" || true
VM_PID=
