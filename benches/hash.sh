#!/usr/bin/env bash
# diskkit hash side by side with sha256sum, openssl, b3sum and a qemu-img pipeline.
# usage: benches/hash.sh   env: SIZE=4G, WORK=/tmp/diskkit-bench, CACHE=warm|cold (see common.sh)
source "$(dirname "$0")/common.sh"

raw=$(mixed_raw)
qcow2=$(mixed_qcow2 plain)
tmp_raw=$WORK/pipeline.raw

# Hash speed per core, as data hashed per second of user CPU time (robust on a busy machine):
# SHA-NI (sha2 detects it at run time) gives well over 1 GB/s, portable code about 0.4 GB/s;
# BLAKE3 (diskkit hash -a blake3, b3sum) several GB/s with AVX2 or AVX-512.
dense=$WORK/dense-1G.raw
[ -f "$dense" ] || python3 benches/gen_image.py "$dense" 1G --holes 0 --compressible 0
command -v b3sum >/dev/null 2>&1 || apt-get install -y -qq b3sum >/dev/null
for tool in "$DISKKIT hash" "openssl dgst -sha256" sha256sum "$DISKKIT hash -a blake3" "b3sum --num-threads 1"; do
  $tool "$dense" >/dev/null
  /usr/bin/time -o "$WORK/time.txt" -f %U $tool "$dense" >/dev/null
  user=$(cat "$WORK/time.txt")
  name=${tool/#"$DISKKIT"/diskkit}
  python3 -c "print('%-40s %5.2f s user CPU = %.2f GB/s per core' % ('$name over 1 GiB random data', $user, 2**30 / max($user, 0.01) / 1e9))"
done
side_by_side "raw $SIZE: diskkit hash vs sha256sum" \
  "$DISKKIT hash $raw" "sha256sum $raw"
side_by_side "raw $SIZE: diskkit hash vs openssl dgst -sha256" \
  "$DISKKIT hash $raw" "openssl dgst -sha256 $raw" 0.35
side_by_side "raw $SIZE: diskkit hash -a blake3 vs b3sum" \
  "$DISKKIT hash -a blake3 $raw" "b3sum $raw"
if "$DISKKIT" info "$qcow2" >/dev/null 2>&1; then
  side_by_side "qcow2 $SIZE: diskkit hash vs qemu-img convert -O raw + openssl" \
    "$DISKKIT hash $qcow2" \
    "qemu-img convert -f qcow2 -O raw $qcow2 $tmp_raw && openssl dgst -sha256 $tmp_raw; rm -f $tmp_raw" 0.2
else
  echo "qcow2: skipped, this build does not read qcow2 yet"
fi

# Cost follows data, not virtual size: 1 GiB of data in a 1 TiB sparse file vs a 1 GiB file.
sparse=$WORK/sparse-1T-1G-data.raw
[ -f "$sparse" ] || python3 benches/gen_image.py "$sparse" 1T --spread 1G
side_by_side "1 TiB sparse with 1 GiB data vs 1 GiB dense: diskkit hash" \
  "$DISKKIT hash $sparse" "$DISKKIT hash $dense" 1.2
