#!/usr/bin/env bash
# Bundles and OVA, side by side with what a user would otherwise run:
# 1. OVA export of a 3-disk machine (a SIZE system disk, two SIZE/2 data disks, mixed content):
#    diskkit bundle export from a store, and diskkit bundle pack from the raw files, against
#    qemu-img convert -O vmdk -o subformat=streamOptimized per disk, sha256sum for the .mf, tar.
#    Goal: at most 0.4x the pipeline's wall-clock time.
# 2. bundle copy between two stores after 2% of the machine's data changed (8 contiguous runs
#    of random bytes): bytes sent against the bytes changed. Goal: at most 1.1x.
# Env: SIZE (default 512M), WORK (default /tmp/diskkit-bench), DISKKIT, CACHE (see common.sh).
SIZE=${SIZE:-512M}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
B=$WORK/bundle
rm -rf "$B"
mkdir -p "$B"
trap 'rm -rf "$B"' EXIT
SYS=$(mixed_raw)
HALF=$(python3 -c "import sys; sys.path.insert(0, 'benches'); import gen_image as g; print(g.parse_size('$SIZE') // 2)")
python3 benches/gen_image.py "$B/d1.raw" "$HALF" --seed 2
python3 benches/gen_image.py "$B/d2.raw" "$HALF" --seed 3
"$DISKKIT" bundle create --system "$SYS" --data "vdb=$B/d1.raw" --data "vdc=$B/d2.raw" "$B/a" m >/dev/null

echo "== OVA export of a 3-disk machine ($SIZE + 2 x $HALF bytes); $(uptime | sed 's/.*load/load/') =="
cat > "$B/pipeline.sh" <<PIPE
set -e
cd "$B"
qemu-img convert -O vmdk -o subformat=streamOptimized,adapter_type=lsilogic "$SYS" m-disk1.vmdk
qemu-img convert -O vmdk -o subformat=streamOptimized,adapter_type=lsilogic d1.raw m-disk2.vmdk
qemu-img convert -O vmdk -o subformat=streamOptimized,adapter_type=lsilogic d2.raw m-disk3.vmdk
echo '<Envelope/>' > m.ovf
sha256sum m.ovf m-disk1.vmdk m-disk2.vmdk m-disk3.vmdk | awk '{print "SHA256(" \$2 ")= " \$1}' > m.mf
tar -cf theirs.ova m.ovf m.mf m-disk1.vmdk m-disk2.vmdk m-disk3.vmdk
rm -f m-disk*.vmdk
PIPE
side_by_side "bundle export STORE m x.ova vs qemu-img convert x3 + sha256sum + tar" \
  "$DISKKIT bundle export $B/a m $B/ours.ova" "bash $B/pipeline.sh" 0.4
side_by_side "bundle pack 3 raw files vs qemu-img convert x3 + sha256sum + tar" \
  "$DISKKIT bundle pack --name m $SYS $B/d1.raw $B/d2.raw $B/packed.ova" "bash $B/pipeline.sh" 0.4
ls -l "$B/ours.ova" "$B/theirs.ova" | awk '{print "    " $5 " bytes  " $9}'
python3 -c "
import os
r = os.path.getsize('$B/ours.ova') / os.path.getsize('$B/theirs.ova')
print('    OVA size %.3fx the pipeline\'s  goal <= 1.05 (the VMDK writer\'s): %s' % (r, 'met' if r <= 1.05 else 'NOT met'))"
echo "    load: $(uptime | sed 's/.*load/load/')"

echo "== bundle copy after 2% of the data changed =="
"$DISKKIT" bundle copy "$B/a" m "$B/b" >/dev/null
TOTAL=$(( $(stat -c %s "$SYS") + 2 * HALF ))
CHANGED=$(python3 - "$B/d1.raw" "$TOTAL" <<'PY'
import os, sys
path, total = sys.argv[1], int(sys.argv[2])
size = os.path.getsize(path)
run = max(4 << 20, (total // 50 // 8) >> 22 << 22)   # 8 runs, whole 4 MiB chunks
step = size // 8 >> 22 << 22
with open(path, "r+b") as f:
    for i in range(8):
        f.seek(i * step)
        f.write(os.urandom(run))
print(8 * run)
PY
)
"$DISKKIT" bundle create --system "$SYS" --data "vdb=$B/d1.raw" --data "vdc=$B/d2.raw" "$B/a" m2 >/dev/null
SENT=$("$DISKKIT" bundle copy --output json "$B/a" m2 "$B/b" | python3 -c "import json, sys; print(json.load(sys.stdin)['bytes_sent'])")
python3 -c "
c, s = $CHANGED, $SENT
r = s / c
print('    changed %d bytes (%.1f%% of %d), sent %d bytes = %.3fx  goal <= 1.1: %s'
      % (c, 100 * c / $TOTAL, $TOTAL, s, r, 'met' if r <= 1.1 else 'NOT met'))"
