#!/usr/bin/env bash
# The main job on the embedded default: takes the sample image shipped in testdata/ through what a
# cloud import needs: inspect it, convert it to the upload formats, prove the outputs carry the
# same disk (compare, hash), check their metadata, take one through object storage (a local
# directory as the bucket: push, ls, pull back, verify) and snapshot it into a local store
# (create, an incremental, restore, verify). Builds diskkit first (release).
set -euo pipefail
cd "$(dirname "$0")/.."
# Cargo names the binary it built (wherever CARGO_TARGET_DIR or .cargo/config put it).
dk=$(cargo build --release --locked --message-format=json-render-diagnostics |
  sed -n 's/.*"executable":"\([^"]*\/diskkit\)".*/\1/p' | tail -n 1)
[ -x "$dk" ] || { echo "demo: cargo did not report the diskkit binary" >&2; exit 2; }
sample=${1:-testdata/sample.qcow2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
step() { printf '\n== %s\n' "$*"; }

step "diskkit info $sample"
$dk info "$sample"
step "diskkit map $sample"
$dk map "$sample"
step "convert to VHD dynamic, VHD fixed for Azure, and zstd-compressed qcow2"
# force_size keeps the exact virtual size (without it VHD rounds up to a CHS geometry, as qemu).
$dk convert -p -O vpc -o force_size=on "$sample" "$work/disk.vhd"
$dk convert -p -O vpc --target azure "$sample" "$work/disk-azure.vhd"
$dk convert -p -O qcow2 -c -o compression_type=zstd "$sample" "$work/disk.qcow2"
ls -l "$work"
step "compare every output with the source (--strict: sizes must match too)"
for out in "$work"/*; do $dk compare --strict "$sample" "$out"; done
step "guest digests: one value for the same disk in every format"
$dk hash "$sample" "$work"/*
step "check metadata"
$dk check "$work/disk.qcow2"
$dk check "$work/disk.vhd"
step "object storage, on a local directory as the bucket (s3://, oss://, obs:// work the same)"
bucket="$work/bucket"
mkdir "$bucket"
$dk push -O qcow2 -c "$sample" "$bucket/images/disk.qcow2"
$dk ls "$bucket/images/"
$dk pull -O qcow2 "$bucket/images/disk.qcow2" "$work/pulled.qcow2"
$dk verify "$bucket/images/disk.qcow2"
$dk compare "$sample" "$work/pulled.qcow2"
step "data-disk snapshots in a local directory as the store: a full snapshot, an incremental through a qcow2 overlay, a restore, the snapshot read as an image"
store="$work/store"
first=$($dk snapshot create --name data1 "$sample" "$store" | tail -n 1)
qemu_overlay="$work/overlay.qcow2"
$dk create -q -f qcow2 -b "$(realpath "$sample")" -F qcow2 "$qemu_overlay"
$dk snapshot create --parent "$first" "$qemu_overlay" "$store"
$dk snapshot ls "$store"
$dk snapshot restore -O vpc "$store" "$first" "$work/restored.vhd"
$dk compare "$sample" "$work/restored.vhd"
$dk hash "$sample" "$store#$first"
$dk snapshot verify --read-data "$store"
