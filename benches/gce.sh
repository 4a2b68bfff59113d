#!/usr/bin/env bash
# Benchmark: the GCE tarball (diskkit convert --target gce) side by side with GNU tar on the same
# raw file: `tar --format=oldgnu -Sczf` (sparse, gzip'ed: what GCE's documentation has users
# run). Both read only the allocated data (tar -S finds it with SEEK_DATA/SEEK_HOLE, diskkit
# with the image's allocation map); diskkit compresses independent gzip members on all cores.
#
#   SIZE=1G benches/gce.sh        # quick run; WORK=DIR keeps the source image between runs
#
# The source is gen_image.py's mixed image (40% random data, 20% text, 40% holes), made a whole
# number of GiB so neither tool grows it. Prints wall and CPU seconds, the ratios
# (diskkit / tar; goal: wall <= 0.5) and both output sizes.
source "$(dirname "$0")/common.sh"

src=$(mixed_raw)
out=$WORK/gce
mkdir -p "$out"
ln -sf "$src" "$out/disk.raw"
side_by_side "tarball of disk.raw ($SIZE)" \
  "$DISKKIT convert --target gce --no-preflight -t unsafe $out/disk.raw $out/diskkit.tar.gz" \
  "tar --format=oldgnu -Sczf $out/tar.tar.gz -C $out --dereference disk.raw" 0.5
printf '    size diskkit %s bytes, tar %s bytes = %.3f\n' \
  "$(stat -c %s "$out/diskkit.tar.gz")" "$(stat -c %s "$out/tar.tar.gz")" \
  "$(python3 -c "import os; print(os.path.getsize('$out/diskkit.tar.gz') / os.path.getsize('$out/tar.tar.gz'))")"
rm -rf "$out"
