#!/usr/bin/env bash
# A real Slurm 22.05 "cluster" of three simulated nodes (n1, n2, n3) on this one machine, for the
# tests in tests/slurm/ and for trying the batch scripts in jobscripts/ by hand.
#
#   tests/slurm/cluster.sh start     # install (apt, as root) if missing, start munged, slurmctld, 3 slurmd
#   source /tmp/hpcopt-slurm/env.sh  # SLURM_CONF and the Open MPI settings the simulated nodes need
#   sbatch -N 2 jobscripts/train.sbatch runs/slurm-demo
#   tests/slurm/cluster.sh status    # daemons and `sinfo`
#   tests/slurm/cluster.sh stop      # cancel the jobs, stop every daemon this script started
#
# Everything it writes (config, munge key and socket, state, spool, logs, pid files) lives under
# $HPCOPT_SLURM_DIR (default /tmp/hpcopt-slurm); nothing in /etc is changed. Its own munged runs on
# its own socket, so a munged or slurmctld already running on the machine is left alone. Ports:
# slurmctld $HPCOPT_SLURM_PORT (default 16817), slurmd n1..n3 on the next three.
#
# Why the settings (see also docs/slurm.md): the three slurmd share one host, so each has its own
# port, spool directory and name (-N); they are declared with 4 CPUs each whatever this machine
# has (config_overrides: a node that registers with fewer CPUs than configured would be drained);
# proctrack/linuxproc and task/none need no cgroups, which containers often lack; SlurmUser=root
# because the tests run as root.
set -euo pipefail

DIR=${HPCOPT_SLURM_DIR:-/tmp/hpcopt-slurm}
PORT=${HPCOPT_SLURM_PORT:-16817}
NODES=(n1 n2 n3)
CPUS_PER_NODE=${HPCOPT_SLURM_CPUS:-4}
START_TIMEOUT=${HPCOPT_SLURM_START_TIMEOUT:-60}  # seconds until every node must be idle
CONF=$DIR/etc/slurm.conf
SOCKET=$DIR/munge/munge.socket

say() { echo "cluster.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

# --- install ---------------------------------------------------------------------------------
have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && command -v munged >/dev/null; }

install() {
    have_slurm && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        die "Slurm is not installed (slurmctld, slurmd, sbatch, munged) and I cannot install it: run as root on Debian/Ubuntu, or install slurm-wlm and munge"
    fi
    say "installing slurm-wlm and munge with apt-get (a minute or two)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
    have_slurm || die "apt-get install slurm-wlm munge did not give slurmctld, slurmd, sbatch and munged"
}

# --- config ----------------------------------------------------------------------------------
write_config() {
    local host; host=$(hostname -s)
    mkdir -p "$DIR"/{etc,munge,state,log,run,tmp,spool}
    chmod 700 "$DIR/munge"
    if [ ! -s "$DIR/munge/munge.key" ]; then
        # munged wants a key only its user can read; 1024 random bytes as DESIGN.md says
        head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
        chmod 400 "$DIR/munge/munge.key"
    fi
    local i=0 nodelines=""
    for n in "${NODES[@]}"; do
        i=$((i + 1))
        nodelines+="NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$CPUS_PER_NODE RealMemory=2000 State=UNKNOWN"$'\n'
    done
    cat >"$CONF" <<EOF
# Written by tests/slurm/cluster.sh: a three-node Slurm on one host (see docs/slurm.md).
ClusterName=hpcopt
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a job credential's lifetime, and also how long a requeued job waits before it may
# start again (default 120 s). Forcing an earlier start (scontrol update starttime=now) can reach a
# node that still holds the revoked credential of the job's previous start: the launch then fails
# and the job ends FAILED (seen once in CI). 10 s keeps the requeue tests short and honest.
AuthInfo=socket=$SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
TmpFS=$DIR/tmp/%n
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# Finished jobs stay visible to scontrol for a while; the tests read their state.
MinJobAge=300
KillWait=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
$nodelines
PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=60 State=UP
EOF
    cat >"$DIR/env.sh" <<EOF
# source this file to use the local test cluster (written by tests/slurm/cluster.sh)
export SLURM_CONF=$CONF
# The simulated nodes share one host: Open MPI's shared-memory transport would mix ranks of
# different "nodes" up (it crashes), so MPI goes over TCP. A real cluster needs none of this.
export OMPI_MCA_btl=self,tcp
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
EOF
}

# --- daemons ---------------------------------------------------------------------------------
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    pid_alive "$DIR/run/munged.pid" && return 0
    rm -f "$SOCKET" "$SOCKET.lock"
    # --force: munged refuses to run as root, or with a key/socket outside its usual directories,
    # unless told; the key and socket here are private to the harness directory.
    munged --force --socket="$SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" 2>>"$DIR/log/munged.err" \
        || die "munged did not start: $(tail -5 "$DIR/log/munged.err" "$DIR/log/munged.log" 2>/dev/null)"
    munge --socket="$SOCKET" -n </dev/null | unmunge --socket="$SOCKET" >/dev/null \
        || die "munge does not work on $SOCKET; see $DIR/log/munged.log"
}

start_slurm() {
    export SLURM_CONF=$CONF
    if ! pid_alive "$DIR/run/slurmctld.pid"; then
        slurmctld -f "$CONF" 2>>"$DIR/log/slurmctld.err" || die "slurmctld did not start: $(tail -5 "$DIR/log/slurmctld.log" "$DIR/log/slurmctld.err" 2>/dev/null)"
    fi
    for n in "${NODES[@]}"; do
        mkdir -p "$DIR/spool/$n" "$DIR/tmp/$n"
        if ! pid_alive "$DIR/run/slurmd-$n.pid"; then
            slurmd -f "$CONF" -N "$n" 2>>"$DIR/log/slurmd-$n.err" || die "slurmd -N $n did not start: $(tail -5 "$DIR/log/slurmd-$n.log" 2>/dev/null)"
        fi
    done
}

wait_idle() {
    export SLURM_CONF=$CONF
    local deadline=$((SECONDS + START_TIMEOUT)) states
    while :; do
        states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)
        # A node that registered before (or with fewer CPUs) can come back drained or down: resume it.
        for n in $(awk '$2 ~ /^(drain|drng|down|fail)/ {print $1}' <<<"$states"); do
            scontrol update nodename="$n" state=resume 2>/dev/null || true
        done
        if [ -n "$states" ] && [ "$(awk '$2 !~ /^(idle|mix|alloc)$/' <<<"$states" | wc -l)" = 0 ] \
            && [ "$(wc -l <<<"$states")" = "${#NODES[@]}" ]; then
            return 0
        fi
        if [ $SECONDS -ge $deadline ]; then
            say "nodes not idle after ${START_TIMEOUT}s:"; echo "$states" >&2
            tail -5 "$DIR"/log/*.log >&2 || true
            return 1
        fi
        sleep 0.5
    done
}

stop_pidfile() {  # stop_pidfile FILE NAME: TERM, then KILL after 10 s
    local f=$1 pid
    pid_alive "$f" || { rm -f "$f"; return 0; }
    pid=$(cat "$f")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then say "$2 (pid $pid) ignored SIGTERM; killing it"; kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$f"
}

cmd_start() {
    local t0=$SECONDS
    install
    write_config
    start_munge
    start_slurm
    wait_idle || die "the cluster did not come up; logs in $DIR/log"
    say "up in $((SECONDS - t0))s: $(sinfo -h -o '%P %D nodes %t' | tr '\n' ' ')— source $DIR/env.sh to use it"
}

cmd_stop() {
    export SLURM_CONF=$CONF
    if pid_alive "$DIR/run/slurmctld.pid"; then
        # Cancel every job first so the slurmstepd processes end with them.
        scancel --full --user="$(id -un)" 2>/dev/null || true
        local deadline=$((SECONDS + 40))
        while [ -n "$(squeue -h -o %i 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] || say "jobs still listed after 40 s: $(squeue -h -o '%i %T' | tr '\n' ' ')"
    fi
    for n in "${NODES[@]}"; do stop_pidfile "$DIR/run/slurmd-$n.pid" "slurmd $n"; done
    stop_pidfile "$DIR/run/slurmctld.pid" slurmctld
    stop_pidfile "$DIR/run/munged.pid" munged
    say "stopped"
}

cmd_status() {
    local rc=0
    for f in munged slurmctld "${NODES[@]/#/slurmd-}"; do
        if pid_alive "$DIR/run/$f.pid"; then echo "$f: running (pid $(cat "$DIR/run/$f.pid"))"; else echo "$f: not running"; rc=1; fi
    done
    if [ $rc = 0 ]; then SLURM_CONF=$CONF sinfo -N -o '%N %P %t %c'; fi
    return $rc
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    install) install ;;
    *) echo "usage: $0 start|stop|status|install   (directory: $DIR)" >&2; exit 2 ;;
esac
