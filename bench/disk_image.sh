# Sourced by bench/disk_copy_bench.sh and bench/disk_copy_ab.sh (POSIX sh): the image both copy.

# make_half_hole_image IMG SIZE_MIB: a raw image of SIZE_MIB, 64 MiB of random data then 64 MiB
# of hole, alternating (half data); written O_DIRECT so no dirty page cache is left behind.
make_half_hole_image() {
  img=$1 size_mib=$2
  rm -f "$img"
  dd if=/dev/urandom of="$img.chunk" bs=1M count=64 status=none
  truncate -s "${size_mib}M" "$img"
  i=0
  while [ $((i * 128)) -lt "$size_mib" ]; do
    dd if="$img.chunk" of="$img" bs=1M seek=$((i * 128)) conv=notrunc oflag=direct status=none
    i=$((i + 1))
  done
  rm -f "$img.chunk"
}
