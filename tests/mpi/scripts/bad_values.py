"""Run under `mpirun -n 2`: rank 0 is a real server (EASGD rule, recorder, trajectory file),
rank 1 a hostile client that bypasses the worker's own guards. It sends NaN and Inf parameters,
one good exchange, then a header whose step is NaN. The server must give it the center's chunks
for the bad ones (nothing reaches the center), apply the good one, drop it for the malformed
header, and end normally. Prints OK.
Arguments: the directory for the trajectory file; "messages" or "shared" (in place)."""

import sys
import time

import numpy as np
import torch
from mpi4py import MPI

from hpcopt.comm import protocol as P
from hpcopt.comm.client import CenterClient, Dropped
from hpcopt.comm.server import CenterServer
from hpcopt.comm.shared import share_node
from hpcopt.config import CommConfig, RecordConfig
from hpcopt.io.recorder import Recorder
from hpcopt.io.trajectory import TrajectoryWriter
from hpcopt.optim.center import ElasticRule

N, ALPHA, CHUNK = 301, 0.25, 40


def main():
    world = MPI.COMM_WORLD
    assert world.size == 2, "run with mpirun -n 2"
    in_place = sys.argv[2] == "shared"
    share = share_node(world, 1, N, enabled=in_place)
    servers = world.Split(0 if world.rank == 0 else 1, world.rank)
    center0 = np.linspace(-1, 1, N, dtype=np.float32)
    comm = CommConfig(timeout=30, worker_timeout=30, chunk_mb=CHUNK * 4 / 1e6)
    if world.rank == 0:
        writer = TrajectoryWriter(f"{sys.argv[1]}/bad-{sys.argv[2]}.h5", servers, n_params=N, lo=0, hi=N, shard_width=N,
                                  attrs={}, model_attrs={})
        start = time.monotonic()
        rule = ElasticRule(torch.from_numpy(center0.copy()), ALPHA)
        recorder = Recorder(servers, writer, RecordConfig(center_every=1, worker_every=1, flush_seconds=3600,
                                                          eval_seconds=3600), bounds=[(0, N)], start=start,
                            center=rule.center.numpy())
        server = CenterServer(world=world, servers=servers, workers={0: (1, "")}, bounds=[(0, N)], rule=rule,
                              recorder=recorder, comm=comm, start=start, shared=share.workers, sync=share.sync)
        server.serve()
        assert server.exchanges == 3, server.exchanges
        return
    rng = np.random.default_rng(0)
    params = share.params if in_place else torch.empty(N)
    client = CenterClient([(world, 0)], [(0, N)], params, chunk=CHUNK, timeout=30,
                          shared={0} if in_place else set(), sync=share.sync)
    assert share.servers == ({0} if in_place else set())
    c = center0.astype(np.float64).copy()
    good = np.ones(N, bool)
    for k, (i, bad) in enumerate([(50, np.nan), (N - 1, np.inf), (None, None)], start=1):
        x = rng.standard_normal(N).astype(np.float32)
        if i is not None:
            x[i] = bad
        params.copy_(torch.from_numpy(x))
        client.exchange(P.make_header(P.EXCHANGE, 0, 4 * k, k, 1.0))
        got = params.numpy()
        assert np.isfinite(got).all()
        chunk = np.zeros(N, bool)
        if i is not None:
            chunk[i // CHUNK * CHUNK:(i // CHUNK + 1) * CHUNK] = True
        # the bad chunk: the worker gets the center's; the others move as usual, equal and opposite
        np.testing.assert_allclose(got[chunk], c[chunk].astype(np.float32), rtol=1e-6)
        d = ALPHA * (x[~chunk].astype(np.float64) - c[~chunk])
        np.testing.assert_allclose(got[~chunk], x[~chunk] - d, rtol=1e-5, atol=1e-6)
        c[~chunk] += d
    # 4. a malformed header: dropped, told so
    bad = P.make_header(P.HEARTBEAT, 0, 13)
    bad[P.STEP] = np.nan
    world.Send(bad, dest=0, tag=P.TAG_HEADER)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.poll_notices()
        except Dropped:
            break
        assert time.monotonic() < deadline, "never told it was dropped"
        time.sleep(0.01)
    print("OK", flush=True)


if __name__ == "__main__":
    main()
