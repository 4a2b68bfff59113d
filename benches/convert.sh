#!/usr/bin/env bash
# Benchmark: diskkit convert side by side with qemu-img convert on the same image.
#
# Generates a raw image (SIZE, default 4G) laid out like a used filesystem: runs of varying
# length, ~40% incompressible (random) data, ~20% compressible text-like data, ~40% holes.
# Then times each conversion with /usr/bin/time (wall seconds, peak RSS) and prints the
# diskkit/qemu-img ratios (< 1 means diskkit is faster / smaller).
#
#   SIZE=1G benches/convert.sh          # quick run
#   KEEP=1 BENCH_DIR=/var/tmp/b benches/convert.sh
#
# Needs qemu-img, python3 and about 4x SIZE of free space (sparse source, outputs of both tools).
# Page cache is left warm (the source is read once before timing): figures compare CPU and I/O
# paths, not cold disk reads.
set -euo pipefail

SIZE=${SIZE:-4G}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${BENCH_DIR:-$(mktemp -d -p "${TMPDIR:-/var/tmp}" diskkit-bench.XXXXXX)}
VERIFY=${VERIFY:-1}
mkdir -p "$DIR"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$DIR"' EXIT

cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
DK=$ROOT/target/release/diskkit
SRC=$DIR/src.raw

echo "# generating $SIZE source image in $DIR"
python3 - "$SRC" "$SIZE" <<'PY'
import os, random, sys
path, size = sys.argv[1], sys.argv[2].upper()
mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
size = int(float(size[:-1]) * mult[size[-1]]) if size[-1] in mult else int(size)
rng = random.Random(42)
words = [b"kernel", b"systemd", b"eth0", b"link", b"up", b"session", b"opened", b"user",
         b"root", b"cron", b"daemon", b"error", b"timeout", b"0x7f3a", b"/var/lib", b"ok"]
lines = []
for i in range(40000):
    lines.append(b"2026-11-24T%02d:%02d:%02d host %s[%d]: %s\n" % (
        i % 24, i % 60, (i * 7) % 60, rng.choice(words), rng.randrange(99999),
        b" ".join(rng.choice(words) for _ in range(rng.randrange(3, 12)))))
text = b"".join(lines)
piece = 1 << 20
with open(path, "wb") as f:
    f.truncate(size)
    pos = 0
    while pos < size:
        # Run lengths from 64 KiB to 32 MiB, 4 KiB aligned, skewed towards small runs.
        n = min(size - pos, max(64 << 10, int(rng.lognormvariate(14.5, 1.3)) & ~4095))
        kind = rng.random()
        if kind < 0.4:
            f.seek(pos)
            left = n
            while left:
                k = min(left, piece)
                f.write(os.urandom(k))
                left -= k
        elif kind < 0.6:
            f.seek(pos)
            left = n
            while left:
                start = rng.randrange(len(text) - piece)
                k = min(left, piece)
                f.write(text[start:start + k])
                left -= k
        pos += n
PY
cat "$SRC" > /dev/null
echo "# source: $(du -h --apparent-size "$SRC" | cut -f1) virtual, $(du -h "$SRC" | cut -f1) allocated; $(nproc) CPUs"

# run NAME CMD...: times CMD, records "seconds peak_rss_kib" in $DIR/NAME.time
run() {
    local name=$1
    shift
    /usr/bin/time -f "%e %M" -o "$DIR/$name.time" "$@"
}

secs() { cut -d' ' -f1 "$DIR/$1.time"; }
rss() { cut -d' ' -f2 "$DIR/$1.time"; }
ratio() { python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'{a / b:.2f}' if b else 'n/a')" "$1" "$2"; }

report() { # label diskkit-run qemu-run [diskkit-output qemu-output]
    local label=$1 d=$2 q=$3
    printf '%-28s time %7ss vs %7ss (x%s)  peak RSS %6s MiB vs %6s MiB (x%s)' \
        "$label" "$(secs "$d")" "$(secs "$q")" "$(ratio "$(secs "$d")" "$(secs "$q")")" \
        "$(($(rss "$d") / 1024))" "$(($(rss "$q") / 1024))" "$(ratio "$(rss "$d")" "$(rss "$q")")"
    if [ $# -eq 5 ]; then
        local ds qs
        ds=$(du -k "$4" | cut -f1)
        qs=$(du -k "$5" | cut -f1)
        printf '  output %s MiB vs %s MiB (x%s)' "$((ds / 1024))" "$((qs / 1024))" "$(ratio "$ds" "$qs")"
    fi
    echo
}

verify() { # source output
    [ "$VERIFY" = 1 ] || return 0
    qemu-img compare -q "$1" "$2" || { echo "MISMATCH: $2 differs from $1" >&2; exit 1; }
}

run dk-raw-qcow2 "$DK" convert -O qcow2 "$SRC" "$DIR/dk.qcow2"
run qi-raw-qcow2 qemu-img convert -m 8 -W -O qcow2 "$SRC" "$DIR/qi.qcow2"
verify "$SRC" "$DIR/dk.qcow2"
report "raw -> qcow2" dk-raw-qcow2 qi-raw-qcow2 "$DIR/dk.qcow2" "$DIR/qi.qcow2"

run dk-qcow2-raw "$DK" convert -O raw "$DIR/qi.qcow2" "$DIR/dk.raw"
run qi-qcow2-raw qemu-img convert -m 8 -W -O raw "$DIR/qi.qcow2" "$DIR/qi.raw"
verify "$SRC" "$DIR/dk.raw"
report "qcow2 -> raw" dk-qcow2-raw qi-qcow2-raw "$DIR/dk.raw" "$DIR/qi.raw"
rm -f "$DIR/dk.raw" "$DIR/qi.raw" "$DIR/dk.qcow2" "$DIR/qi.qcow2"

run dk-zstd "$DK" convert -O qcow2 -c -o compression_type=zstd "$SRC" "$DIR/dk.zst.qcow2"
run qi-zstd qemu-img convert -c -o compression_type=zstd -m 8 -W -O qcow2 "$SRC" "$DIR/qi.zst.qcow2"
verify "$SRC" "$DIR/dk.zst.qcow2"
report "raw -> qcow2 -c zstd" dk-zstd qi-zstd "$DIR/dk.zst.qcow2" "$DIR/qi.zst.qcow2"
rm -f "$DIR/dk.zst.qcow2" "$DIR/qi.zst.qcow2"

run dk-vpc "$DK" convert -O vpc -o subformat=dynamic "$SRC" "$DIR/dk.vhd"
run qi-vpc qemu-img convert -m 8 -W -O vpc -o subformat=dynamic "$SRC" "$DIR/qi.vhd"
verify "$SRC" "$DIR/dk.vhd"
report "raw -> vpc dynamic" dk-vpc qi-vpc "$DIR/dk.vhd" "$DIR/qi.vhd"
