#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for `make test-cluster` (root only; no systemd needed).
#   scripts/slurm-local.sh install   Debian's slurm-wlm and munge (apt-get; skipped when present)
#   scripts/slurm-local.sh start     munged, slurmctld and slurmd, one node "localhost", one partition "local"
#   scripts/slurm-local.sh stop      stops what start started and removes the cluster's state
# Clients (sbatch, squeue, scontrol, submitit) need SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf in their environment.
# Every command is idempotent: start on a running cluster restarts it afresh, stop on a stopped one does nothing.
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/orpolab-slurm}"
CPUS="${SLURM_LOCAL_CPUS:-$(nproc)}"
WAIT_S="${SLURM_LOCAL_WAIT_S:-60}"
MUNGE_PID=/run/munge/munged.pid

die() { echo "error: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "a local Slurm cluster needs root (it installs packages and starts daemons)"; }

cmd_install() {
    need_root
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
    # 90% of the memory, in MB: jobs ask for a few GB (hydra.launcher.mem_gb), the node must offer them.
    local mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 9 / 10240 ))
    cat > "$DIR/slurm.conf" <<EOF
ClusterName=orpolab-local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# No systemd, no cgroups here: processes tracked through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# A test cluster: schedule every few seconds, and let a requeued job start again after 30 s instead of
# 120 (Slurm holds a requeued job for the credential lifetime, cred_expire).
SchedulerParameters=sched_interval=5,bf_interval=5
AuthInfo=cred_expire=30
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Finished jobs stay visible to scontrol for 10 minutes (the tests read their final state).
MinJobAge=600
SlurmctldPort=${SLURM_LOCAL_PORT:-6817}
SlurmdPort=$(( ${SLURM_LOCAL_PORT:-6817} + 1 ))
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_for() {  # wait_for <what> <command...>: bounded by WAIT_S seconds
    local what=$1; shift
    local deadline=$(( SECONDS + WAIT_S ))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "$what not ready after ${WAIT_S} s (logs in $DIR)"
        sleep 0.5
    done
}

cmd_start() {
    need_root
    command -v slurmctld >/dev/null || die "Slurm is not installed: run '$0 install' first"
    cmd_stop
    mkdir -p "$DIR/state" "$DIR/spool"
    write_conf
    export SLURM_CONF="$DIR/slurm.conf"
    # munge: the packaged key, its own user, the default socket that Slurm's auth/munge uses.
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    wait_for "munged" munge -n
    slurmctld -i
    wait_for "slurmctld" scontrol ping
    slurmd -N localhost
    wait_for "the node" bash -c "sinfo -h -N -o '%T' | grep -qE '^(idle|mixed|allocated)'"
    echo "Slurm is up: partition local, $CPUS CPUs; export SLURM_CONF=$SLURM_CONF"
}

stop_pidfile() {  # stop_pidfile <file>: TERM, then KILL after 10 s
    local file=$1 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

cmd_stop() {
    if [ -f "$DIR/slurm.conf" ] && [ -f "$DIR/slurmctld.pid" ]; then
        # Jobs first, so none outlives the cluster (bounded: the daemons are stopped next in any case).
        SLURM_CONF="$DIR/slurm.conf" timeout 10 scancel --full --quiet --partition local 2>/dev/null || true
    fi
    stop_pidfile "$DIR/slurmd.pid"
    stop_pidfile "$DIR/slurmctld.pid"
    stop_pidfile "$MUNGE_PID"
    rm -rf "$DIR"
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    *) die "usage: $0 install|start|stop" ;;
esac
