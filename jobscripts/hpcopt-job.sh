# Shared by the batch scripts in this directory: `source` it, don't run it. Copy it along with
# the .sbatch file you copy (they look for it next to themselves, or in $HPCOPT_JOBSCRIPTS).
#
# What it gives a batch script:
#   per_node_ranks                         one per GPU of a node (however they were asked for), else per task
#   place_ranks SERVERS WORKERS_PER_NODE   rank placement: servers first, on the first node
#   launch ARGS...                         start the MPI job (srun or mpirun) in the background
#   start_ompi_server RUN / stop_ompi_server   the rendezvous that lets other jobs join
#   wait_launched                          wait for the MPI job, also across trapped signals
#
# Knobs (environment variables, all optional):
#   HPCOPT      the hpcopt command                          (default: hpcopt on PATH)
#   LAUNCHER    srun (Slurm starts the ranks, PMIx) or mpirun (Open MPI starts them)  (default srun)
#   MPIRUN      the mpirun command                          (default: mpirun)

HPCOPT=${HPCOPT:-hpcopt}
LAUNCHER=${LAUNCHER:-srun}
MPIRUN=${MPIRUN:-mpirun}
export PYTHONUNBUFFERED=1  # progress lines reach the log as they are printed
# scancel and `scontrol requeue` send SIGTERM to every process of the job at once, mpirun
# included, which then kills its ranks after odls_base_sigkill_timeout (1 s by default): give the
# ranks time to leave or checkpoint (Slurm's KillWait, 30 s by default, bounds it anyway).
export OMPI_MCA_odls_base_sigkill_timeout=${OMPI_MCA_odls_base_sigkill_timeout:-20}

log() { echo "[$(date +%H:%M:%S) ${SLURM_JOB_ID:-}] $*"; }

# per_node_ranks: one rank per GPU of a node when the job has GPUs, else one per task. Slurm says
# how many GPUs a node has in different variables for --gpus-per-node ("a100:4" -> 4), --gres=gpu:N
# and --gpus-per-task (SLURM_GPUS_ON_NODE), or only as a list of ids (SLURM_JOB_GPUS="0,1,2,3").
per_node_ranks() {
    local gpus=${SLURM_GPUS_PER_NODE:-}
    gpus=${gpus##*:}
    [ -n "$gpus" ] || gpus=${SLURM_GPUS_ON_NODE:-}
    if [ -z "$gpus" ] && [ -n "${SLURM_JOB_GPUS:-}" ]; then
        local ids
        IFS=, read -ra ids <<<"$SLURM_JOB_GPUS"
        gpus=${#ids[@]}
    fi
    [ "${gpus:-0}" -gt 0 ] 2>/dev/null || gpus=${SLURM_NTASKS_PER_NODE:-1}
    echo "$gpus"
}

# place_ranks SERVERS WORKERS_PER_NODE
# Ranks 0..SERVERS-1 are the servers (hpcopt's rule) and go to the first node; then every node
# gets WORKERS_PER_NODE workers. Sets NODES (array), NRANKS, and the placement for either launcher:
# SLURM_HOSTFILE (one node name per rank, for srun --distribution=arbitrary) and MPI_HOSTS
# (node:slots,... for mpirun --host, filled in rank order). The servers take no GPU, so they ride on
# the first node's CPUs next to its workers (srun --overcommit).
place_ranks() {
    local servers=$1 per_node=$2 n i
    mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    NRANKS=$((servers + per_node * ${#NODES[@]}))
    HOSTFILE=$RUN/hosts.${SLURM_JOB_ID}
    : >"$HOSTFILE"
    MPI_HOSTS=""
    for n in "${NODES[@]}"; do
        local here=$per_node
        [ "$n" = "${NODES[0]}" ] && here=$((per_node + servers))
        for ((i = 0; i < here; i++)); do echo "$n" >>"$HOSTFILE"; done
        MPI_HOSTS+="${MPI_HOSTS:+,}$n:$here"
    done
    log "placement: $servers server rank(s) on ${NODES[0]}, then $per_node rank(s) on each of ${NODES[*]} ($NRANKS ranks)"
}

# launch ARGS...: run `$HPCOPT ARGS...` on NRANKS ranks placed by place_ranks, in the background
# (LAUNCH_PID), each rank's output in $RUN/logs/$SLURM_JOB_ID/ (rank-N.log with srun; Open MPI's
# 1/rank.N/stdout layout with mpirun). The job's own output shows server 0's progress lines too.
launch() {
    LOGDIR=$RUN/logs/${SLURM_JOB_ID}${SLURM_RESTART_COUNT:+.$SLURM_RESTART_COUNT}
    mkdir -p "$LOGDIR"
    local rank0
    case $LAUNCHER in
        srun)
            # Slurm starts every rank itself and wires them up through PMIx; srun forwards the
            # signals it gets (TERM, INT, USR1, USR2) to every rank.
            SLURM_HOSTFILE=$HOSTFILE srun --mpi=pmix --distribution=arbitrary --overcommit \
                --ntasks="$NRANKS" --kill-on-bad-exit=1 \
                --output="$LOGDIR/rank-%t.log" --error="$LOGDIR/rank-%t.log" \
                "$HPCOPT" "$@" &
            rank0=$LOGDIR/rank-0.log ;;
        mpirun)
            # mpirun starts one daemon per node through Slurm and the ranks under it; it forwards
            # USR1/USR2 to every rank (TERM it turns into TERM, then KILL, of every rank).
            # --oversubscribe: the servers share the first node's slots with its workers.
            local where=(--host "$MPI_HOSTS")
            # OMPI_MCA_plm=isolated: mpirun starts every rank on its own node, no placement (the
            # simulated cluster of tests/slurm/, whose "nodes" share one host; docs/slurm.md).
            [ "${OMPI_MCA_plm:-}" = isolated ] && where=()
            "$MPIRUN" -n "$NRANKS" "${where[@]}" --oversubscribe \
                --output-filename "$LOGDIR" \
                "$HPCOPT" "$@" &
            rank0="" ;;  # mpirun copies every rank's output to the job's output as well
        *) log "LAUNCHER must be srun or mpirun, not '$LAUNCHER'"; exit 2 ;;
    esac
    LAUNCH_PID=$!
    # srun: show server 0's progress lines in the job's output as they come.
    FOLLOW_PID=""
    [ -n "$rank0" ] || return 0
    ( for _ in $(seq 600); do [ -e "$rank0" ] && break; kill -0 "$LAUNCH_PID" 2>/dev/null || break; sleep 0.1; done
      [ -e "$rank0" ] && exec tail -n +1 --pid="$LAUNCH_PID" -F "$rank0" 2>/dev/null ) &
    FOLLOW_PID=$!
}

# wait_launched: wait for the MPI job to end and set LAUNCH_RC. `wait` returns early when the
# batch shell catches a trapped signal, so keep waiting until the launcher is really gone.
wait_launched() {
    LAUNCH_RC=0
    while kill -0 "$LAUNCH_PID" 2>/dev/null; do
        wait "$LAUNCH_PID" && LAUNCH_RC=0 || LAUNCH_RC=$?
    done
    [ -z "$FOLLOW_PID" ] || wait "$FOLLOW_PID" 2>/dev/null || true
    # Open MPI writes stderr next to stdout; show a failing server's error in the job's output.
    [ "$LAUNCH_RC" = 0 ] || tail -n 20 "$LOGDIR"/rank-0.log "$LOGDIR"/1/rank.0/stderr 2>/dev/null || true
}

# start_ompi_server RUN: the rendezvous point that lets separately started mpirun jobs (`hpcopt
# join`) connect to this one (Open MPI 4.1 needs it for MPI_Comm_accept/connect). Its URI goes to
# RUN/ompi-server.uri, where joiners find it, so RUN must be on a file system every node sees.
# Every mpirun involved must know it: OMPI_MCA_pmix_server_uri is exported for ours.
start_ompi_server() {
    local uri=$1/ompi-server.uri
    rm -f "$uri"
    ompi-server --no-daemonize -r "$uri" &
    OMPI_SERVER_PID=$!
    for _ in $(seq 100); do [ -s "$uri" ] && break; sleep 0.1; done
    if [ ! -s "$uri" ]; then log "ompi-server did not write $uri in 10 s; joins are off"; return 1; fi
    export OMPI_MCA_pmix_server_uri=file:$uri
    log "ompi-server up (pid $OMPI_SERVER_PID): other jobs can join with jobscripts/join.sbatch $1"
}

stop_ompi_server() {
    [ -n "${OMPI_SERVER_PID:-}" ] || return 0
    kill "$OMPI_SERVER_PID" 2>/dev/null || true
    wait "$OMPI_SERVER_PID" 2>/dev/null || true
}
