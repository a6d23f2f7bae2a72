"""Who am I, and how a failing rank takes the whole job down (never a hang).

Rank discovery follows submitit's habit: map launcher variables (Open MPI, PMI/PMIx, Slurm) to
names; none set means a single local process.
"""

from __future__ import annotations

import os
import socket
import sys
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


def install_abort_on_error(comm) -> None:
    """Any unhandled exception on any rank prints its traceback with the rank and aborts the
    whole MPI job (like `python -m mpi4py`), so the other ranks never wait for a dead one."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            previous(kind, value, tb)
        text = "".join(traceback.format_exception(kind, value, tb))
        sys.stderr.write(f"[hpcopt rank {comm.rank}] fatal error, aborting the job:\n{text}")
        sys.stderr.flush()
        try:
            comm.Abort(1)
        finally:
            os._exit(1)

    sys.excepthook = hook
