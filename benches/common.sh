# Shared by the benchmark scripts: release build, test images (made once, reused), timing.
# Env: SIZE (default 4G) of the mixed image, WORK (default /tmp/diskkit-bench) for the images,
# CACHE=cold to drop the page cache before every timed command (needs root).

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SIZE=${SIZE:-4G}
WORK=${WORK:-/tmp/diskkit-bench}
CACHE=${CACHE:-warm}
mkdir -p "$WORK"
cargo build --release --quiet
DISKKIT=$PWD/target/release/diskkit

# The mixed image of SIZE (40% random data, 20% text, 40% holes), raw; made once.
mixed_raw() {
  local img=$WORK/mixed-$SIZE.raw
  [ -f "$img" ] || python3 benches/gen_image.py "$img" "$SIZE"
  echo "$img"
}

# The mixed image converted by qemu-img to qcow2 (extra qemu-img convert options in $2); made once.
mixed_qcow2() {
  local name=$1; shift
  local img=$WORK/mixed-$SIZE.$name.qcow2
  [ -f "$img" ] || qemu-img convert -f raw -O qcow2 "$@" "$(mixed_raw)" "$img"
  echo "$img"
}

drop_cache() {
  if [ "$CACHE" = cold ]; then
    sync
    echo 3 > /proc/sys/vm/drop_caches
  fi
}

# Seconds (3 decimals) one run of a shell command line takes; output goes to /dev/null. Warm
# runs are preceded by an untimed run that fills the page cache.
seconds() {
  if [ "$CACHE" = cold ]; then drop_cache; else bash -c "$1" >/dev/null 2>&1; fi
  local start end
  start=$(date +%s%N)
  bash -c "$1" >/dev/null
  end=$(date +%s%N)
  python3 -c "print(f'{($end - $start) / 1e9:.3f}')"
}

# Prints "label: A s vs B s = ratio" for two command lines; the goal is an upper bound on the ratio.
side_by_side() {
  local label=$1 ours=$2 theirs=$3 goal=${4:-}
  local a b
  a=$(seconds "$ours")
  b=$(seconds "$theirs")
  python3 -c "
a, b, goal = $a, $b, '$goal'
r = a / b if b else float('inf')
verdict = '' if not goal else ('  (goal <= %s: %s)' % (goal, 'met' if r <= float(goal) else 'NOT met'))
print('%-58s %7.3f s vs %7.3f s  ratio %.2f%s' % ('$label', a, b, r, verdict))"
}

echo "# $(basename "$0"): SIZE=$SIZE, page cache $CACHE, $(nproc) cores, $(date -u +%F)"
