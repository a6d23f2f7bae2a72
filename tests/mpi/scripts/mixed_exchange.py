"""Run under `mpirun -n 3`: ranks 0 and 1 are servers, rank 2 a worker. Server 0 exchanges with
the worker in place (shared memory), server 1 acts as if it were on another node (messages), so
one exchange mixes both paths. The worker checks every exchange against a NumPy replay of the
elastic moves, saves the parameters it had at each exchange (xs.npy) and the replayed centers
(centers.npy) and prints OK. Argument: the directory for those and the trajectory file."""

import sys
import time

import numpy as np
import torch
from mpi4py import MPI

from hpcopt.comm.client import CenterClient
from hpcopt.comm.protocol import EXCHANGE, make_header, shard_bounds
from hpcopt.comm.server import CenterServer
from hpcopt.comm.shared import share_node
from hpcopt.config import CommConfig, RecordConfig
from hpcopt.io.recorder import Recorder
from hpcopt.io.trajectory import TrajectoryWriter
from hpcopt.optim.center import ElasticRule

N, ALPHA, CHUNK, EXCHANGES = 1003, 0.3, 50, 5  # 501-float shards: 11 chunks, more than one pass in place


def main():
    world = MPI.COMM_WORLD
    assert world.size == 3, "run with mpirun -n 3"
    share = share_node(world, 2, N)
    bounds = shard_bounds(N, 2)
    center0 = np.linspace(-1, 1, N, dtype=np.float32)
    servers = world.Split(0 if world.rank < 2 else 1, world.rank)
    if world.rank < 2:
        lo, hi = bounds[world.rank]
        writer = TrajectoryWriter(f"{sys.argv[1]}/mixed.h5", servers, n_params=N, lo=lo, hi=hi,
                                  shard_width=bounds[0][1] - bounds[0][0], attrs={}, model_attrs={})
        in_place = world.rank == 0  # server 1 pretends the worker is on another node
        start = time.monotonic()
        rule = ElasticRule(torch.from_numpy(center0[lo:hi].copy()), ALPHA)
        recorder = Recorder(servers, writer, RecordConfig(center_every=1, worker_every=1, flush_seconds=3600,
                                                          eval_seconds=3600), bounds=bounds, start=start,
                            center=rule.center.numpy())
        server = CenterServer(world=world, servers=servers, workers={0: (2, "")}, bounds=bounds, rule=rule,
                              recorder=recorder, comm=CommConfig(timeout=60, chunk_mb=CHUNK * 4 / 1e6),
                              start=start, shared=share.workers if in_place else None, sync=share.sync)
        assert server.peers[0].shared == in_place
        server.serve()
        return
    params = share.params
    assert params is not None and share.servers == {0, 1}
    rng = np.random.default_rng(0)
    client = CenterClient([(world, 0), (world, 1)], bounds, params, chunk=CHUNK, timeout=60,
                          shared={0}, sync=share.sync)
    center = center0.astype(np.float64)
    xs, centers = [], [center0]
    for k in range(1, EXCHANGES + 1):
        params.copy_(torch.from_numpy(rng.standard_normal(N).astype(np.float32)))  # "local steps"
        xs.append(params.numpy().copy())
        x = params.numpy().astype(np.float64)
        client.exchange(make_header(EXCHANGE, 0, k, k))
        d = ALPHA * (x - center)
        want, center = x - d, center + d
        np.testing.assert_allclose(params.numpy(), want, rtol=1e-5, atol=1e-6)
        centers.append(center.astype(np.float32))
    client.done(0, EXCHANGES)
    np.save(f"{sys.argv[1]}/xs.npy", np.array(xs))
    np.save(f"{sys.argv[1]}/centers.npy", np.array(centers))
    print("OK", flush=True)


if __name__ == "__main__":
    main()
