#!/usr/bin/env bash
# The main job on the embedded default: inspects, maps and compares the sample image shipped in
# testdata/. Builds diskkit first (release).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q
dk=target/release/diskkit
sample=testdata/sample.qcow2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== diskkit info $sample"
$dk info "$sample"
echo "== diskkit map $sample"
$dk map "$sample"
echo "== diskkit compare $sample testdata/sample.raw"
$dk compare "$sample" testdata/sample.raw
