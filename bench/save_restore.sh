#!/bin/sh
# Save and restore of a 4 GiB guest (zero pages skipped), side by side with `dd` moving the
# same number of bytes to and from the same file system.
#
#   bench/save_restore.sh [BUILD_DIR] [MEMORY] [WS...]
#
# Defaults: MEMORY 4G, working sets 1G and 3G (the test guest writes every page of its
# working set in its first pass; the rest of RAM stays zero and is skipped by the save).
# The state file goes to $TMPDIR (default /tmp). kvmig writes it with O_DIRECT where the file
# system allows; before each read of it (dd and kvmig) its page cache is dropped as well
# (drop_cache), so both read it from the disk. The dd write figures are shown both ways
# (page cache + fsync, and O_DIRECT) for the same byte count.
#
# Times are kvmig's own (from its "saved"/"restored" lines: the state file write/read with
# zero-page detection and checksums; not VM creation). GB/s = 10^9 bytes/s, given two ways:
#   ram   guest RAM size / time  (what "save a 4 GiB guest at N GB/s" means)
#   data  bytes of non-zero pages / time  (what the disk actually moved)
set -eu

BUILD=${1:-build}
MEMORY=${2:-4G}
shift 2 2>/dev/null || shift $#
WORKING_SETS=${*:-1G 3G}
KVMIG=$BUILD/cli/kvmig
GUEST=$BUILD/tests/guests/kvmig-guest64.elf
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

# drop_cache FILE: evicts FILE (only it) from the page cache.
drop_cache() { dd of="$1" oflag=nocache conv=notrunc,fdatasync count=0 2>/dev/null; }

# gbps BYTES SECONDS
gbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.2f", (s > 0 ? b / s / 1e9 : 0) }'; }

# dd_seconds DD-ARGS...: runs dd, prints its elapsed seconds.
dd_seconds() { dd "$@" 2>&1 | sed -n 's/.* copied, \([0-9.]*\) s.*/\1/p'; }

echo "file system: $(df -T "$DIR" | awk 'NR == 2 { print $1, $2 }') ($DIR)"
printf "%-5s %-10s %-8s %8s %8s %8s\n" ws what "" seconds "GB/s ram" "GB/s data"
for WS in $WORKING_SETS; do
  rm -f "$DIR"/*
  "$KVMIG" vm run --kernel "$GUEST" --memory "$MEMORY" --cmdline "ws=$WS passes=0 report_ms=500" \
    --console "$DIR/console1" --control "$DIR/vm1.sock" 2>"$DIR/vm1.err" &
  VM_PID=$!
  # A pass line comes after pass 1, which wrote every page of the working set.
  wait_for "$DIR/console1" "kvmig-guest: pass vcpu=0" 600
  "$KVMIG" vm save --control "$DIR/vm1.sock" --output "$DIR/state" 2>"$DIR/save.err" ||
    { cat "$DIR/save.err" >&2; exit 1; }
  wait "$VM_PID" || true
  VM_PID=
  # kvmig: saved PATH: 4.00 GiB guest, 1026.1 MiB of pages, 3.428 s (1.25 GB/s)
  ram=$(awk -v m="$MEMORY" 'BEGIN { u = substr(m, length(m)); n = substr(m, 1, length(m) - 1);
        printf "%.0f", n * (u == "G" ? 2^30 : u == "M" ? 2^20 : 1) }')
  data_mib=$(sed -n 's/.*guest, \([0-9.]*\) MiB of pages.*/\1/p' "$DIR/save.err")
  data=$(awk -v m="$data_mib" 'BEGIN { printf "%.0f", m * 2^20 }')
  save_s=$(sed -n 's/.*pages, \([0-9.]*\) s .*/\1/p' "$DIR/save.err")
  [ -n "$save_s" ] || { echo "no timing in: $(cat "$DIR/save.err")" >&2; exit 1; }
  printf "%-5s %-10s %-8s %8s %8s %8s\n" "$WS" "kvmig save" "" "$save_s" "$(gbps "$ram" "$save_s")" "$(gbps "$data" "$save_s")"

  # dd: the same byte count, 8 MiB blocks, fresh files like the save's.
  count=$(((data + (8 << 20) - 1) / (8 << 20)))
  rm -f "$DIR/dd"
  s=$(dd_seconds if=/dev/zero of="$DIR/dd" bs=8M count="$count" conv=fsync)
  printf "%-5s %-10s %-8s %8s %8s %8s\n" "$WS" "dd write" "fsync" "$s" "$(gbps "$ram" "$s")" "$(gbps "$data" "$s")"
  rm -f "$DIR/dd"
  s=$(dd_seconds if=/dev/zero of="$DIR/dd" bs=8M count="$count" oflag=direct)
  printf "%-5s %-10s %-8s %8s %8s %8s\n" "$WS" "dd write" "direct" "$s" "$(gbps "$ram" "$s")" "$(gbps "$data" "$s")"
  rm -f "$DIR/dd"
  drop_cache "$DIR/state"
  s=$(dd_seconds if="$DIR/state" of=/dev/null bs=8M)
  printf "%-5s %-10s %-8s %8s %8s %8s\n" "$WS" "dd read" "buffered" "$s" "$(gbps "$ram" "$s")" "$(gbps "$data" "$s")"
  drop_cache "$DIR/state"
  s=$(dd_seconds if="$DIR/state" of=/dev/null bs=8M iflag=direct)
  printf "%-5s %-10s %-8s %8s %8s %8s\n" "$WS" "dd read" "direct" "$s" "$(gbps "$ram" "$s")" "$(gbps "$data" "$s")"

  drop_cache "$DIR/state"
  "$KVMIG" vm restore "$DIR/state" --console "$DIR/console2" --control "$DIR/vm2.sock" 2>"$DIR/vm2.err" &
  VM_PID=$!
  wait_for "$DIR/vm2.err" "restored" 300
  restore_s=$(sed -n 's/.*pages, \([0-9.]*\) s .*/\1/p' "$DIR/vm2.err")
  printf "%-5s %-10s %-8s %8s %8s %8s\n" "$WS" "kvmig load" "" "$restore_s" "$(gbps "$ram" "$restore_s")" "$(gbps "$data" "$restore_s")"
  # The restored guest must run on, not reboot, and find every page as it left it.
  wait_for "$DIR/console2" "kvmig-guest: pass" 300
  if grep -q "corrupt\|kvmig-guest: start\|kvmig-guest: error" "$DIR/console2"; then
    echo "restored guest reports corruption or rebooted:" >&2
    cat "$DIR/console2" >&2
    exit 1
  fi
  kill "$VM_PID"
  wait "$VM_PID" || true
  VM_PID=
done
