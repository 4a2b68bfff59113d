#!/usr/bin/env bash
# Benchmark: diskkit convert side by side with qemu-img convert on the same image.
#
# Generates a raw image (SIZE, default 4G) with gen_image.py, laid out like a used filesystem:
# runs of varying length, ~40% random data, ~20% compressible text-like data, ~40% holes.
# Then times each conversion with /usr/bin/time (wall seconds, peak RSS) and prints the
# diskkit/qemu-img ratios (< 1 means diskkit is faster / smaller).
#
#   SIZE=1G benches/convert.sh          # quick run
#   KEEP=1 BENCH_DIR=/var/tmp/b REPEAT=1 VERIFY=0 benches/convert.sh
#   DISKKIT=/path/to/diskkit benches/convert.sh   # time another build (no cargo build)
#   CACHE_MODES="none unsafe" benches/convert.sh   # which -t rows to run ("" for none)
#
# Each conversion runs REPEAT times (default 3): the best time and the worst peak RSS count.
# VERIFY=1 (default) checks diskkit's outputs with qemu-img compare.
#
# Needs qemu-img, python3 and about 4x SIZE of free space (sparse source, outputs of both tools).
# Page cache is left warm (the source is read once before timing): figures compare CPU and I/O
# paths, not cold disk reads.
set -euo pipefail

SIZE=${SIZE:-4G}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${BENCH_DIR:-$(mktemp -d -p "${TMPDIR:-/var/tmp}" diskkit-bench.XXXXXX)}
VERIFY=${VERIFY:-1}
REPEAT=${REPEAT:-3}
mkdir -p "$DIR"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$DIR"' EXIT
rm -f "$DIR"/*.time

if [ -z "${DISKKIT:-}" ]; then
    cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
fi
DK=${DISKKIT:-$ROOT/target/release/diskkit}
SRC=$DIR/src.raw

echo "# generating $SIZE source image in $DIR"
python3 "$ROOT/benches/gen_image.py" "$SRC" "$SIZE"
cat "$SRC" > /dev/null
echo "# source: $(du -h --apparent-size "$SRC" | cut -f1) virtual, $(du -h "$SRC" | cut -f1) allocated; $(nproc) CPUs"

# run NAME CMD...: times CMD, appends "seconds peak_rss_kib" to $DIR/NAME.time
# Dirty pages left by the previous run are written first: with ext4's ordered mode an fsync
# would otherwise also wait for them, charging one tool for the other's deferred writes.
run() {
    local name=$1
    shift
    sync
    /usr/bin/time -f "%e %M" -a -o "$DIR/$name.time" "$@"
}

# Best time and worst peak RSS over the repetitions (the machine may be shared).
secs() { sort -n -k1 "$DIR/$1.time" | head -1 | cut -d' ' -f1; }
rss() { sort -n -k2 "$DIR/$1.time" | tail -1 | cut -d' ' -f2; }
ratio() { python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'{a / b:.2f}' if b else 'n/a')" "$1" "$2"; }

report() { # label case [diskkit-output qemu-output]
    local label=$1 c=$2
    printf '%-22s time %6ss vs %6ss (x%s), synced %6ss (x%s)  peak RSS %4s vs %4s MiB (x%s)' \
        "$label" "$(secs "dk-$c")" "$(secs "qi-$c")" "$(ratio "$(secs "dk-$c")" "$(secs "qi-$c")")" \
        "$(secs "qs-$c")" "$(ratio "$(secs "dk-$c")" "$(secs "qs-$c")")" \
        "$(($(rss "dk-$c") / 1024))" "$(($(rss "qi-$c") / 1024))" "$(ratio "$(rss "dk-$c")" "$(rss "qi-$c")")"
    if [ $# -eq 4 ]; then
        local ds qs
        ds=$(du -k "$3" | cut -f1)
        qs=$(du -k "$4" | cut -f1)
        printf '  output %s vs %s MiB (x%s)' "$((ds / 1024))" "$((qs / 1024))" "$(ratio "$ds" "$qs")"
    fi
    echo
}

verify() { # source output
    [ "$VERIFY" = 1 ] || return 0
    qemu-img compare -q "$1" "$2" || { echo "MISMATCH: $2 differs from $1" >&2; exit 1; }
}

# bench CASE SOURCE EXT QEMU_ARGS -- DISKKIT_ARGS: runs diskkit, qemu-img with its default
# cache mode (no sync at the end: its output may still be only in the page cache) and qemu-img
# followed by `sync FILE` (output on disk, as diskkit always leaves it: it fsyncs before renaming
# into place). Outputs are left as $DIR/dk.EXT and $DIR/qi.EXT.
bench() {
    local c=$1 src=$2 ext=$3
    shift 3
    local qemu_args=()
    while [ "$1" != -- ]; do qemu_args+=("$1"); shift; done
    shift
    for _ in $(seq "$REPEAT"); do
        rm -f "$DIR/dk.$ext" "$DIR/qi.$ext"
        run "dk-$c" "$DK" convert "$@" "$src" "$DIR/dk.$ext"
        rm -f "$DIR/qi.$ext"
        run "qs-$c" bash -c 'qemu-img convert -m 8 -W "$@" && sync "${@: -1}"' qemu-img \
            "${qemu_args[@]}" "$src" "$DIR/qi.$ext"
        rm -f "$DIR/qi.$ext"
        run "qi-$c" qemu-img convert -m 8 -W "${qemu_args[@]}" "$src" "$DIR/qi.$ext"
    done
    verify "$SRC" "$DIR/dk.$ext"
}

echo "# diskkit vs qemu-img convert -m 8 -W (ratio < 1: diskkit faster or smaller);"
echo "# 'synced' is qemu-img followed by sync of its output file: on disk at the end, as diskkit leaves its output"
bench raw-qcow2 "$SRC" qcow2 -O qcow2 -- -O qcow2
report "raw -> qcow2" raw-qcow2 "$DIR/dk.qcow2" "$DIR/qi.qcow2"
rm -f "$DIR/dk.qcow2"

bench qcow2-raw "$DIR/qi.qcow2" raw -O raw -- -O raw
report "qcow2 -> raw" qcow2-raw
rm -f "$DIR/dk.raw" "$DIR/qi.raw" "$DIR/qi.qcow2"

bench zstd "$SRC" zst.qcow2 -O qcow2 -c -o compression_type=zstd -- -O qcow2 -c -o compression_type=zstd
report "raw -> qcow2 -c zstd" zstd "$DIR/dk.zst.qcow2" "$DIR/qi.zst.qcow2"
rm -f "$DIR/dk.zst.qcow2" "$DIR/qi.zst.qcow2"

# zlib: qemu-img's default compression type.
bench zlib "$SRC" zlib.qcow2 -O qcow2 -c -o compression_type=zlib -- -O qcow2 -c -o compression_type=zlib
report "raw -> qcow2 -c zlib" zlib "$DIR/dk.zlib.qcow2" "$DIR/qi.zlib.qcow2"
rm -f "$DIR/dk.zlib.qcow2" "$DIR/qi.zlib.qcow2"

bench vpc "$SRC" vhd -O vpc -o subformat=dynamic -- -O vpc -o subformat=dynamic
report "raw -> vpc dynamic" vpc "$DIR/dk.vhd" "$DIR/qi.vhd"
rm -f "$DIR/dk.vhd" "$DIR/qi.vhd"

# Cache modes (-t): both tools in the same mode (none: O_DIRECT in both). CACHE_MODES="" skips
# these rows.
for mode in ${CACHE_MODES-none unsafe writethrough}; do
    bench "t-$mode" "$SRC" raw -O raw -t "$mode" -- -O raw -t "$mode"
    report "raw -> raw -t $mode" "t-$mode"
    rm -f "$DIR/dk.raw" "$DIR/qi.raw"
done
