#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, from Debian's packages, for the SLURM tests (run as root).
#   scripts/slurm_setup.sh          install if missing, configure, start, wait until the node is idle
# Idempotent and cache-friendly: installed packages are not fetched again, and a node already idle under the
# same configuration is left running. Exits non-zero, saying why, when the node is not idle within 60 s.
# Written for containers: no systemd (the daemons are started directly), no cgroups needed
# (proctrack/linuxproc, task/none), everything runs as root.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
WAIT_S=${SLURM_SETUP_WAIT_S:-60}

say() { echo "slurm_setup: $*" >&2; }
started=$(date +%s)

if [ "$(id -u)" != 0 ]; then say "must run as root (it installs packages and starts daemons)"; exit 1; fi

# 1. Packages: only what is missing.
missing=()
for bin in slurmctld:slurmctld slurmd:slurmd munged:munge sinfo:slurm-client; do
  command -v "${bin%%:*}" >/dev/null 2>&1 || missing+=("${bin##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
fi

# 2. Configuration for this machine: its hostname, its CPUs, 90% of its memory.
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(free -m | awk '/^Mem:/ {print int($2 * 0.9)}')
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd /run/munge /var/lib/munge /var/log/munge
new_conf=$(cat <<CONF
# Written by kdbench's scripts/slurm_setup.sh: one node, this machine.
ClusterName=kdbench
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
)
node_state() { sinfo -h -N -n "$host" -o "%t" 2>/dev/null | head -1; }

if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$new_conf" ] && pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null \
   && [ "$(node_state)" = idle ]; then
  say "node $host already idle ($(( $(date +%s) - started )) s)"
  exit 0
fi
printf '%s\n' "$new_conf" > "$CONF"

# 3. Daemons: munge first (slurm authenticates with it), then the controller, then the node daemon.
stop() {  # by pid file, never by name: only the daemons this script started
  local pidfile=$1
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    kill "$(cat "$pidfile")"; for _ in $(seq 50); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$pidfile"
}
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
fi
stop /run/slurmd.pid
stop /run/slurmctld.pid
/usr/sbin/slurmctld
/usr/sbin/slurmd

# 4. Wait for the node to be idle.
state=""
for _ in $(seq $(( WAIT_S * 2 ))); do
  state=$(node_state || true)
  [ "$state" = idle ] && break
  case "$state" in drain*|down*|fail*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;; esac
  sleep 0.5
done
if [ "$state" != idle ]; then
  say "node $host not idle after ${WAIT_S} s (state '${state:-no answer}'); why:"
  sinfo -R 2>&1 | sed 's/^/  /' >&2 || true
  scontrol show node "$host" 2>&1 | grep -iE "state|reason" | sed 's/^/  /' >&2 || true
  for log in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"; do
    echo "  --- tail of $log" >&2; tail -n 15 "$log" 2>/dev/null | sed 's/^/  /' >&2 || true
  done
  exit 1
fi
say "node $host idle: $cpus CPUs, ${mem_mb} MB, partition debug ($(( $(date +%s) - started )) s)"
