"""Run under `mpirun -n 5`: rank 0 is a real server (EASGD rule, comm.compress int8, recorder,
trajectory file); ranks 1-4 hostile workers that bypass the client. Worker 0 sends a compressed
exchange before any plain one (no reference in common); worker 1 makes one plain exchange, then
sends a compressed change whose block scale is NaN; worker 2 a compressed exchange header and,
instead of its payload, DONE; worker 3 two plain exchange headers back to back. The server must
drop all four, keep a finite center, and end normally (no hang, no abort). Prints OK on rank 0.
Argument: the directory for the trajectory file."""

import sys
import time

import numpy as np
import torch
from mpi4py import MPI

from hpcopt.comm import codec
from hpcopt.comm import protocol as P
from hpcopt.comm.client import CenterClient, Dropped
from hpcopt.comm.server import CenterServer
from hpcopt.config import CommConfig, RecordConfig
from hpcopt.io.recorder import Recorder
from hpcopt.io.trajectory import TrajectoryWriter
from hpcopt.optim.center import ElasticRule

N, ALPHA, FMT = 301, 0.25, "int8"


def main():
    world = MPI.COMM_WORLD
    assert world.size == 5, "run with mpirun -n 5"
    servers = world.Split(0 if world.rank == 0 else 1, world.rank)
    comm = CommConfig(timeout=30, worker_timeout=30, compress=FMT)
    if world.rank == 0:
        writer = TrajectoryWriter(f"{sys.argv[1]}/bad-compressed.h5", servers, n_params=N, lo=0, hi=N,
                                  shard_width=N, attrs={}, model_attrs={})
        start = time.monotonic()
        rule = ElasticRule(torch.from_numpy(np.linspace(-1, 1, N, dtype=np.float32)), ALPHA)
        recorder = Recorder(servers, writer, RecordConfig(center_every=1, worker_every=0, flush_seconds=3600,
                                                          eval_seconds=3600), bounds=[(0, N)], start=start,
                            center=rule.center.numpy())
        server = CenterServer(world=world, servers=servers, workers={w: (w + 1, "") for w in range(4)}, bounds=[(0, N)],
                              rule=rule, recorder=recorder, comm=comm, start=start)
        server.serve()
        assert server.crashed == 4 and np.isfinite(rule.center.numpy()).all(), server.crashed
        print("OK", flush=True)
        return
    wid = world.rank - 1
    payload = np.zeros(codec.payload_size(FMT, N), dtype=np.uint8)
    if wid in (1, 2):  # a plain exchange first: the server now shares a reference with it
        client = CenterClient([(world, 0)], [(0, N)], torch.ones(N), chunk=N, timeout=30, compress=FMT)
        client.exchange(P.make_header(P.EXCHANGE, wid, 1, 1))
        payload[:4] = np.array([np.nan], dtype=np.float32).view(np.uint8)  # block 0's scale
    if wid == 3:
        world.Send(P.make_header(P.EXCHANGE, wid, 1, 1), dest=0, tag=P.TAG_HEADER)
        world.Send(P.make_header(P.EXCHANGE, wid, 2, 2), dest=0, tag=P.TAG_HEADER)
    else:
        world.Send(P.make_header(P.EXCHANGE_Q, wid, 2, 2), dest=0, tag=P.TAG_HEADER)
        if wid == 2:
            world.Send(P.make_header(P.DONE, wid, 2), dest=0, tag=P.TAG_HEADER)
        else:
            world.Send(payload, dest=0, tag=P.TAG_PARAMS_Q)
    if wid in (1, 2):  # its client's standing receive takes the notice
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                client.poll_notices()
            except Dropped:
                return
            time.sleep(0.01)
        raise AssertionError(f"worker {wid} was not dropped")
    notice = np.zeros(P.NOTICE_SIZE)
    world.Recv(notice, source=0, tag=P.TAG_NOTICE)
    assert notice[0] == P.DROPPED, notice


if __name__ == "__main__":
    main()
