#!/usr/bin/env bash
# A single-node SLURM on this machine, for tests and for trying dask-fp's
# `--cluster slurm` without a real cluster. Debian / Ubuntu only (apt-get).
#
#   deploy/slurm/local-cluster.sh up       install (if needed) and start munged, slurmctld, slurmd
#   deploy/slurm/local-cluster.sh status   exit 0 if the cluster answers and its node is usable
#   deploy/slurm/local-cluster.sh down     cancel all jobs, stop what `up` started, remove its state
#   deploy/slurm/local-cluster.sh down --force   ... even while other users (leases) remain
#   deploy/slurm/local-cluster.sh env      print `export SLURM_CONF=...` for this cluster
#
# Sharing: `up` and `down` take a lock, and each `up` records a lease: the
# value of $DASK_FP_SLURM_LEASE (a process id; the test suite passes its own),
# or "manual" when it is unset. `down` drops the caller's lease and stops the
# cluster only when no lease is left whose process is alive, so two test runs
# (or a test run and a person) can share one cluster without pulling it away
# from each other.
#
# Works without systemd (containers): the daemons are started directly, with
# their stdio on /dev/null so they never hold a caller's pipes open. Needs root
# (or passwordless sudo) for apt-get and the daemons.
#
# Settings (environment):
#   DASK_FP_SLURM_DIR   state, spool, logs and slurm.conf  (default /tmp/dask-fp-slurm)
#   DASK_FP_SLURM_CPUS  CPUs the node declares              (default 8; may exceed the real count)
#   DASK_FP_SLURM_MEM   RealMemory the node declares, MB    (default 16384)
#
# Notes, learnt the hard way:
#   * proctrack/linuxproc + task/none + jobacct_gather/none: no cgroups needed;
#   * DefMemPerCPU: without it a job that asks for no memory takes the whole node;
#   * SlurmdParameters=config_overrides lets the node declare more CPUs than exist;
#   * jobs outlive slurmd, so `down` cancels them first;
#   * slurmctld is never restarted with -c (job ids would restart and job
#     credentials get revoked); `down` removes the state instead.
set -euo pipefail

DIR=${DASK_FP_SLURM_DIR:-/tmp/dask-fp-slurm}
CPUS=${DASK_FP_SLURM_CPUS:-8}
MEM=${DASK_FP_SLURM_MEM:-16384}
CONF=$DIR/slurm.conf
NODE=$(hostname -s)
LEASE=${DASK_FP_SLURM_LEASE:-manual}
export SLURM_CONF=$CONF

say() { echo "local-cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

if [ "$(id -u)" = 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  SUDO=(__no_root__)
fi
need_root() {
  [ "${SUDO[0]:-}" != __no_root__ ] || die "needs root or passwordless sudo to $1"
}
as_root() { need_root "run $1"; "${SUDO[@]}" "$@"; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || die "apt-get not found; install munge and SLURM (slurmctld, slurmd, client) yourself"
  local pkgs=(munge slurmctld slurmd slurm-client)
  say "installing ${pkgs[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  if ! as_root apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$DIR/apt.log" 2>&1; then
    as_root apt-get update -q >>"$DIR/apt.log" 2>&1 || true
    as_root apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$DIR/apt.log" 2>&1 \
      || { tail -20 "$DIR/apt.log" >&2; die "apt-get install failed (log: $DIR/apt.log)"; }
  fi
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_ok; then return; fi
  need_root "start munged"
  "${SUDO[@]}" install -d -o munge -g munge -m 0755 /run/munge
  "${SUDO[@]}" install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
  "${SUDO[@]}" install -d -o munge -g munge -m 0711 /var/lib/munge
  if ! "${SUDO[@]}" test -s /etc/munge/munge.key; then
    if command -v mungekey >/dev/null; then
      "${SUDO[@]}" runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    else
      "${SUDO[@]}" dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
      "${SUDO[@]}" chown munge:munge /etc/munge/munge.key
      "${SUDO[@]}" chmod 0400 /etc/munge/munge.key
    fi
  fi
  "${SUDO[@]}" runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 9>&-
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || die "munged did not start (see /var/log/munge/munged.log)"
  touch "$DIR/munged.started-here"
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  cat >"$CONF" <<CONF
# Written by deploy/slurm/local-cluster.sh: a single-node SLURM for dask-fp's tests.
ClusterName=daskfp
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

# pid_alive FILE NAME: the process in FILE is alive and is NAME (not a reused pid).
pid_alive() {
  [ -s "$1" ] || return 1
  local pid; pid=$(cat "$1")
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1; }

status() {
  [ -f "$CONF" ] || return 1
  scontrol ping 2>/dev/null | grep -q UP || return 1
  case "$(node_state)" in idle*|mixed*|allocated*|completing*) return 0 ;; *) return 1 ;; esac
}

lock() {
  mkdir -p "$DIR/leases"
  exec 9>"$DIR/.lock"
  flock -w 120 9 || die "another up/down holds $DIR/.lock"
}

live_leases() {
  local f name
  for f in "$DIR"/leases/*; do
    [ -e "$f" ] || continue
    name=$(basename "$f")
    if [ "$name" = manual ] || kill -0 "$name" 2>/dev/null; then echo "$name"; else rm -f "$f"; fi
  done
}

up() {
  lock
  touch "$DIR/leases/$LEASE"
  if status; then say "already up ($CONF)"; echo "export SLURM_CONF=$CONF"; return; fi
  install_packages
  start_munge
  write_conf
  if ! pid_alive "$DIR/slurmctld.pid" slurmctld; then
    "${SUDO[@]}" setsid slurmctld -i -f "$CONF" </dev/null >/dev/null 2>&1 9>&-
  fi
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
  scontrol ping 2>/dev/null | grep -q UP || { tail -20 "$DIR/log/slurmctld.log" >&2; die "slurmctld did not start"; }
  if ! pid_alive "$DIR/slurmd.pid" slurmd; then
    "${SUDO[@]}" setsid slurmd -f "$CONF" -N "$NODE" </dev/null >/dev/null 2>&1 9>&-
  fi
  local state=""
  for _ in $(seq 150); do
    state=$(node_state)
    case "$state" in
      idle*) break ;;
      down*|drain*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
  done
  case "$state" in idle*) ;; *)
    tail -20 "$DIR/log/slurmd.log" >&2 || true
    die "node $NODE is '$state', not idle (logs: $DIR/log)" ;;
  esac
  say "up: node $NODE, $CPUS CPUs, ${MEM} MB, partition debug; config $CONF"
  echo "export SLURM_CONF=$CONF"
}

stop_pidfile() {
  local f=$1 name=$2
  pid_alive "$f" "$name" || return 0
  local pid; pid=$(cat "$f")
  "${SUDO[@]}" kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  say "$name ($pid) ignored SIGTERM; sending SIGKILL"
  "${SUDO[@]}" kill -KILL "$pid" 2>/dev/null || true
}

down() {
  local force=${1:-}
  lock
  rm -f "$DIR/leases/$LEASE"
  [ -f "$CONF" ] || { say "not set up here ($DIR)"; return 0; }
  local others; others=$(live_leases | tr '\n' ' ')
  if [ -n "$others" ] && [ "$force" != --force ]; then
    say "still in use (leases: $others); left running. \`down --force\` stops it anyway."
    return 0
  fi
  if scontrol ping 2>/dev/null | grep -q UP; then
    # Jobs outlive slurmd: cancel them while it is still there to kill their processes.
    local jobs; jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  stop_pidfile "$DIR/slurmd.pid" slurmd
  stop_pidfile "$DIR/slurmctld.pid" slurmctld
  if [ -f "$DIR/munged.started-here" ]; then
    if pid_alive /run/munge/munged.pid munged; then
      "${SUDO[@]}" kill -TERM "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    fi
    rm -f "$DIR/munged.started-here"
  fi
  rm -rf "$DIR/state" "$DIR/spool" "$DIR/leases" "$CONF"
  say "down (logs kept in $DIR/log)"
}

case "${1:-}" in
  up) up ;;
  down) down "${2:-}" ;;
  status) if status; then say "up ($CONF)"; else say "not running"; exit 1; fi ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 {up|down|status|env}" >&2; exit 2 ;;
esac
