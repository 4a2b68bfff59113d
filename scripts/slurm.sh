#!/usr/bin/env bash
# A private single-node Slurm cluster for tests: munged, slurmctld and slurmd from Debian's
# slurm-wlm and munge packages, with their own key, ports, state directories and configuration in
# one directory, so nothing under /etc is used and several clusters can run side by side.
#
#   scripts/slurm.sh start DIR [CTLD_PORT [SLURMD_PORT]]   # prints "export SLURM_CONF=DIR/slurm.conf"
#   scripts/slurm.sh stop DIR                              # stops the three daemons by their PIDs
#
# Clients (sbatch, squeue, scancel, scontrol) find the cluster through SLURM_CONF. Process tracking
# is proctrack/linuxproc and task/none, so no cgroup or systemd is needed (containers, CI runners).
# Jobs run as the user who started the cluster.
set -euo pipefail

usage() { echo "usage: $0 start DIR [CTLD_PORT [SLURMD_PORT]] | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
dir=$(realpath -m "$2")

stop() {
  local pid name
  # slurmd first (it owns running jobs), munged last (the others authenticate through it).
  for name in slurmd slurmctld munged; do
    [ -f "$dir/$name.pid" ] || continue
    pid=$(cat "$dir/$name.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/$name.pid"
  done
}

case $cmd in
stop)
  stop
  exit 0
  ;;
start) ;;
*) usage ;;
esac

ctld_port=${3:-18736}
slurmd_port=${4:-18737}
for tool in munged slurmctld slurmd sinfo; do
  command -v "$tool" >/dev/null 2>&1 ||
    { echo "$tool missing: apt-get install slurm-wlm munge" >&2; exit 2; }
done

mkdir -p "$dir"
# munged wants its socket's directories searchable by all and its key's directory private.
chmod 755 "$dir"
mkdir -p "$dir/ctld" "$dir/spool" "$dir/log" "$dir/munge" "$dir/socket"
chmod 700 "$dir/munge"
chmod 755 "$dir/socket"
user=$(id -un)
host=$(hostname -s)
cpus=$(nproc)
# Three or more array tasks must run at once even on a 2-core runner: declare at least 4 CPUs
# (config_overrides lets slurmd accept more than it counts).
[ "$cpus" -ge 4 ] || cpus=4
memory=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)

if [ ! -f "$dir/munge/munge.key" ]; then
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge/munge.key"
fi
socket="$dir/socket/munge.socket"

cat >"$dir/slurm.conf" <<EOF
ClusterName=diskkit
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.daemon.pid
SlurmdPidFile=$dir/slurmd.daemon.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
LaunchParameters=use_interactive_step
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# Tests wait on state changes: let slurmctld act at once.
SchedulerParameters=sched_interval=1
MinJobAge=600
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
export SLURM_CONF="$dir/slurm.conf"

# Each daemon runs in the foreground under this shell's child, so $! is its PID.
munged --foreground --force --socket="$socket" --key-file="$dir/munge/munge.key" \
  --pid-file="$dir/munge/munged.daemon.pid" --log-file="$dir/log/munged.log" \
  --seed-file="$dir/munge/munge.seed" </dev/null >>"$dir/log/munged.out" 2>&1 &
echo $! >"$dir/munged.pid"
for _ in $(seq 50); do [ -S "$socket" ] && break; sleep 0.1; done
[ -S "$socket" ] || { cat "$dir/log/munged.log" >&2; stop; echo "munged failed to start" >&2; exit 2; }

slurmctld -D -i -f "$SLURM_CONF" </dev/null >>"$dir/log/slurmctld.out" 2>&1 &
echo $! >"$dir/slurmctld.pid"
slurmd -D -f "$SLURM_CONF" </dev/null >>"$dir/log/slurmd.out" 2>&1 &
echo $! >"$dir/slurmd.pid"

# Ready when the node is idle (or mixed) in the partition.
for _ in $(seq 150); do
  state=$(sinfo -h -N -o '%t' 2>/dev/null | head -1 || true)
  case $state in idle* | mix* | alloc*) echo "export SLURM_CONF=$SLURM_CONF"; exit 0 ;; esac
  for name in munged slurmctld slurmd; do
    kill -0 "$(cat "$dir/$name.pid")" 2>/dev/null && continue
    tail -20 "$dir/log/$name.log" "$dir/log/$name.out" >&2 2>/dev/null || true
    stop
    echo "$name exited during start" >&2
    exit 2
  done
  sleep 0.2
done
tail -20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
stop
echo "slurm did not become ready (node state: ${state:-none})" >&2
exit 2
