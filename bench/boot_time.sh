#!/bin/sh
# Boot to first report: from starting `kvmig vm run` to the test guest's first console line,
# for 1 GiB and 8 GiB guests, ELF32 (Multiboot, paging off) and ELF64 (long-mode entry).
#
#   bench/boot_time.sh [BUILD_DIR] [RUNS]
#
# Per configuration, RUNS runs (default 7), median and min..max of:
#   first line  wall clock from the shell starting kvmig to reading the guest's first line from
#               a FIFO (includes exec, dynamic linking, `date` forks: ~1-2 ms of the shell)
#   create      kvmig -v: from its main() to Machine::create() done (VM, memory, irqchip, vCPUs)
#   1st byte    kvmig -v: from its main() to the guest's first console byte
#   exit        wall clock to the end of the run (ws=4M passes=1: boot, one pass, exit port)
# Then one run per memory size under strace, to show where kvmig's own time goes (strace
# slows each system call down, so read those as proportions, not as the figures above).
set -eu

BUILD=${1:-build}
RUNS=${2:-7}
KVMIG=$BUILD/cli/kvmig
G32=$BUILD/tests/guests/kvmig-guest.elf
G64=$BUILD/tests/guests/kvmig-guest64.elf
CMDLINE="ws=4M passes=1 report_ms=0"
[ -x "$KVMIG" ] || { echo "no kvmig binary at $KVMIG (build target kvmig)" >&2; exit 1; }
[ -f "$G32" ] && [ -f "$G64" ] || { echo "no test guest in $BUILD/tests/guests (build target kvmig_guest)" >&2; exit 1; }
[ -w /dev/kvm ] || { echo "/dev/kvm is not usable by this user" >&2; exit 1; }

DIR=$(mktemp -d "${TMPDIR:-/tmp}/kvmig-bench-boot.XXXXXX")
trap 'rm -rf "$DIR"' EXIT INT TERM

now_us() { echo $(($(date +%s%N) / 1000)); }

# median and range of the numbers on stdin (one per line), as "MED (MIN..MAX)".
summary() {
  sort -n | awk '{ v[NR] = $1 } END {
    if (NR == 0) { print "-"; exit }
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "%6.1f (%.1f..%.1f)", m, v[1], v[NR] }'
}

# One run: appends "first_line_ms create_ms first_byte_ms exit_ms" to $DIR/rows.
one_run() {
  kernel=$1 memory=$2
  rm -f "$DIR/fifo" && mkfifo "$DIR/fifo"
  t0=$(now_us)
  "$KVMIG" vm run -v --no-control --kernel "$kernel" --memory "$memory" --cmdline "$CMDLINE" \
    --console "$DIR/fifo" 2>"$DIR/err" &
  pid=$!
  # Keep reading after the first line, or kvmig would write into a closed FIFO.
  { IFS= read -r line; t1=$(now_us); cat >"$DIR/rest"; } <"$DIR/fifo"
  rc=0
  wait "$pid" || rc=$?
  t2=$(now_us)
  case $line in
    "kvmig-guest: start "*) ;;
    *) echo "unexpected first line '$line' (exit $rc):" >&2; cat "$DIR/err" >&2; exit 1 ;;
  esac
  [ "$rc" -eq 0 ] && grep -q "done result=pass" "$DIR/rest" ||
    { echo "guest run failed (exit $rc):" >&2; cat "$DIR/err" "$DIR/rest" >&2; exit 1; }
  stats=$(sed -n 's/.*create \([0-9.]*\) ms, first console byte \([0-9.]*\) ms.*/\1 \2/p' "$DIR/err")
  [ -n "$stats" ] || { echo "no timing line from kvmig -v:" >&2; cat "$DIR/err" >&2; exit 1; }
  echo "$(((t1 - t0) / 1000)).$(((t1 - t0) % 1000 / 100)) $stats $(((t2 - t0) / 1000))" >>"$DIR/rows"
}

echo "kvmig vm run --kernel K --memory M --cmdline '$CMDLINE'; $RUNS runs each, median (min..max) ms"
printf "%-8s %-6s  %-22s %-22s %-22s %-22s\n" kernel memory "first line" create "1st byte (kvmig)" exit
for kernel in "$G32" "$G64"; do
  for memory in 1G 8G; do
    : >"$DIR/rows"
    "$KVMIG" vm run --no-control --kernel "$kernel" --memory "$memory" --cmdline "$CMDLINE" \
      --console /dev/null >/dev/null 2>&1 || true   # warm-up: page cache, binary
    i=0
    while [ "$i" -lt "$RUNS" ]; do one_run "$kernel" "$memory"; i=$((i + 1)); done
    case $kernel in *64.elf) name=ELF64 ;; *) name=ELF32 ;; esac
    printf "%-8s %-6s  %-22s %-22s %-22s %-22s\n" "$name" "$memory" \
      "$(cut -d' ' -f1 "$DIR/rows" | summary)" "$(cut -d' ' -f2 "$DIR/rows" | summary)" \
      "$(cut -d' ' -f3 "$DIR/rows" | summary)" "$(cut -d' ' -f4 "$DIR/rows" | summary)"
  done
done

command -v strace >/dev/null || { echo "(no strace: skipping the breakdown)"; exit 0; }
echo
echo "Where kvmig's time goes (one ELF32 run under strace -f; ms since execve):"
for memory in 1G 8G; do
  strace -f -ttt -e trace=execve,openat,mmap,ioctl,write,exit_group -o "$DIR/trace" \
    "$KVMIG" vm run --no-control --kernel "$G32" --memory "$memory" --cmdline "$CMDLINE" \
    --console "$DIR/console" >/dev/null 2>&1 || true
  # Milestones: the first line matching each pattern, in the order they happen.
  awk -v mem="$memory" '
    function mark(name, pat) { if (!(name in at) && $0 ~ pat) { at[name] = $2; order[++n] = name } }
    { mark("execve", "execve\\(");
      mark("open /dev/kvm", "/dev/kvm");
      mark("KVM_CREATE_VM", "KVM_CREATE_VM");
      mark("guest RAM mapped", "mmap\\(NULL, [0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]");
      mark("memslots set", "KVM_SET_USER_MEMORY_REGION");
      mark("irqchip", "KVM_CREATE_IRQCHIP");
      mark("last vCPU created", "KVM_CREATE_VCPU");
      mark("kernel loaded (sregs)", "KVM_SET_SREGS");
      mark("first KVM_RUN", "KVM_RUN");
      mark("first console write", "write\\([0-9]+, \"kvmig-guest");
      if ($0 ~ /KVM_CREATE_VCPU/) at["last vCPU created"] = $2 }
    END {
      printf "  %s:", mem
      for (i = 1; i <= n; i++) printf " %s %.1f;", order[i], (at[order[i]] - at["execve"]) * 1000
      printf "\n" }' "$DIR/trace"
done
