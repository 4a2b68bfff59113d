#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/Cargo.toml for SECONDS each (default 600), seeded with
# small images made here by qemu-img, qemu-io and xorriso and with a snapshot store and a hash
# manifest made by diskkit (the write_* round-trip targets start empty), then prints a Markdown
# table: target, runs, coverage, crashes.
# Crashing inputs stay in fuzz/artifacts/TARGET; the corpus grows in fuzz/corpus/TARGET. Once the
# bug is fixed, minimize the input (cd fuzz && cargo fuzz tmin TARGET FILE) and keep it under
# fuzz/regressions/TARGET/: tests/fuzz_regressions.rs replays those on every test run.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
secs=${1:-600}
shift || true
top=$(cd "$(dirname "$0")/.." && pwd)
# A built binary named relative to where the script was started from.
if [ -n "${DISKKIT:-}" ]; then DISKKIT=$(realpath "$DISKKIT"); fi
cd "$top"
export RUSTC_BOOTSTRAP=1 # cargo fuzz needs nightly flags; this stable toolchain allows them so
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for tool in qemu-img qemu-io xorriso; do
  command -v "$tool" >/dev/null || { echo "fuzz.sh: $tool is missing (apt-get install qemu-utils xorriso)" >&2; exit 2; }
done

seeds=$(mktemp -d)
trap 'rm -rf "$seeds"' EXIT

# Images of every format with data, zeros, holes, a backing-less snapshot and compression.
q() { qemu-img "$@" >/dev/null; }
q create -f qcow2 "$seeds/plain.qcow2" 4M
qemu-io -f qcow2 -c "write -P 0xab 0 64k" -c "write -z 1M 64k" -c "write -P 7 3M 4k" \
  "$seeds/plain.qcow2" >/dev/null
q snapshot -c first "$seeds/plain.qcow2"
q convert -c -O qcow2 "$seeds/plain.qcow2" "$seeds/compressed.qcow2"
q convert -O qcow2 -o compat=0.10 "$seeds/plain.qcow2" "$seeds/v2.qcow2"
q convert -O vpc "$seeds/plain.qcow2" "$seeds/dynamic.vhd"
q convert -O vpc -o subformat=fixed "$seeds/plain.qcow2" "$seeds/fixed.vhd"
q convert -O vhdx "$seeds/plain.qcow2" "$seeds/dynamic.vhdx"
q convert -O vmdk "$seeds/plain.qcow2" "$seeds/sparse.vmdk"
q convert -O vmdk -o subformat=streamOptimized "$seeds/plain.qcow2" "$seeds/stream.vmdk"
mkdir -p "$seeds/tree/dir"
echo "seed" >"$seeds/tree/dir/file.txt"
xorriso -as mkisofs -quiet -R -J -o "$seeds/small.iso" "$seeds/tree" 2>/dev/null
# The iso target puts its input after a zeroed 32 KiB system area: its seed starts at sector 16.
tail -c +32769 "$seeds/small.iso" >"$seeds/small.iso-from-sector-16"

# diskkit's own structures: a hash manifest, a snapshot index and chunks. DISKKIT names a built
# binary to make them with (a campaign run from a second worktree need not build one).
bin=${DISKKIT:-}
if [ -z "$bin" ]; then
  cargo build --quiet --bin diskkit
  bin=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/debug/diskkit
fi
"$bin" hash --manifest "$seeds/manifest.json" "$seeds/plain.qcow2" >/dev/null
"$bin" hash -a blake3 --manifest "$seeds/manifest-blake3.json" "$seeds/plain.qcow2" >/dev/null
"$bin" snapshot create "$seeds/plain.qcow2" "$seeds/store" >/dev/null
"$bin" bundle create "$seeds/store" machine --system "$seeds/plain.qcow2" --data vdb="$seeds/fixed.vhd" >/dev/null
"$bin" bundle pack "$seeds/plain.qcow2" "$seeds/machine.ova" >/dev/null
(mkdir -p "$seeds/ova" && cd "$seeds/ova" && tar -xf ../machine.ova && ls "$seeds/ova"/*.ovf >/dev/null)
printf 'source,destination,operation,format\n%s,out.qcow2,convert,qcow2\n' "$seeds/plain.qcow2" >"$seeds/jobs.csv"
printf '{"source":"%s","destination":"out.vhd","format":"vpc"}\n' "$seeds/plain.qcow2" >"$seeds/jobs.jsonl"
# A GPT disk with an EFI system partition and a second partition, and an MBR disk.
if command -v sgdisk >/dev/null; then
  truncate -s 8M "$seeds/gpt.raw"
  sgdisk -q -n 1:2048:+2M -t 1:ef00 -n 2:0:0 "$seeds/gpt.raw" >/dev/null
fi

# The seeds of a target: files named for it, or every image for targets that detect formats.
seeds_for() {
  case "$1" in
    qcow2) ls "$seeds"/*.qcow2 ;;
    vhd) ls "$seeds"/*.vhd ;;
    vhdx) ls "$seeds"/*.vhdx ;;
    vmdk) ls "$seeds"/*.vmdk ;;
    iso) ls "$seeds"/*.iso-from-sector-16 ;;
    manifest) ls "$seeds"/manifest.json "$seeds"/manifest-blake3.json ;;
    snapshot_index) find "$seeds/store" -path '*/snapshots/*' -type f ;;
    snapshot_chunk) find "$seeds/store" -path '*/chunks/*' -type f | head -20 ;;
    bundle_manifest) find "$seeds/store" -path '*/bundles/*' -type f ;;
    ova_tar) ls "$seeds"/*.ova ;;
    ovf) ls "$seeds"/ova/*.ovf ;;
    jobfile) ls "$seeds"/jobs.* ;;
    partition) ls "$seeds"/gpt.raw "$seeds"/fixed.vhd 2>/dev/null ;;
    qcow2_edit) ls "$seeds"/*.qcow2 ;;
    # Writer round trips read a description of a guest, not an image: no seeds.
    write_*) ;;
    *) ls "$seeds"/*.qcow2 "$seeds"/*.vhd* "$seeds"/*.vmdk "$seeds"/*.iso ;;
  esac
}

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(sed -n '/^\[\[bin\]\]/,/^path/{s/^name = "\(.*\)"/\1/p}' fuzz/Cargo.toml)
fi

echo "| target | seconds | runs | coverage | corpus | crashes |"
echo "| --- | --- | --- | --- | --- | --- |"
for t in "${targets[@]}"; do
  corpus="fuzz/corpus/$t"
  mkdir -p "$corpus" "fuzz/artifacts/$t"
  while read -r f; do [ -n "$f" ] && cp "$f" "$corpus/seed-$(basename "$f")"; done < <(seeds_for "$t")
  log="fuzz/artifacts/$t/last-run.log"
  # libFuzzer cuts inputs to 1 MiB unless told: seeds whose structures lie further (a fixed
  # VHD's footer, VHDX regions and BAT past 1 MiB) are fuzzed whole, up to 16 MiB.
  biggest=$(find "$corpus" -type f -printf '%s\n' | sort -n | tail -1)
  maxlen=$(( ${biggest:-0} > 1048576 ? ${biggest:-0} : 1048576 ))
  maxlen=$(( maxlen < 16777216 ? maxlen : 16777216 ))
  before=$(find "fuzz/artifacts/$t" -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' | wc -l)
  # A crash stops the run early; the table still reports it.
  (cd fuzz && cargo fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -max_len="$maxlen" \
    -rss_limit_mb=4096 -timeout=20 -print_final_stats=1) >"$log" 2>&1 || true
  after=$(find "fuzz/artifacts/$t" -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' | wc -l)
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  size=$(find "$corpus" -type f | wc -l)
  echo "| $t | $secs | ${runs:-?} | ${cov:-?} | $size | $((after - before)) new ($after kept) |"
done
