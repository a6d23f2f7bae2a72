"""Exchanges through shared memory, between a worker and a server on the same node.

Over messages an exchange moves the worker's parameters into the server's receive buffer and
back (each way one copy through Open MPI's shared-memory transport), besides the server's read
and write of the center. On a node whose memory bandwidth one core nearly saturates, that extra
traffic is what bounds an exchange (benchmarks/exchange.py prints the pieces). So a worker that
shares a node with a server keeps its flat parameters in an MPI-3 shared-memory window
(MPI_Win_allocate_shared over the node's ranks), and that server applies the elastic update to
them in place: the worker sends only its header and waits for a one-number "done" (protocol.py),
and the bytes of the exchange are read and written once, where they live.

Only ranks started together (one MPI_COMM_WORLD) can share a window: workers that joined later,
and workers on other nodes, exchange over messages as before. The window is never freed: freeing
it is collective over the node, and a crashed worker would hang the others; its memory goes with
the processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from mpi4py import MPI


@dataclass
class NodeShare:
    """What one rank of the training job has of its node's shared-memory window."""
    win: MPI.Win | None = None
    # worker: its flat parameters, in the window; None when it shares no node with a server
    params: torch.Tensor | None = None
    # worker: the servers (indices) on its node, which exchange with it in place
    servers: set[int] = field(default_factory=set)
    # server: world rank -> that worker's whole flat parameter vector (a view into its window)
    workers: dict[int, np.ndarray] = field(default_factory=dict)
    why_not: str = ""  # why this node does not share, when that is worth saying

    def sync(self) -> None:
        """A memory barrier for the window (MPI_Win_sync): around the messages that hand the
        parameters from worker to server and back, so each side sees the other's writes."""
        if self.win is not None:
            self.win.Sync()

    def close(self) -> None:
        """Free the window: collective over the node, so only where every rank is known to be
        alive (benchmarks, tests); a training leaves it to process exit."""
        if self.win is not None:
            self.win.Unlock_all()
            self.win.Free()
            self.win, self.params, self.workers = None, None, {}


def share_node(world: MPI.Comm, n_servers: int, n_params: int, enabled: bool = True) -> NodeShare:
    """Collective over `world` (the training job): on every node that has a server rank, each
    worker allocates its parameter vector in a window shared with the node's ranks (servers
    allocate nothing). Ranks 0..n_servers-1 of `world` are the servers."""
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    members = node.allgather(world.rank)  # node rank -> world rank
    is_server = world.rank < n_servers
    if not enabled or not any(r < n_servers for r in members) or all(r < n_servers for r in members):
        node.Free()
        return NodeShare()
    # The window is a file in Open MPI's backing directory (/dev/shm); where that is too small
    # (a container's 64 MB /dev/shm) its pages would fault when touched: use messages instead.
    need = 4 * n_params * sum(r >= n_servers for r in members)
    why_not = node.bcast(_no_room(need) if node.rank == 0 else None, root=0)
    if why_not:
        node.Free()
        return NodeShare(why_not=why_not)
    info = MPI.Info.Create()
    info.Set("alloc_shared_noncontig", "true")  # each worker's vector page-aligned, in its own pages
    size = 0 if is_server else 4 * n_params
    win = MPI.Win.Allocate_shared(size, 4, info, comm=node)
    info.Free()
    win.Lock_all(MPI.MODE_NOCHECK)  # one passive epoch for the run: Win.Sync needs one
    share = NodeShare(win=win)
    if is_server:
        for node_rank, r in enumerate(members):
            if r >= n_servers:
                buf, _ = win.Shared_query(node_rank)
                share.workers[r] = np.frombuffer(buf, dtype=np.float32, count=n_params)
    else:
        buf, _ = win.Shared_query(node.rank)
        share.params = torch.from_numpy(np.frombuffer(buf, dtype=np.float32, count=n_params))
        share.servers = {r for r in members if r < n_servers}
    node.Free()
    return share


def _no_room(need: int) -> str:
    """Why the window would not fit where Open MPI puts it ("" if it fits)."""
    where = os.environ.get("OMPI_MCA_osc_sm_backing_directory", "/dev/shm")
    try:
        st = os.statvfs(where)
    except OSError:
        return ""  # another MPI, or another place: let it try
    free = st.f_bavail * st.f_frsize
    if free < need + (64 << 20):
        return (f"{where} has {free / 1e6:.0f} MB free, the workers' parameters need {need / 1e6:.0f} MB "
                f"(enlarge it, e.g. docker --shm-size)")
    return ""
