#!/usr/bin/env bash
# Benchmark: diskkit snapshot side by side with restic and borg on the mixed image of
# benches/gen_image.py (40% random data, 20% text, 40% holes).
#
#   SIZE=2G benches/snapshot.sh              # local stores in $WORK
#   S3=1 SIZE=1G benches/snapshot.sh         # also diskkit against the S3 server of
#                                            # DISKKIT_TEST_S3_ENDPOINT (keys as tests/storage.rs)
#
# Rows: initial snapshot; incremental after ~2% of the disk was rewritten (8 runs of 0.25%, as a
# filesystem rewrites files) in place in the raw file
# (all three tools read the whole file); incremental through a qcow2 overlay holding the same
# writes (diskkit reads only the overlay; restic and borg, which cannot, are timed on the in-place
# raw file, their best case); restore to a raw file (restic and borg followed by a sync of the
# restored file, as diskkit syncs before its rename; also shown unsynced). Each command runs once on a warm page cache
# (a backup run twice would be a no-op the second time). Prints wall time, peak RSS, ratios
# diskkit / other, and the store sizes after the initial snapshot.
# Needs restic and borgbackup (apt-get install restic borgbackup), qemu-utils, python3.
source "$(dirname "$0")/common.sh"

for tool in restic borg qemu-img qemu-io; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install restic borgbackup qemu-utils)" >&2; exit 2; }
done

B=$WORK/snapshot-bench
rm -rf "$B"
mkdir -p "$B"
settle_page_cache
SRC=$B/disk.raw
cp --sparse=always "$(mixed_raw)" "$SRC"
BASE=$B/base.qcow2
qemu-img convert -O qcow2 "$SRC" "$BASE"
cat "$SRC" "$BASE" >/dev/null

export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$B/restic BORG_REPO=$B/borg
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
restic init --repository-version 2 -q
borg init -e none "$BORG_REPO"

# run NAME CMD...: one timed run; "wall rss_kib" into $B/NAME.time. Each starts a few seconds
# after a sync: the VM's host goes on writing what the guest synced for a while, and the run
# after would pay for it (as in benches/batch.sh).
run() {
  local name=$1
  shift
  sync
  sleep "${SETTLE:-5}"
  /usr/bin/time -f "%e %M" -o "$B/$name.time" "$@" >"$B/$name.out" 2>&1 ||
    { cat "$B/$name.out" >&2; exit 1; }
}
t() { cut -d' ' -f1 "$B/$1.time"; }
m() { echo $(($(cut -d' ' -f2 "$B/$1.time") / 1024)); }
row() { # label ours restic borg [goal]
  python3 -c "
import sys
label, a, r, b, goal = sys.argv[1:6]
a, r, b = float(a), float(r), float(b)
g = '' if not goal else '  goal <= %s vs restic: %s' % (goal, 'met' if a / r <= float(goal) else 'NOT met')
print('%-34s diskkit %6.2fs  restic %6.2fs (x%.2f)  borg %6.2fs (x%.2f)%s' % (label, a, r, a / r, b, a / b, g))
" "$1" "$(t "$2")" "$(t "$3")" "$(t "$4")" "${5:-}"
  echo "    peak RSS MiB: diskkit $(m "$2"), restic $(m "$3"), borg $(m "$4")"
}

DKS=$B/dkstore
run dk-initial "$DISKKIT" snapshot create --name disk "$SRC" "$DKS"
ID=$(tail -1 "$B/dk-initial.out")
run rs-initial restic backup -q --compression auto "$SRC"
run bg-initial borg create --compression zstd,3 ::initial "$SRC"
row "initial snapshot" dk-initial rs-initial bg-initial 0.3
du_dk=$(du -sk "$DKS" | cut -f1)
du_rs=$(du -sk "$B/restic" | cut -f1)
du_bg=$(du -sk "$B/borg" | cut -f1)
python3 -c "print('store size after the initial snapshot: diskkit %d MiB, restic %d MiB (x%.2f, goal <= 1.1), borg %d MiB (x%.2f)' % ($du_dk/1024, $du_rs/1024, $du_dk/$du_rs, $du_bg/1024, $du_dk/$du_bg))"
grep -E '^read' "$B/dk-initial.out" | sed 's/^/    diskkit: /'

# ~2% of the disk rewritten as a filesystem rewrites files: 8 runs of new random bytes at
# random places (each 1/400 of the disk), the same offsets in the raw file (in place) and in an
# overlay on the qcow2 copy (written in 64 KiB pieces by qemu-io).
python3 - "$SRC" "$B/writes.txt" <<'PY'
import os, random, sys
path, cmds = sys.argv[1], sys.argv[2]
size = os.path.getsize(path)
rng = random.Random(7)
run = (size // 400) // (64 << 10) * (64 << 10)
with open(path, "r+b") as f, open(cmds, "w") as out:
    for _ in range(8):
        start = rng.randrange(0, size - run) // (64 << 10) * (64 << 10)
        for off in range(start, start + run, 64 << 10):
            data = rng.randbytes(64 << 10)
            f.seek(off)
            f.write(data)
            out.write("write -P %d %d 65536\n" % (data[0] | 1, off))
PY
TOP=$B/top.qcow2
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$TOP"
mapfile -t writes <"$B/writes.txt"
args=()
for w in "${writes[@]}"; do args+=(-c "$w"); done
qemu-io -f qcow2 "${args[@]}" "$TOP" >/dev/null
cat "$SRC" "$TOP" >/dev/null

run dk-inplace "$DISKKIT" snapshot create --name disk --parent "$ID" "$SRC" "$DKS"
run rs-inplace restic backup -q --compression auto "$SRC"
run bg-inplace borg create --compression zstd,3 ::inplace "$SRC"
row "incremental, 2% rewritten in place" dk-inplace rs-inplace bg-inplace 0.3
grep -E '^read' "$B/dk-inplace.out" | sed 's/^/    diskkit: /'

run dk-base "$DISKKIT" snapshot create --name disk "$BASE" "$DKS"
BASE_ID=$(tail -1 "$B/dk-base.out")
run dk-overlay "$DISKKIT" snapshot create --name disk --parent "$BASE_ID" "$TOP" "$DKS"
row "incremental through a qcow2 overlay" dk-overlay rs-inplace bg-inplace 0.05
grep -E '^(path|read)' "$B/dk-overlay.out" | sed 's/^/    diskkit: /'

rm -f "$SRC"
run dk-restore "$DISKKIT" snapshot restore "$DKS" "$ID" "$B/dk-restored.raw"
mkdir -p "$B/rs-restored" "$B/bg-restored"
# diskkit syncs the restored file before renaming it into place; restic and borg leave it in the
# page cache. The goal row times them followed by a sync of what they wrote (the same work);
# the second row shows them as they are.
run rs-restore-unsynced restic restore -q latest --target "$B/rs-restored"
run bg-restore-unsynced bash -c "cd '$B/bg-restored' && borg extract --sparse ::inplace"
rm -rf "$B/rs-restored" "$B/bg-restored"
mkdir -p "$B/rs-restored" "$B/bg-restored"
run rs-restore bash -c "restic restore -q latest --target '$B/rs-restored' && find '$B/rs-restored' -type f -exec sync {} +"
run bg-restore bash -c "cd '$B/bg-restored' && borg extract --sparse ::inplace && find . -type f -exec sync {} +"
row "restore to a raw file (synced)" dk-restore rs-restore bg-restore 0.3
row "  same, restic and borg unsynced" dk-restore rs-restore-unsynced bg-restore-unsynced

if [ "${S3:-0}" = 1 ]; then
  : "${DISKKIT_TEST_S3_ENDPOINT:?S3=1 needs DISKKIT_TEST_S3_ENDPOINT}"
  export AWS_ENDPOINT_URL=$DISKKIT_TEST_S3_ENDPOINT AWS_ACCESS_KEY_ID=diskkittest
  export AWS_SECRET_ACCESS_KEY=diskkittestsecret AWS_REGION=us-east-1
  S3STORE=s3://diskkit-test/bench-$$
  cp --sparse=always "$(mixed_raw)" "$SRC"
  run s3-initial "$DISKKIT" snapshot create --name disk "$SRC" "$S3STORE"
  run s3-restore "$DISKKIT" snapshot restore "$S3STORE" "$(tail -1 "$B/s3-initial.out")" "$B/s3.raw"
  echo "S3 store: initial snapshot $(t s3-initial)s ($(m s3-initial) MiB), restore $(t s3-restore)s ($(m s3-restore) MiB)"
fi
