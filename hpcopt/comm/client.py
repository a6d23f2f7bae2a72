"""Worker side of an exchange with the center (sharded over the server ranks)."""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

from hpcopt.optim.easgd import worker_exchange_

from . import protocol as P
from hpcopt.launch.env import JobFatal

from .wait import BUSY_CAP, Backoff, PeerTimeout, wait_all


SEND_WINDOW = 2


class Dropped(RuntimeError):
    """A server gave up on this worker (it was silent beyond comm.worker_timeout)."""


class CenterLost(PeerTimeout, JobFatal):
    """A server did not answer within comm.timeout: without its shard of the center the run
    cannot go on, so this ends the whole job (not only this worker)."""


class CenterClient:
    """Sends the worker's flat parameters to the server ranks and moves toward the center
    values they send back. `links[s]` is (communicator, rank) of the server owning shard s: a
    worker started with the training reaches them on MPI.COMM_WORLD, a joined worker on the
    intercommunicators of its join. Every wait has `timeout`."""

    def __init__(self, links: list[tuple[MPI.Comm, int]], bounds: list[tuple[int, int]],
                 params: torch.Tensor, *, alpha: float, chunk: int, timeout: float,
                 layer_norms: np.ndarray | None = None):
        if params.device.type != "cpu" or not params.is_contiguous():
            raise ValueError("exchanges need a contiguous CPU parameter buffer")
        self.links, self.bounds, self.timeout = links, bounds, timeout
        self.alpha = float(alpha)
        self.params = params
        self.x = params.numpy()  # shares memory with params: sends copy nothing
        self.center = torch.empty_like(params)  # the center's values as the servers send them
        self.c = self.center.numpy()
        self.chunks = [P.chunk_bounds(lo, hi, chunk) for lo, hi in bounds]
        self.last_sent = time.monotonic()
        # a standing receive per server for its notices (stop, dropped)
        self._notice = [np.zeros(P.NOTICE_SIZE) for _ in links]
        self._notice_reqs = [comm.Irecv(buf, source=rank, tag=P.TAG_NOTICE)
                             for (comm, rank), buf in zip(links, self._notice)]
        self.stop_requested = False
        # LGRAWA: per-layer gradient norms (float64, filled by the local trainer) that every
        # exchange ships to every server after its header (protocol step 2)
        self.layer_norms = layer_norms

    # ------------------------------------------------------------------ notices
    def poll_notices(self) -> bool:
        """True once a server has asked this worker to stop (the run is ending). Raises Dropped
        if a server has given up on it."""
        for i, req in enumerate(self._notice_reqs):
            if req is not None and req.Test():
                self._notice_reqs[i] = None
                if self._notice[i][0] == P.DROPPED:
                    raise Dropped(f"server {i} dropped this worker: it was silent for longer than "
                                  f"comm.worker_timeout (a step slower than that needs a larger value)")
                self.stop_requested = True
        return self.stop_requested

    def heartbeat(self, worker_id: int, step: int, every: float) -> None:
        """Tell the servers this worker is alive if it has sent nothing for `every` seconds."""
        if time.monotonic() - self.last_sent < every:
            return
        self._headers(P.make_header(P.HEARTBEAT, worker_id, step))

    def _headers(self, header: np.ndarray) -> None:
        reqs = [comm.Isend(header, dest=rank, tag=P.TAG_HEADER) for comm, rank in self.links]
        try:
            wait_all(reqs, self.timeout, "the servers to take a header")
        except PeerTimeout as e:
            raise CenterLost(str(e)) from None
        self.last_sent = time.monotonic()

    # ------------------------------------------------------------------ exchanges
    def exchange(self, header: np.ndarray) -> None:
        """One elastic exchange: x <- x - alpha (x - center) on every shard, with the center as
        the servers send it back (they move it by the opposite amount). Each reply chunk is
        applied as soon as it is in, while later chunks are still travelling."""
        self._transfer(header, send=True, alpha=self.alpha)

    def fetch(self, header: np.ndarray) -> None:
        """x <- center (a FETCH when joining, a RESET after divergence): the servers send the
        center and do not move it."""
        self._transfer(header, send=False, alpha=1.0)

    def _transfer(self, header: np.ndarray, *, send: bool, alpha: float) -> None:
        items = [(s, a, b) for s, chunks in enumerate(self.chunks) for a, b in chunks]
        recvs = [self.links[s][0].Irecv(self.c[a:b], source=self.links[s][1], tag=P.TAG_REPLY)
                 for s, a, b in items]
        headers = [comm.Isend(header, dest=rank, tag=P.TAG_HEADER) for comm, rank in self.links]
        if send and self.layer_norms is not None:
            headers += [comm.Isend(self.layer_norms, dest=rank, tag=P.TAG_LAYER_NORMS) for comm, rank in self.links]
        # At most SEND_WINDOW chunks in flight per server: a backlog of rendezvous sends would
        # clog the shared-memory queues the replies come back through.
        sends: list = [None] * len(items)
        sent = [not send] * len(items)
        servers = range(len(self.links))
        queue = {s: [i for i, it in enumerate(items) if it[0] == s] if send else [] for s in servers}
        flying: dict[int, list[int]] = {s: [] for s in servers}

        def post(s):
            comm, rank = self.links[s]
            while queue[s] and len(flying[s]) < SEND_WINDOW:
                i = queue[s].pop(0)
                _, a, b = items[i]
                sends[i] = comm.Isend(self.x[a:b], dest=rank, tag=P.TAG_PARAMS)
                flying[s].append(i)

        for s in servers:
            post(s)
        todo = list(range(len(items)))
        deadline = time.monotonic() + self.timeout
        backoff = Backoff(cap=BUSY_CAP)
        while todo:
            progress = False
            for s in servers:
                for i in flying[s][:]:
                    if sends[i].Test():
                        sent[i] = True
                        flying[s].remove(i)
                        progress = True
                post(s)
            # Apply replies in order, each as soon as it is in; testing only the next one keeps
            # MPI from copying in every other reply first (each Test progresses all transfers).
            # x[a:b] may change only once its own send is complete.
            while todo and sent[todo[0]] and recvs[todo[0]].Test():
                _, a, b = items[todo.pop(0)]
                worker_exchange_(self.params[a:b], self.center[a:b], alpha)
                progress = True
            if progress:
                backoff.reset()
            elif time.monotonic() > deadline:
                for r in recvs + [r for r in sends if r is not None]:
                    if r != MPI.REQUEST_NULL:
                        r.Cancel()
                self.poll_notices()  # a server that dropped us says so: a clearer error
                raise CenterLost(f"no reply from the center (servers {list(servers)}) "
                                 f"within {self.timeout:g} s (comm.timeout)")
            else:
                if not progress and any(r is not None for r in self._notice_reqs):
                    self.poll_notices()
                backoff.idle()
        try:
            wait_all(headers, self.timeout, "the servers to take the exchange header")
        except PeerTimeout as e:
            raise CenterLost(str(e)) from None
        self.last_sent = time.monotonic()

    def done(self, worker_id: int, step: int, reason: int = P.FINISHED) -> None:
        """Tell every server this worker has stopped, and why."""
        self._headers(P.make_header(P.DONE, worker_id, step, reason=reason))
        for req in self._notice_reqs:
            if req is not None:
                req.Cancel()
