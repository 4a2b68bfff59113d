#!/usr/bin/env bash
# Runs diskkit's whole test suite on a fresh Debian machine: installs what the tests need when it is
# missing (qemu-utils for the qemu-img/qemu-io oracle, xorriso to build test ISOs), then runs every
# workspace test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v qemu-img >/dev/null 2>&1 || need_pkgs+=(qemu-utils)
command -v qemu-io >/dev/null 2>&1 || need_pkgs+=(qemu-utils)
command -v xorriso >/dev/null 2>&1 || need_pkgs+=(xorriso)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    echo "missing ${need_pkgs[*]}: install them (apt-get install ${need_pkgs[*]}) and rerun" >&2
    exit 2
  fi
fi

# A published bootable ISO for tests/iso.rs (skipped, with the reason printed, when unavailable).
downloads=target/test-downloads
fetch_grub() {
  ( cd "$downloads" && apt-get download grub-rescue-pc >/dev/null 2>&1 &&
    dpkg-deb -x grub-rescue-pc_*.deb grub-rescue-pc )
}
if ! ls "$downloads"/grub-rescue-pc/usr/lib/grub-rescue/*.iso >/dev/null 2>&1; then
  mkdir -p "$downloads"
  # A fresh machine may have no package lists yet: refresh them once and retry.
  fetch_grub || { [ "$(id -u)" = 0 ] && apt-get update -qq && fetch_grub; } ||
    echo "note: grub-rescue-pc not downloadable; the published-ISO test will be skipped" >&2
fi

cargo test --workspace --locked "$@"
