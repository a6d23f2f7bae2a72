"""Worker side of an exchange with the center (sharded over the server ranks)."""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

from hpcopt.optim.easgd import worker_exchange_

from . import protocol as P
from .wait import BUSY_CAP, Backoff, PeerTimeout, wait_all


SEND_WINDOW = 2


class CenterClient:
    """Sends the worker's flat parameters to the server ranks and moves toward the center
    values they send back. Point-to-point on `comm`; every wait has `timeout`."""

    def __init__(self, comm: MPI.Comm, servers: list[int], bounds: list[tuple[int, int]],
                 params: torch.Tensor, *, alpha: float, chunk: int, timeout: float):
        if params.device.type != "cpu" or not params.is_contiguous():
            raise ValueError("exchanges need a contiguous CPU parameter buffer")
        self.comm, self.servers, self.bounds, self.timeout = comm, servers, bounds, timeout
        self.alpha = float(alpha)
        self.params = params
        self.x = params.numpy()  # shares memory with params: sends copy nothing
        self.center = torch.empty_like(params)  # the center's values as the servers send them
        self.c = self.center.numpy()
        self.chunks = [P.chunk_bounds(lo, hi, chunk) for lo, hi in bounds]

    def exchange(self, header: np.ndarray) -> None:
        """One elastic exchange: x <- x - alpha (x - center) on every shard, with the center as
        the servers send it back (they move it by the opposite amount). Each reply chunk is
        applied as soon as it is in, while later chunks are still travelling."""
        items = [(server, a, b) for server, chunks in zip(self.servers, self.chunks) for a, b in chunks]
        recvs = [self.comm.Irecv(self.c[a:b], source=server, tag=P.TAG_REPLY) for server, a, b in items]
        headers = [self.comm.Isend(header, dest=server, tag=P.TAG_HEADER) for server in self.servers]
        # At most SEND_WINDOW chunks in flight per server: a backlog of rendezvous sends would
        # clog the shared-memory queues the replies come back through.
        sends: list = [None] * len(items)
        sent = [False] * len(items)
        queue = {s: [i for i, it in enumerate(items) if it[0] == s] for s in self.servers}
        flying: dict[int, list[int]] = {s: [] for s in self.servers}

        def post(server):
            while queue[server] and len(flying[server]) < SEND_WINDOW:
                i = queue[server].pop(0)
                _, a, b = items[i]
                sends[i] = self.comm.Isend(self.x[a:b], dest=server, tag=P.TAG_PARAMS)
                flying[server].append(i)

        for server in self.servers:
            post(server)
        todo = list(range(len(items)))
        deadline = time.monotonic() + self.timeout
        backoff = Backoff(cap=BUSY_CAP)
        while todo:
            progress = False
            for server in self.servers:
                for i in flying[server][:]:
                    if sends[i].Test():
                        sent[i] = True
                        flying[server].remove(i)
                        progress = True
                post(server)
            # Apply replies in order, each as soon as it is in; testing only the next one keeps
            # MPI from copying in every other reply first (each Test progresses all transfers).
            # x[a:b] may change only once its own send is complete.
            while todo and sent[todo[0]] and recvs[todo[0]].Test():
                _, a, b = items[todo.pop(0)]
                worker_exchange_(self.params[a:b], self.center[a:b], self.alpha)
                progress = True
            if progress:
                backoff.reset()
            elif time.monotonic() > deadline:
                for r in recvs + [r for r in sends if r is not None]:
                    if r != MPI.REQUEST_NULL:
                        r.Cancel()
                raise PeerTimeout(f"no reply from the center (server ranks {self.servers}) "
                                  f"within {self.timeout:g} s (comm.timeout)")
            else:
                backoff.idle()
        wait_all(headers, self.timeout, f"server ranks {self.servers} to take the exchange header")

    def done(self, worker_id: int, step: int) -> None:
        """Tell every server this worker has finished."""
        header = P.make_header(P.DONE, worker_id, step)
        reqs = [self.comm.Isend(header, dest=s, tag=P.TAG_HEADER) for s in self.servers]
        wait_all(reqs, self.timeout, f"server ranks {self.servers} to take the DONE message")
