"""Capacity of the server tier: how many exchanges per second S server shards sustain, and a
sizing rule fitted to it.

    .venv/bin/python benchmarks/capacity.py                  # the default sweep (about 5 minutes)
    .venv/bin/python benchmarks/capacity.py --quick          # a smoke run
    .venv/bin/python benchmarks/capacity.py --repeat 2 --save p.json --check 2,16,3e6   # what the README gives

Each point is one `mpirun -n S+W` job of this script (--inner): ranks 0..S-1 are real hpcopt
servers (CenterServer, EASGD rule, a trajectory file, P parameters sharded S ways), the other W
ranks real worker clients that exchange as fast as they can for --seconds (a tiny compute step:
none), in place through shared memory, over messages, or over messages compressed (int4). The
servers serve every exchange (each exchange touches every shard), so a point's rate R is the
number of exchanges the tier completed per second, and its cost per exchange on one server is
1/R when the server is the bottleneck.

Every point is measured over its steady window (see steady()): from the moment every worker has
completed an exchange until the first one stops. Start-up and shut-down are left out: with 64
ranks on 2 cores they took longer than the exchanges and made the rate 5-8x too low.

The model. Every point measures, besides its rate R, the CPU time the servers and the workers
spent per exchange. Both are fitted, per path, as a fixed part and a part per byte:
    server:  c_s(P, S) = a_s + b_s x bytes(P / S)   (one server, its shard; bytes = up and back:
                                                      2 x 4 P/S plain, twice the payload compressed)
    worker:  c_w(P, W) = a_w + b_w x bytes(P)       (the client's side: copies, codec, MPI,
                         + e_w x W x c_s              and waiting: a worker queued behind W-1
                                                      others waits about W c_s seconds, and
                                                      spends a share e_w of that wait on its
                                                      CPU, waking to test its requests)
and the rate follows from the two resources an exchange needs:
    1 / R = || ( c_s ,  (S x c_s + c_w) / C ) ||_k
one server's own time per exchange (each exchange visits every shard), and the C cores every rank
shares, which the S servers and the worker together use S c_s + c_w seconds of per exchange,
combined as a k-norm: k = inf is the larger of the two (R = min(1 / c_s, C / (S c_s + c_w))),
a smaller k lowers the rate where both are close -- a server that shares its cores with the
workers is not always running when a request lands. k is fitted (the worst error over the points,
k in 1..16 or inf); on this machine k = 4, where the plain maximum missed S=1 W=8 P=1M over
messages by +30% in two sweeps (490 and 498 exchanges/s; 1 / c_s alone says 640). On a cluster
each server has its own core and the first term decides: the sizing rule. W workers,
each exchanging every tau steps of t_step seconds, make x = W / (tau x t_step) exchanges per
second, and each server must keep up:
    x x (a_s + b_s x bytes(P / S)) <= 1
Sharding divides only the per-byte part: S >= x b_s bytes(P) / (1 - x a_s), and when x a_s >= 1
no number of shards suffices (the fixed cost alone fills a server: a longer tau, or fewer workers
per server tier). Over a link of L bytes/s into each server node the per-byte part also needs
x bytes(P / S) <= L. The table prints every measured point beside the model's rate, and what the
rule says for 1,024 workers; --check measures a point the fit did not see.

On this machine (2 cores) the second term decides almost everywhere: W oversubscribed workers
and the servers share the cores, so sharding adds no capacity here.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def inner(args):
    """One point, under mpirun: S servers + W workers; prints the servers' JSON result on rank 0."""
    import mpi4py

    mpi4py.rc.thread_level = "serialized"
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

    world = MPI.COMM_WORLD
    S, n = args.servers, int(args.params)
    bounds = shard_bounds(n, S)
    share = share_node(world, S, n, enabled=args.path == "inplace")
    servers = world.Split(0 if world.rank < S else 1, world.rank)
    compress = "int4" if args.path == "int4" else "none"
    comm = CommConfig(timeout=120, worker_timeout=120, compress=compress)
    tmp = world.bcast(tempfile.mkdtemp() if world.rank == 0 else None)
    world.Barrier()
    if world.rank < S:
        lo, hi = bounds[world.rank]
        writer = TrajectoryWriter(f"{tmp}/capacity.h5", servers, n_params=n, lo=lo, hi=hi,
                                  shard_width=bounds[0][1] - bounds[0][0], attrs={}, model_attrs={})
        start = time.monotonic()
        rule = ElasticRule(torch.zeros(hi - lo), 0.1)
        recorder = Recorder(servers, writer, RecordConfig(center_every=10 ** 9, worker_every=0, flush_seconds=3600,
                                                          eval_seconds=3600), bounds=bounds, start=start)
        workers = {r - S: (r, "") for r in range(S, world.size)}
        server = CenterServer(world=world, servers=servers, workers=workers, bounds=bounds, rule=rule,
                              recorder=recorder, comm=comm, start=start, shared=share.workers or None,
                              sync=share.sync, log=lambda *a: None)
        samples, serving = [], threading.Event()

        def sample():  # the server's CPU time and count, to be read over the steady window
            while not serving.wait(0.02):
                samples.append((time.monotonic(), time.process_time(), server.exchanges))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        summary = server.serve()
        serving.set()
        sampler.join()
        writer.close()
        result = {"exchanges": summary.exchanges, "seconds": summary.wall_seconds,
                  "cpu_seconds": summary.cpu_seconds, "in_place": bool(share.workers), "samples": samples}
    else:
        wid = world.rank - S
        params = share.params if share.params is not None else torch.zeros(n)
        client = CenterClient([(world, r) for r in range(S)], bounds, params, chunk=int(1e6 / 4), timeout=120,
                              shared=share.servers, sync=share.sync, compress=compress)
        codec.warm(compress)  # as a training's worker does before its clock starts (the codec's compiled loops)
        k, t_end, cpu0 = 0, time.monotonic() + args.seconds, time.process_time()
        rng = np.random.default_rng(wid)
        noise = torch.from_numpy(rng.standard_normal(min(n, 4096)).astype(np.float32) * 1e-3)
        done = []  # (when, CPU time) at each completed exchange
        while time.monotonic() < t_end:
            k += 1
            params[:noise.numel()] += noise  # a change to send (the compressed path encodes it)
            client.exchange(make_header(EXCHANGE, wid, k, k))
            done.append((time.monotonic(), time.process_time()))
        client.done(wid, k)
        result = {"worker": wid, "exchanges": k, "cpu_seconds": time.process_time() - cpu0, "done": done}
    results = world.gather(result, root=0)  # servers first (ranks 0..S-1), then the workers
    if world.rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    servers.Free()


def point(S, W, P, path, seconds):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    seconds *= max(1, W / 16, P / 4e6)  # a steady window of many exchanges: many ranks take long to
    # all be exchanging, and a large model makes few exchanges
    cmd = ["mpirun", "-n", str(S + W), sys.executable, __file__, "--inner", "--servers", str(S), "--params", str(P),
           "--path", path, "--seconds", str(seconds)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        raise SystemExit(f"point S={S} W={W} P={P} {path} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    res = json.loads(line[0][7:])
    return steady(S, W, P, path, res[:S], res[S:])


def steady(S, W, P, path, servers, workers):
    """The point's rate and CPU costs over its steady window: from the moment every worker has
    completed an exchange to the moment the first one made its last (CLOCK_MONOTONIC is one
    clock for every process of the machine). Start-up (64 ranks importing torch on 2 cores,
    every worker's first fetch) and shut-down (workers leaving one by one) are outside it: with
    few exchanges per worker they used to weigh as much as the exchanges themselves."""
    t0 = max(r["done"][0][0] for r in workers)
    t1 = min(r["done"][-1][0] for r in workers)
    if t1 - t0 < 0.25 * (max(r["done"][-1][0] for r in workers) - min(r["done"][0][0] for r in workers)):
        print(f"  (S={S} W={W} P={P:,} {path}: a steady window of only {t1 - t0:.2f} s; give it more --seconds)")
    count, worker_cpu = 0, 0.0
    for r in workers:
        inside = [d for d in r["done"] if t0 <= d[0] <= t1]
        if len(inside) >= 2:
            count += len(inside) - 1
            worker_cpu += inside[-1][1] - inside[0][1]
    server_cpu = []
    for r in servers:
        inside = [x for x in r["samples"] if t0 <= x[0] <= t1]
        if len(inside) >= 2 and inside[-1][2] > inside[0][2]:
            server_cpu.append((inside[-1][1] - inside[0][1]) / (inside[-1][2] - inside[0][2]))
    served = [x for x in servers[0]["samples"] if t0 <= x[0] <= t1]
    if len(served) >= 2 and served[-1][2] > served[0][2]:
        rate = (served[-1][2] - served[0][2]) / (served[-1][0] - served[0][0])
    else:  # a window shorter than the sampling: the whole run's
        rate = servers[0]["exchanges"] / servers[0]["seconds"]
    whole = max(sum(r["exchanges"] for r in workers), 1)
    return {"S": S, "W": W, "P": P, "path": path, "rate": rate, "window": t1 - t0,
            "cpu_per_exchange": max(server_cpu) if server_cpu else
            max(r["cpu_seconds"] / max(r["exchanges"], 1) for r in servers),
            "worker_cpu_per_exchange": worker_cpu / count if count else
            sum(r["cpu_seconds"] for r in workers) / whole}


def combine(points):
    """Points measured more than once (--repeat, or several --load files) as one each: the median
    of their rates and costs (this machine's speed drifts by up to 2x between minutes: one
    measurement of a point can be a slow spell), with every measured rate kept in `rates`."""
    groups: dict[tuple, list] = {}
    for p in points:
        groups.setdefault((p["S"], p["W"], p["P"], p["path"]), []).append(p)
    out = []
    for (S, W, P, path), same in groups.items():
        med = {k: float(np.median([p[k] for p in same])) for k in ("rate", "cpu_per_exchange", "worker_cpu_per_exchange")}
        out.append({"S": S, "W": W, "P": P, "path": path, **med,
                    "rates": [r for p in same for r in p.get("rates", [p["rate"]])]})
    return out


def shard_bytes(P, S, path):
    from hpcopt.comm import codec
    from hpcopt.comm.protocol import chunk_bounds, shard_bounds

    lo, hi = shard_bounds(P, S)[0]
    if path == "int4":
        return 2 * sum(codec.payload_size("int4", b - a) for a, b in chunk_bounds(0, hi - lo, int(1e6 / 4)))
    return 2 * 4 * (hi - lo)


def fit(points):
    """Per path: (a_s, b_s) of the servers' CPU seconds per exchange against their shard's bytes,
    and (a_w, b_w, e_w) of the worker side's against the whole vector's bytes and the time a
    worker waits in the server's queue (W x the fitted c_s), least squares in relative error (the
    model is judged by its relative error at every point, small and large), no coefficient
    negative. (A term linear in W alone, as before, missed 64 workers over messages by 51%: the
    waiting grows with the server's cost per exchange, not with W alone.)"""
    def line(t, *xs):
        A = np.stack([np.ones_like(t), *xs], axis=1) / t[:, None]
        coef, *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
        while (coef < 0).any():  # refit without the negative terms (at 0)
            keep = coef > 0
            coef = np.zeros_like(coef)
            coef[keep], *_ = np.linalg.lstsq(A[:, keep], np.ones_like(t), rcond=None)
        return tuple(float(c) for c in coef)

    model = {}
    for path in sorted({p["path"] for p in points}):
        mine = [p for p in points if p["path"] == path]
        xs = np.array([shard_bytes(p["P"], p["S"], path) for p in mine], dtype=float)
        xw = np.array([shard_bytes(p["P"], 1, path) for p in mine], dtype=float)
        ws = np.array([p["W"] for p in mine], dtype=float)
        a_s, b_s = line(np.array([p["cpu_per_exchange"] for p in mine]), xs)
        model[path] = ((a_s, b_s), line(np.array([p["worker_cpu_per_exchange"] for p in mine]), xw,
                                        ws * (a_s + b_s * xs)))
    return model


def predict(model, S: int, W: int, P: int, path: str, cores: int, k: float = np.inf) -> float:
    """Exchanges per second of S servers on a machine of `cores` cores that every rank shares:
    1 / R is the k-norm of the two times an exchange needs (k = inf: their maximum)."""
    (a_s, b_s), (a_w, b_w, e_w) = model[path]
    c_s = a_s + b_s * shard_bytes(P, S, path)
    c_w = a_w + b_w * shard_bytes(P, 1, path) + e_w * W * c_s
    t = np.array([c_s, (S * c_s + c_w) / cores])
    return float(1 / (t.max() if k == np.inf else (t ** k).sum() ** (1 / k)))


def fit_k(model, points, cores) -> float:
    """The k of predict() with the smallest worst relative error over the points (1 to 16, or inf)."""
    def worst(k):
        return max(abs(predict(model, p["S"], p["W"], p["P"], p["path"], cores, k) / p["rate"] - 1) for p in points)
    return min([*range(1, 17), np.inf], key=worst)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--servers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--params", type=float, default=1e6, help=argparse.SUPPRESS)
    ap.add_argument("--path", default="messages", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds of exchanges per point")
    ap.add_argument("--quick", action="store_true", help="three small points only")
    ap.add_argument("--paths", default="inplace,messages,int4")
    ap.add_argument("--check", default="", help="S,W,P of a point to predict and then measure (not in the fit)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure the whole sweep (and --check) this many times, one sweep after the other, and "
                         "fit the median of each point's measurements")
    ap.add_argument("--save", help="write the measured points to this JSON file (every measurement)")
    ap.add_argument("--load", help="fit the points of --save files (comma-separated; a point measured in "
                                   "several counts with the median) instead of measuring")
    ap.add_argument("--cores", type=int, default=0, help="cores the ranks share (default: this machine's)")
    args = ap.parse_args()
    if args.inner:
        return inner(args)
    # the sweep: model size at W=8, S=1; workers at P=1e6, S=1; shards at P=1e7, W=8. Enough
    # workers to keep a server busy (W=4 points would measure the workers' round trips too)
    grid = ([(1, 8, P) for P in (5e3, 1e5, 1e6, 1e7)] + [(1, W, 1e6) for W in (16, 64)]
            + [(S, 8, 1e7) for S in (2, 4)])
    if args.quick:
        grid = [(1, 4, 5e3), (1, 4, 1e6), (2, 4, 1e6)]
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    points = []
    for f in args.load.split(",") if args.load else []:
        try:
            points += json.loads(Path(f).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--load {f}: {e}")
    sweeps = [] if args.load else [(path, S, W, P) for _ in range(args.repeat)
                                   for path in args.paths.split(",") for S, W, P in grid]
    for path, S, W, P in sweeps:
        pt = point(S, W, int(P), path, args.seconds)
        points.append(pt)
        print(f"measured S={S} W={W:3d} P={int(P):>10,} {path:9s} {pt['rate']:9.1f} exchanges/s "
              f"(server CPU {1e3 * pt['cpu_per_exchange']:.2f} ms, workers' {1e3 * pt['worker_cpu_per_exchange']:.2f}"
              f" ms per exchange)", flush=True)
    if args.save:
        Path(args.save).write_text(json.dumps(points, indent=1))
    points = combine(points)
    model = fit(points)
    cores = args.cores or os.cpu_count()
    k = fit_k(model, points, cores)
    print("\nfitted CPU seconds per exchange: a + b x bytes (server: of its shard), a + b x bytes + e x W x c_s "
          "(worker side: of the vector, and a share e of its wait in the queue of W workers)")
    for path, ((a_s, b_s), (a_w, b_w, e_w)) in model.items():
        bw = f"{1 / b_s / 1e9:.2f} GB/s" if b_s > 0 else "inf"
        print(f"  {path:9s} server a = {1e6 * a_s:7.1f} us  b = {1e9 * b_s:7.3f} ns/byte ({bw});  "
              f"worker a = {1e6 * a_w:7.1f} us  b = {1e9 * b_w:7.3f} ns/byte  e = {e_w:.4f}")
    print(f"  the rate's two times combined as a {k}-norm (fitted: inf is their maximum)")
    print(f"\n{'S':>2} {'W':>3} {'P':>11} {'path':9s} {'measured/s':>11} {'model/s':>9} {'error':>7}   (cores: {cores})")
    worst = 0.0
    for p in points:
        pred = predict(model, p["S"], p["W"], p["P"], p["path"], cores, k)
        err = pred / p["rate"] - 1
        worst = max(worst, abs(err))
        each = "" if len(p["rates"]) == 1 else "   (" + " ".join(f"{r:.1f}" for r in p["rates"]) + ")"
        print(f"{p['S']:>2} {p['W']:>3} {p['P']:>11,} {p['path']:9s} {p['rate']:>11.1f} {pred:>9.1f} {100 * err:>6.1f}%"
              + each)
    print(f"worst error: {100 * worst:.1f}%")
    if args.check:
        S, W, P = (int(float(v)) for v in args.check.split(","))
        for path in model:
            pred = predict(model, S, W, P, path, cores, k)
            pt = combine([point(S, W, P, path, args.seconds) for _ in range(args.repeat)])[0]
            print(f"unseen point S={S} W={W} P={P:,} {path}: model {pred:.1f}/s, measured {pt['rate']:.1f}/s "
                  f"({100 * (pred / pt['rate'] - 1):+.1f}%)")
    x = 1024 / (8 * 0.05)
    print(f"\nserver shards needed for 1,024 workers at tau 8 and 50 ms steps ({x:.0f} exchanges/s), each server "
          f"on its own core, by the rule:")
    for P in (5e3, 1e6, 1e7, 1e8):
        need = []
        for path, ((a, b), _) in model.items():
            if x * a >= 1:
                need.append(f"{path} none suffices (fixed cost {1e6 * a:.0f} us x {x:.0f}/s > 1)")
                continue
            S = max(1, int(np.ceil(x * b * shard_bytes(int(P), 1, path) / (1 - x * a))))
            need.append(f"{path} {S}")
        print(f"  P={int(P):>11,}: " + "; ".join(need))


if __name__ == "__main__":
    main()
