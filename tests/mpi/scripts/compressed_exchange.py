"""Run under `mpirun -n 3`: ranks 0 and 1 are servers, rank 2 a worker, exchanges compressed in
the format argv[2] (comm.compress). Server 0 exchanges with the worker in place (shared memory),
server 1 over messages, so one exchange mixes both paths. The worker replays every exchange in
NumPy (the codec's encode/decode, the elastic move, error feedback) and checks its parameters
against the replay exactly; every EXACT_EVERY-th exchange goes plain. At the end each side saves
its reference (worker_ref.npy, server1_ref.npy) and the replayed one (replay_ref.npy), the
centers (server{0,1}_center.npy, replay_center.npy) into argv[1], and the worker prints OK.
With argv[3] == "moves" both servers go over messages and the worker asks compressed exchanges
for the move alone (as an overlapped worker does): its parameters must stay as sent, and minus
the move they must be the replay's, bit for bit. With "ahead" the same, as an overlapped CPU
worker does it: encode_ahead(), then the exchange with the parameters overwritten (it must not
read them), then apply_ahead() onto the parameters as they were."""

import sys
import time

import numpy as np
import torch
from mpi4py import MPI

from hpcopt.comm import codec
from hpcopt.comm.client import CenterClient
from hpcopt.comm.protocol import EXCHANGE, make_header, shard_bounds
from hpcopt.comm.server import CenterServer
from hpcopt.comm.shared import share_node
from hpcopt.config import CommConfig, RecordConfig
from hpcopt.io.recorder import Recorder
from hpcopt.io.trajectory import TrajectoryWriter
from hpcopt.optim.center import ElasticRule
from hpcopt.optim.easgd import elastic_exchange_

N, ALPHA, CHUNK, EXCHANGES, EXACT_EVERY = 1003, 0.3, 50, 40, 7


def main():
    out, fmt = sys.argv[1], sys.argv[2]
    ahead = sys.argv[3:] == ["ahead"]
    moves = sys.argv[3:] == ["moves"] or ahead
    world = MPI.COMM_WORLD
    assert world.size == 3, "run with mpirun -n 3"
    share = share_node(world, 2, N)
    bounds = shard_bounds(N, 2)
    center0 = np.linspace(-1, 1, N, dtype=np.float32)
    servers = world.Split(0 if world.rank < 2 else 1, world.rank)
    if world.rank < 2:
        lo, hi = bounds[world.rank]
        writer = TrajectoryWriter(f"{out}/compressed.h5", servers, n_params=N, lo=lo, hi=hi,
                                  shard_width=bounds[0][1] - bounds[0][0], attrs={}, model_attrs={})
        start = time.monotonic()
        rule = ElasticRule(torch.from_numpy(center0[lo:hi].copy()), ALPHA)
        recorder = Recorder(servers, writer, RecordConfig(center_every=1, worker_every=EXACT_EVERY,
                                                          flush_seconds=3600, eval_seconds=3600),
                            bounds=bounds, start=start, center=rule.center.numpy())
        server = CenterServer(world=world, servers=servers, workers={0: (2, "")}, bounds=bounds, rule=rule,
                              recorder=recorder, comm=CommConfig(timeout=60, chunk_mb=CHUNK * 4 / 1e6, compress=fmt),
                              start=start, shared=share.workers if world.rank == 0 and not moves else None,
                              sync=share.sync)
        kept, remove = [], server._remove

        def keep_reference(wid, forget=True):  # (the server frees it when the worker leaves)
            if server.peers[wid].ref is not None:
                kept.append(server.peers[wid].ref.x.copy())
            remove(wid, forget)

        server._remove = keep_reference
        server.serve()
        np.save(f"{out}/server{world.rank}_center.npy", rule.center.numpy())
        if world.rank == 1:  # (its servers may end before server 1 has read the worker's goodbye)
            np.save(f"{out}/server1_ref.npy", kept[0] if kept else server.peers[0].ref.x)
        return
    params = share.params
    rng = np.random.default_rng(0)
    client = CenterClient([(world, 0), (world, 1)], bounds, params, chunk=CHUNK, timeout=60,
                          shared=set() if moves else {0}, sync=share.sync, compress=fmt, exact_every=EXACT_EVERY)
    lo, hi = (0, N) if moves else bounds[1]  # what goes over messages
    pieces = [(a, min(a + CHUNK, b)) for s_lo, b in bounds for a in range(s_lo, b, CHUNK) if s_lo >= lo]
    moved = np.empty(N, np.float32)  # (moves mode)
    center = torch.from_numpy(center0.copy())
    x = params.numpy()
    x[:] = center0 + rng.standard_normal(N).astype(np.float32)
    ref, err = np.zeros(N, np.float32), np.zeros(N, np.float32)
    for k in range(1, EXCHANGES + 1):
        x += 0.1 * rng.standard_normal(N).astype(np.float32)  # "local steps"
        want = torch.from_numpy(x.copy())
        plain = k == 1 or k % EXACT_EVERY == 0
        if plain:
            elastic_exchange_(center, want, ALPHA)
            ref[:], err[:] = want.numpy(), 0
        else:  # in place on shard 0, the codec on shard 1 (per chunk, as the wire cuts it)
            elastic_exchange_(center[:lo], want[:lo], ALPHA)  # (nothing with moves: lo = 0)
            for a, b in pieces:
                ref[a:b] += codec.decode(fmt, codec.encode(fmt, x[a:b] - ref[a:b], np.empty(
                    codec.payload_size(fmt, b - a), np.uint8)), b - a)
                new = torch.from_numpy(ref[a:b].copy())
                elastic_exchange_(center[a:b], new, ALPHA)
                move = ref[a:b] - new.numpy() + err[a:b]
                sent = codec.decode(fmt, codec.encode(fmt, move, np.empty(codec.payload_size(fmt, b - a), np.uint8)),
                                    b - a)
                err[a:b] = move - sent
                ref[a:b] -= sent
                want[a:b] -= torch.from_numpy(sent)
        header = make_header(EXCHANGE, 0, k, k)
        if moves:
            assert client.moves_only(header) == (not plain)
        if ahead and not plain:
            client.encode_ahead(header, x)
            sent_x = x.copy()
            x[:] = np.nan  # (the training goes on: the exchange reads none of it)
            client.exchange(header, ahead=True)
            assert np.isnan(x).all()
            x[:] = sent_x
            client.apply_ahead(x)
        elif moves and not plain:
            sent_x = x.copy()
            client.exchange(header, moves=moved)
            np.testing.assert_array_equal(x, sent_x)  # as sent: the move is for parameters that went on
            x -= moved
        else:
            client.exchange(header)
        np.testing.assert_array_equal(x, want.numpy(), err_msg=f"exchange {k} ({'plain' if plain else fmt})")
    client.done(0, EXCHANGES)
    np.save(f"{out}/worker_ref.npy", client.ref[lo:hi])
    np.save(f"{out}/replay_ref.npy", ref[lo:hi])
    np.save(f"{out}/replay_center.npy", center.numpy())
    print("OK", flush=True)


if __name__ == "__main__":
    main()
