"""Exchange bandwidth against raw MPI Send/Recv of the same bytes, between the same two ranks.

    mpirun -n 2 .venv/bin/python benchmarks/exchange.py [--reps 20] [--sizes 1e6,1e7]

Rank 0 is a real hpcopt server (CenterServer, trajectory file in a temp dir), rank 1 a real
worker client. For each size P (float32 parameters) it times, alternating, R round trips of
  raw       rank 1 Send(P floats) -> rank 0 Recv, rank 0 Send(P floats) -> rank 1 Recv (blocking)
  in place  CenterClient.exchange() as a training does it when worker and server share a node
            (comm.shared_memory, the default; hpcopt.comm.shared): the header, the server's
            elastic update of the worker's parameters where they live, the answer
  messages  CenterClient.exchange() as between nodes or with a joined worker: P floats to the
            server, elastic update, P floats back
and prints bandwidth = 2 * 4P bytes / round-trip time for each (medians over alternating
rounds), the exchanges' ratios to raw (goal >= 0.8) and the ratios of the best rounds (noise on
a shared machine only adds time). It also times, on rank 0, the server's arithmetic alone: one
elastic update (hpcopt.optim.easgd.elastic_exchange_, two passes) over P floats in the same
chunks. An exchange over messages must read and write the center besides moving the bytes;
when the P floats do not fit in the cache, that traffic competes with the transfer for memory
bandwidth, and raw / (raw + update) is what an exchange that cannot overlap the two would reach.
"""

import argparse
import statistics
import tempfile
import time

import mpi4py

mpi4py.rc.thread_level = "funneled"
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

from hpcopt.comm.client import CenterClient  # noqa: E402
from hpcopt.config import CommConfig, RecordConfig  # noqa: E402
from hpcopt.io.recorder import Recorder  # noqa: E402
from hpcopt.comm.protocol import EXCHANGE, make_header  # noqa: E402
from hpcopt.comm.server import CenterServer  # noqa: E402
from hpcopt.comm.shared import share_node  # noqa: E402
from hpcopt.io.trajectory import TrajectoryWriter  # noqa: E402
from hpcopt.optim.center import ElasticRule  # noqa: E402
from hpcopt.optim.easgd import elastic_exchange_  # noqa: E402


def raw_round_trips(comm, buf, reps):
    comm.Barrier()
    t = time.perf_counter()
    for _ in range(reps):
        if comm.rank == 1:
            comm.Send(buf, dest=0, tag=1)
            comm.Recv(buf, source=0, tag=2)
        else:
            comm.Recv(buf, source=1, tag=1)
            comm.Send(buf, dest=1, tag=2)
    return (time.perf_counter() - t) / reps


def exchange_round_trips(comm, n, reps, chunk, tmp, share=None):
    """Time CenterClient.exchange() against a CenterServer; in place when `share` (a NodeShare) is given."""
    servers = comm.Split(0 if comm.rank == 0 else 1, comm.rank)
    comm.Barrier()
    if comm.rank == 0:
        writer = TrajectoryWriter(f"{tmp}/bench.h5", servers, n_params=n, lo=0, hi=n, shard_width=n,
                                  attrs={}, model_attrs={})
        start = time.monotonic()
        recorder = Recorder(servers, writer, RecordConfig(center_every=10**9, worker_every=0, flush_seconds=3600,
                                                          eval_seconds=3600), bounds=[(0, n)], start=start)
        server = CenterServer(world=comm, servers=servers, workers={0: (1, "")}, bounds=[(0, n)],
                              rule=ElasticRule(torch.zeros(n), 0.5), recorder=recorder,
                              comm=CommConfig(timeout=60, chunk_mb=chunk * 4 / 1e6), start=start,
                              shared=share.workers if share else None, sync=share.sync if share else lambda: None)
        server.serve()
        result = None
    else:
        params = share.params if share else torch.ones(n)
        params.fill_(1.0)
        client = CenterClient([(comm, 0)], [(0, n)], params, chunk=chunk, timeout=60,
                              shared=share.servers if share else set(), sync=share.sync if share else lambda: None)
        header = make_header(EXCHANGE, 0)
        client.exchange(header)  # warm-up
        t = time.perf_counter()
        for _ in range(reps):
            client.exchange(header)
        result = (time.perf_counter() - t) / reps
        client.done(0, 0)
    servers.Free()
    return comm.bcast(result, root=1)


def update_alone(n, chunk, reps):
    """The server's arithmetic of one exchange, without any transfer (alpha as in the paper, 0.9/4)."""
    center, x = torch.zeros(n), torch.ones(n)
    t = time.perf_counter()
    for _ in range(reps):
        for a in range(0, n, chunk):
            elastic_exchange_(center[a:a + chunk], x[a:a + chunk], 0.225)
    return (time.perf_counter() - t) / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20, help="round trips per timing")
    ap.add_argument("--rounds", type=int, default=5, help="alternating timings per size (median taken)")
    ap.add_argument("--sizes", default="1e6,1e7", help="parameter counts, comma-separated")
    ap.add_argument("--chunk-mb", type=float, default=1.0)
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    if comm.size != 2:
        raise SystemExit("run with exactly 2 ranks: mpirun -n 2 python benchmarks/exchange.py")
    tmp = comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None)
    chunk = int(args.chunk_mb * 1e6 / 4)
    if comm.rank == 0:
        print("bandwidth = 2 x 4P bytes per round trip, GB/s; ratio = exchange / raw (median rounds), best = best rounds")
        print(f"{'parameters':>11} {'MB':>6} {'raw':>6} {'in place':>8} {'ratio':>6} {'best':>5}"
              f" {'messages':>8} {'ratio':>6} {'best':>5} {'raw ms':>7} {'update ms':>9} {'raw/(raw+update)':>16}")
    for n in (int(float(s)) for s in args.sizes.split(",")):
        buf = np.ones(n, np.float32)
        raw_round_trips(comm, buf, 2)  # warm-up
        share = share_node(comm, 1, n)
        if share.win is None:
            raise SystemExit("the two ranks share no node: run both on one node for the in-place exchange")
        raw, shm, msg = [], [], []
        for _ in range(args.rounds):  # alternate, so drift hits all three the same
            raw.append(raw_round_trips(comm, buf, args.reps))
            shm.append(exchange_round_trips(comm, n, args.reps, chunk, tmp, share))
            msg.append(exchange_round_trips(comm, n, args.reps, chunk, tmp))
        share.close()
        if comm.rank == 0:
            t_raw = statistics.median(raw)
            t_up = statistics.median(update_alone(n, chunk, args.reps) for _ in range(args.rounds))
            gb = 2 * 4 * n / 1e9
            cols = "".join(f" {gb / statistics.median(t):>8.2f} {t_raw / statistics.median(t):>6.2f}"
                           f" {min(raw) / min(t):>5.2f}" for t in (shm, msg))
            print(f"{n:>11,} {4 * n / 1e6:>6.0f} {gb / t_raw:>6.2f}{cols} {1e3 * t_raw:>7.2f} {1e3 * t_up:>9.2f}"
                  f" {t_raw / (t_raw + t_up):>16.2f}", flush=True)


if __name__ == "__main__":
    main()
