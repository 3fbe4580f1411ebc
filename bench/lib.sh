# Sourced by the bench scripts (granularity.sh, migrate_vs_qemu.sh, disk_migration.sh): the
# parts they all do the same way. The sourcing script defines die() and OUT first.

# new_results PREFIX: prints the path of a new, empty $OUT/PREFIX-<time>.jsonl, one JSON
# report a row, so that runs never overwrite each other's figures.
new_results() {
  mkdir -p "$OUT" || die "cannot create $OUT"
  local file
  file=$OUT/$1-$(date +%Y%m%d-%H%M%S).jsonl
  : >"$file" || die "cannot write $file"
  echo "$file"
}

# wait_until SECONDS COMMAND...: runs COMMAND until it succeeds; 1 when SECONDS pass first.
wait_until() {
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do [ $SECONDS -ge $deadline ] && return 1; sleep 0.1; done
}

# end_report RESULTS LABEL [ROW...]: names the raw reports and lists each ROW that did not
# complete as "LABEL: ROW"; exits 1 when there is any, so a partial table cannot pass for whole.
end_report() {
  local results=$1 label=$2; shift 2
  echo
  echo "raw reports: $results"
  [ $# -eq 0 ] && return 0
  echo
  local row
  for row in "$@"; do echo "$label: $row"; done
  exit 1
}
