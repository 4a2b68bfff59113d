#!/usr/bin/env bash
# Benchmark: raw to streamOptimized VMDK, diskkit convert side by side with
# `qemu-img convert -O vmdk -o subformat=streamOptimized` followed by `sync` (diskkit's output
# is synced before it is renamed into place), on the same mixed source: gen_image.py's used
# filesystem (40% random data, 20% log-like text, 40% holes). Reports the wall and CPU time
# ratios (goal: at most 0.35x qemu-img's wall time) and the output size ratio (goal: at most
# 1.05x), and checks diskkit's output with qemu-img check and compare.
#
#   SIZE=1G WORK=/work/bench-vmdk benches/vmdk.sh     # the README's figures
#   DISKKIT=/path/to/diskkit benches/vmdk.sh          # time another build (no cargo build)
#
# Needs qemu-img, python3 and about 2x SIZE of free space. WORK is removed at the end.
source "$(dirname "$0")/common.sh"
trap 'rm -rf "$WORK"' EXIT

src=$(mixed_raw)
ours=$WORK/diskkit.vmdk
theirs=$WORK/qemu.vmdk
side_by_side "raw -> vmdk streamOptimized (diskkit vs qemu-img + sync)" \
  "rm -f $ours; $DISKKIT convert -O vmdk -o subformat=streamOptimized $src $ours" \
  "rm -f $theirs; qemu-img convert -O vmdk -o subformat=streamOptimized $src $theirs && sync" \
  0.35
a=$(stat -c %s "$ours")
b=$(stat -c %s "$theirs")
python3 -c "a, b = $a, $b; r = a / b
print('    size %d vs %d bytes = %.3f  goal <= 1.05: %s' % (a, b, r, 'met' if r <= 1.05 else 'NOT met'))"
qemu-img check -q "$ours"
qemu-img compare -q "$src" "$ours" && echo "    diskkit's output: qemu-img check and compare pass"
