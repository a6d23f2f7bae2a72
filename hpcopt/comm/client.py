"""Worker side of an exchange with the center (sharded over the server ranks)."""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

from hpcopt.optim.easgd import worker_exchange_

from . import protocol as P
from .wait import BUSY_CAP, Backoff, PeerTimeout, wait_all


class CenterClient:
    """Sends the worker's flat parameters to the server ranks and applies the elastic
    difference they send back. Point-to-point on `comm`; every wait has `timeout`."""

    def __init__(self, comm: MPI.Comm, servers: list[int], bounds: list[tuple[int, int]],
                 params: torch.Tensor, *, alpha: float, chunk: int, timeout: float):
        if params.device.type != "cpu" or not params.is_contiguous():
            raise ValueError("exchanges need a contiguous CPU parameter buffer")
        self.comm, self.servers, self.bounds, self.timeout = comm, servers, bounds, timeout
        self.alpha = float(alpha)
        self.params = params
        self.x = params.numpy()  # shares memory with params: sends copy nothing
        self.diff = torch.empty_like(params)
        self.d = self.diff.numpy()
        self.chunks = [P.chunk_bounds(lo, hi, chunk) for lo, hi in bounds]
        self.bytes_per_exchange = 2 * self.x.nbytes + len(servers) * P.HEADER_SIZE * 8

    def exchange(self, header: np.ndarray) -> None:
        """One elastic exchange: x <- x - alpha (x - center) on every shard.
        The servers update the center by the opposite amount. Each reply chunk is applied as
        soon as it is in (and its own send is done), while later chunks are still travelling."""
        recvs, sends, spans, headers = [], [], [], []
        for server, chunks in zip(self.servers, self.chunks):
            for a, b in chunks:
                recvs.append(self.comm.Irecv(self.d[a:b], source=server, tag=P.TAG_REPLY))
                spans.append((a, b))
        for server, chunks in zip(self.servers, self.chunks):
            headers.append(self.comm.Isend(header, dest=server, tag=P.TAG_HEADER))
            for a, b in chunks:
                sends.append(self.comm.Isend(self.x[a:b], dest=server, tag=P.TAG_PARAMS))
        todo = list(range(len(spans)))
        deadline = time.monotonic() + self.timeout
        backoff = Backoff(cap=BUSY_CAP)
        while todo:
            # x[a:b] may change only once its send is complete and its reply is in
            done = [i for i in todo if recvs[i].Test() and sends[i].Test()]
            for i in done:
                a, b = spans[i]
                worker_exchange_(self.params[a:b], self.diff[a:b], self.alpha)
            if done:
                todo = [i for i in todo if i not in done]
                backoff.reset()
            elif time.monotonic() > deadline:
                for i in todo:
                    for r in (recvs[i], sends[i]):
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
