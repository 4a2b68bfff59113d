# Shared by the benchmark scripts: release build, test images (made once, reused), timing.
# Env: SIZE (default 4G) of the mixed image, WORK (default /tmp/diskkit-bench) for the images,
# CACHE=cold to drop the page cache before every timed command (needs root).

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SIZE=${SIZE:-4G}
WORK=${WORK:-/tmp/diskkit-bench}
CACHE=${CACHE:-warm}
mkdir -p "$WORK"
# DISKKIT=/path/to/diskkit times another build instead of building this tree.
if [ -z "${DISKKIT:-}" ]; then
  cargo build --release --quiet
fi
DISKKIT=${DISKKIT:-$PWD/target/release/diskkit}

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

# Once at the start, when allowed (root): the page cache emptied of what earlier work left, so
# that no timed command pays for reclaiming it. With 22 GiB of cache on this VM, the system
# time of one and the same `snapshot create` varied threefold from run to run.
settle_page_cache() {
  if [ -w /proc/sys/vm/drop_caches ]; then
    sync
    echo 1 > /proc/sys/vm/drop_caches
  fi
}

drop_cache() {
  if [ "$CACHE" = cold ]; then
    sync
    echo 3 > /proc/sys/vm/drop_caches
  fi
}

# "WALL CPU": seconds one run of a shell command line takes, wall-clock and CPU (user + system,
# all threads); output goes to /dev/null. Warm runs follow an untimed run that fills the page
# cache. CPU time is the steadier figure on a busy machine.
measure() {
  if [ "$CACHE" = cold ]; then drop_cache; else bash -c "$1" >/dev/null 2>&1; fi
  /usr/bin/time -o "$WORK/time.txt" -f "%e %U %S" bash -c "$1" >/dev/null
  python3 -c "w, u, s = map(float, open('$WORK/time.txt').read().split()); print(w, u + s)"
}

# Prints wall and CPU seconds of two command lines and their ratios (ours / theirs); GOAL is an
# upper bound on the wall-clock ratio.
side_by_side() {
  local label=$1 ours=$2 theirs=$3 goal=${4:-}
  local a b
  a=$(measure "$ours")
  b=$(measure "$theirs")
  python3 -c "
(aw, ac), (bw, bc), goal = map(float, '$a'.split()), map(float, '$b'.split()), '$goal'
r = aw / bw if bw else float('inf')
verdict = '' if not goal else '  goal <= %s: %s' % (goal, 'met' if r <= float(goal) else 'NOT met')
print('%s\n    wall %6.2f s vs %6.2f s = %.2f   cpu %6.2f s vs %6.2f s = %.2f%s'
      % ('$label', aw, bw, r, ac, bc, ac / bc if bc else float('inf'), verdict))"
}

echo "# $(basename "$0"): SIZE=$SIZE, page cache $CACHE, $(nproc) cores, $(date -u +%F)"
