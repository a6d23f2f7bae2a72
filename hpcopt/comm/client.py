"""Worker side of an exchange with the center (sharded over the server ranks)."""

from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

from hpcopt.optim.easgd import worker_exchange_

from . import protocol as P
from .wait import wait_all


class CenterClient:
    """Sends the worker's flat parameters to the server ranks and applies the elastic
    difference they send back. Point-to-point on `comm`; every wait has `timeout`."""

    def __init__(self, comm: MPI.Comm, servers: list[int], bounds: list[tuple[int, int]],
                 params: torch.Tensor, *, chunk: int, timeout: float):
        if params.device.type != "cpu" or not params.is_contiguous():
            raise ValueError("exchanges need a contiguous CPU parameter buffer")
        self.comm, self.servers, self.bounds, self.timeout = comm, servers, bounds, timeout
        self.params = params
        self.x = params.numpy()  # shares memory with params: sends copy nothing
        self.diff = torch.empty_like(params)
        self.d = self.diff.numpy()
        self.chunks = [P.chunk_bounds(lo, hi, chunk) for lo, hi in bounds]
        self.bytes_per_exchange = 2 * self.x.nbytes + len(servers) * P.HEADER_SIZE * 8

    def exchange(self, header: np.ndarray) -> None:
        """One elastic exchange: x <- x - alpha (x - center) on every shard.
        The servers update the center by the opposite amount."""
        reqs = []
        for server, chunks in zip(self.servers, self.chunks):
            for a, b in chunks:
                reqs.append(self.comm.Irecv(self.d[a:b], source=server, tag=P.TAG_REPLY))
        for server, chunks in zip(self.servers, self.chunks):
            reqs.append(self.comm.Isend(header, dest=server, tag=P.TAG_HEADER))
            for a, b in chunks:
                reqs.append(self.comm.Isend(self.x[a:b], dest=server, tag=P.TAG_PARAMS))
        wait_all(reqs, self.timeout, f"the center's reply (server ranks {self.servers})")
        worker_exchange_(self.params, self.diff)

    def done(self, worker_id: int, step: int) -> None:
        """Tell every server this worker has finished."""
        header = P.make_header(P.DONE, worker_id, step)
        reqs = [self.comm.Isend(header, dest=s, tag=P.TAG_HEADER) for s in self.servers]
        wait_all(reqs, self.timeout, f"server ranks {self.servers} to take the DONE message")
