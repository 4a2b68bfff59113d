#!/usr/bin/env bash
# diskkit compare side by side with qemu-img compare on the same pairs of images.
# usage: benches/compare.sh   env: SIZE=4G, WORK=/tmp/diskkit-bench, CACHE=warm|cold (see common.sh)
source "$(dirname "$0")/common.sh"

raw=$(mixed_raw)
qcow2=$(mixed_qcow2 plain)
if ! "$DISKKIT" info "$qcow2" >/dev/null 2>&1; then
  echo "skipped: this build does not read qcow2 yet"
  exit 0
fi
zlib=$(mixed_qcow2 zlib -c)

side_by_side "raw vs qcow2 $SIZE: diskkit compare vs qemu-img compare" \
  "$DISKKIT compare $raw $qcow2" "qemu-img compare -f raw -F qcow2 $raw $qcow2" 1.0
side_by_side "qcow2 vs zlib qcow2 $SIZE: diskkit compare vs qemu-img compare" \
  "$DISKKIT compare $qcow2 $zlib" "qemu-img compare -f qcow2 -F qcow2 $qcow2 $zlib" 1.0
