"""Who am I, and how a failing rank takes the whole job down (never a hang).

Rank discovery follows submitit's habit: map launcher variables (Open MPI, PMI/PMIx, Slurm) to
names; none set means a single local process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import traceback
from dataclasses import dataclass

_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMIX_LOCAL_RANK", "SLURM_LOCALID")


@dataclass(frozen=True)
class Environment:
    rank: int
    size: int
    local_rank: int
    host: str

    @classmethod
    def from_mpi(cls, comm) -> "Environment":
        local = next((int(os.environ[v]) for v in _LOCAL_RANK_VARS if v in os.environ), 0)
        return cls(rank=comm.rank, size=comm.size, local_rank=local, host=socket.gethostname())


class JobFatal(RuntimeError):
    """An error that ends the whole job even when raised on a worker (e.g. its server is gone)."""


def record_outcome(code: int) -> None:
    """Under `hpcopt train -n` (HPCOPT_OUTCOME names a folder): leave this rank's exit status
    there. Open MPI's recovery mode, which keeps a run alive when a worker dies, also makes
    mpirun exit 0 whatever the ranks did; the launcher reads server 0's status from here."""
    _mark("", f"{int(code)}\n")


def _mark(folder: str, text: str = "") -> None:
    """Under `hpcopt train -n`: OUTCOME/folder/RANK holding `text`, a record for the launcher.
    Never OUTCOME itself: the launcher removes it when the job is over, and a late rank must not
    leave it behind."""
    where, rank = os.environ.get("HPCOPT_OUTCOME"), os.environ.get("OMPI_COMM_WORLD_RANK")
    if not where or rank is None:
        return
    try:
        try:
            os.mkdir(os.path.join(where, folder))
        except FileExistsError:
            pass
        with open(os.path.join(where, folder, rank), "w") as f:
            f.write(text)
    except OSError:
        pass  # (unwatched then, or watched as essential: never a failure of the run itself)


def record_started() -> None:
    """First thing on every rank (before MPI_Init): OUTCOME/started/RANK holds "pid host". The
    launcher watches every started rank: the setup is collective, and one rank's death would
    leave the others in it."""
    _mark("started", f"{os.getpid()} {socket.gethostname()}\n")


def record_set_up() -> None:
    """On an asynchronous worker past the setup barrier: OUTCOME/ready/RANK. The launcher stops
    watching it: from now on its death costs that worker only."""
    _mark("ready")


def record_essential(ranks: dict[int, tuple[int, str, str]], *, resumable: bool) -> None:
    """Under `hpcopt train -n`, once the setup is over (rank 0): what the ranks whose death ends
    the run are (the servers; every rank of a synchronous run), {rank: (pid, host, what it is)},
    and whether `--resume` can go on after one dies (not for a synchronous run): the launcher's
    words when one dies. (Which ranks it watches: every started one but the workers set up.)"""
    import json

    where = os.environ.get("HPCOPT_OUTCOME")
    if not where:
        return
    try:
        tmp = os.path.join(where, f".essential.{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump({"resumable": resumable,
                       "ranks": {str(r): [int(pid), host, what] for r, (pid, host, what) in ranks.items()}}, f)
        os.replace(tmp, os.path.join(where, "essential.json"))
    except OSError:
        pass  # (then the launcher says "rank N" and advises as for a death during the setup)


def _ask_launcher_to_end_job() -> None:
    """With Open MPI's recovery mode on (OMPI_MCA_orte_enable_recovery, set by `hpcopt train -n`),
    neither MPI_Abort nor a rank's death ends the other ranks: ask the launcher (this rank's
    parent: mpirun or orted) to end the job."""
    if os.environ.get("OMPI_MCA_orte_enable_recovery", "0").lower() in ("1", "true", "yes"):
        parent = os.getppid()
        with open(f"/proc/{parent}/comm") as f:
            if f.read().strip() in ("mpirun", "orterun", "orted", "mpiexec"):
                os.kill(parent, signal.SIGTERM)


def abort_job(comm) -> None:
    """End every rank of the job now."""
    try:
        _ask_launcher_to_end_job()
        comm.Abort(1)
    finally:
        os._exit(1)


@contextlib.contextmanager
def watchdog(seconds: float, what: str, limit: str = "comm.timeout"):
    """End this process, and the job, if the block has not completed after `seconds`: for
    collective calls with no deadline of their own (MPI-IO, HDF5), which a dead peer would hang
    forever. From a timer thread, so no MPI call (the main thread is inside one): the launcher
    is asked to end the job, and this rank exits; plain mpirun ends a job whose rank exits
    without finalising, and every other rank that waits has a watchdog or a deadline too."""
    def fire():
        try:
            sys.stderr.write(f"[hpcopt {socket.gethostname()} pid {os.getpid()}] {what} did not complete within "
                             f"{seconds:g} s ({limit}): another rank is dead or the file system hangs; "
                             f"ending the job\n")
            sys.stderr.flush()
            record_outcome(1)
            _ask_launcher_to_end_job()
        finally:
            os._exit(1)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def install_abort_on_error(comm, *, whole_job: bool = True) -> None:
    """Any unhandled exception prints its traceback with the rank, then:

    - whole_job (servers, synchronous ranks, setup): aborts the whole MPI job (like `python -m
      mpi4py`), so no rank waits for a dead one (abort_job);
    - otherwise (an asynchronous worker): only this process exits, with status 1; the servers
      drop it as crashed and training goes on (under recovery mode, or the launcher ends the job).
      A JobFatal error (its server is gone) still ends the whole job.
    """
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            previous(kind, value, tb)
        text = "".join(traceback.format_exception(kind, value, tb))
        fatal = whole_job or issubclass(kind, JobFatal)
        what = "aborting the job" if fatal else "this worker exits; the others go on"
        sys.stderr.write(f"[hpcopt rank {comm.rank}] fatal error, {what}:\n{text}")
        sys.stderr.flush()
        sys.stdout.flush()
        record_outcome(1)
        if not fatal:
            os._exit(1)
        abort_job(comm)

    sys.excepthook = hook
