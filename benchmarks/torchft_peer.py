"""An external peer: torchft's fault-tolerant DiLoCo or LocalSGD on the same model and data as
benchmarks/ddp_baseline.py (needs the `bench` extra: `pip install -e .[bench]`, torchft 0.2.0).

    mpirun -n 4 .venv/bin/python benchmarks/torchft_peer.py --algo diloco --epochs 30 --out RESULT.json
    mpirun -n 4 .venv/bin/python benchmarks/torchft_peer.py --algo localsgd --budget 60 --out R.json
    mpirun -n 4 .venv/bin/python benchmarks/torchft_peer.py --algo diloco --hidden 3000,3000 --lr 0.05 --out R.json

Same model (MNIST-1D CNN, or with --hidden hpcopt's MLP of those widths), batch size per rank,
local optimizer (SGD, Nesterov 0.9, weight decay 5e-4, cosine over the run's steps), seed and
data order rule (rank r draws its permutations from a generator seeded r) as ddp_baseline.py; the
JSON result has the same keys (curve [(seconds, test loss, test accuracy)], wall_seconds,
bytes_per_worker, workers) and a few more (algo, sync_every, syncs, commits).

How torchft runs here: Open MPI starts the ranks (OMPI_COMM_WORLD_RANK/SIZE); world rank 0 starts
torchft's lighthouse (`torchft_lighthouse --bind 127.0.0.1:PORT --min_replicas N`, PORT from
--port) as a child process, and every rank is its own torchft replica group of size 1 (its own
TCPStore on 127.0.0.1, a torchft.manager.Manager with hostname 127.0.0.1, a reconfigurable
torchft.process_group.ProcessGroupGloo across the replica groups). mpi4py is only the control
plane: the barriers and the --budget stop decision; every byte the algorithm moves goes through
torchft's Manager.allreduce. The lighthouse is terminated in a `finally` (also on Ctrl-C, an
exception, or SIGTERM, which is turned into SystemExit), and as a last resort it gets SIGTERM from
the kernel when rank 0 dies (prctl PR_SET_PDEATHSIG, as hpcopt/launch does for ompi-server).
torchft's own servers (the Rust ManagerServer, the HTTP checkpoint server used only to heal a
replica) bind the wildcard address on ports the kernel picks; torchft 0.2.0 has no argument to
change that, but everything connects over 127.0.0.1 (the addresses they advertise are given as
127.0.0.1, and gloo's interface is `lo` unless GLOO_SOCKET_IFNAME says otherwise). torchft's Rust
side logs at RUST_LOG (default here: warn; info logs every quorum and commit); the lighthouse's log
goes to OUT.lighthouse.log. --verbose: every rank prints its phases' times to stderr.

--algo localsgd: torchft.local_sgd.LocalSGD(manager, model, opt, sync_every=H): every H local steps
the parameters are averaged (one allreduce per parameter tensor) and committed.
--algo diloco: torchft.local_sgd.DiLoCo(manager, [model], opt, outer_opt, sync_every=H), one
fragment (plain DiLoCo, not Streaming): every H local steps the pseudo-gradient (global minus
local parameters) is averaged and the outer optimizer, SGD with Nesterov momentum (--outer-lr 0.7,
--outer-momentum 0.9: the DiLoCo paper's), steps the global parameters, which every replica then
trains from. H (--sync-every) defaults to 8: hpcopt's tau in configs/mnist1d_easgd.toml and
sync.period in configs/mnist1d_{local_sgd,diloco}.toml.

The first quorum (lighthouse round, gloo rendezvous across the replicas) is formed before the
clock starts, as ddp_baseline.py's init_process_group is; every later sync's quorum and commit
round trips are training time. The curve is rank 0's model right after a sync (the global model,
the same on every replica), evaluated when --eval-seconds have passed since the last evaluation,
and after the last step. --budget: rank 0's clock is read after each sync and the decision
broadcast, so every rank stops after the same sync. If the step count is not a multiple of H,
LocalSGD averages once more after the last step (LocalSGD.sync()); DiLoCo has no public call for
that, and the last point is then rank 0's own model after the trailing local steps.

Bytes per worker: what the algorithm's allreduces move, counted as ddp_baseline.py and hpcopt's
synchronous methods count theirs, as a float32 ring allreduce of P values among N workers: each
worker sends 2 (N - 1)/N x 4 P bytes and receives as many, so 2 x 2 (N - 1)/N x 4 P bytes sent +
received per sync (3 x 4 P for N = 4), times the syncs made. LocalSGD allreduces the P parameters,
DiLoCo the pseudo-gradient, also P floats (both one allreduce per parameter tensor, the sum still
P). Not counted: the lighthouse heartbeats and the quorum and should_commit RPCs (control messages
of a few hundred bytes to a few kB per sync); with no failures no checkpoint is ever sent.

Quantized allreduce: not available here. torchft 0.2.0's `should_quantize=True` (DiLoCo's
argument) goes through torchft.collectives.allreduce_quantized, whose fp8/int8 kernels are Triton
(GPU) kernels; Manager.allreduce takes that path only when `triton` imports, and otherwise quietly
sends full float32. The CPU torch build here has no triton, so there is no --quantize option.
"""

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from mpi4py import MPI

from hpcopt.launch.device import keep_freed_memory
from hpcopt.models.evaluate import evaluate
from hpcopt.optim.schedule import learning_rate

HOST = "127.0.0.1"


def _die_with_parent():
    """preexec_fn: the child gets SIGTERM when this process dies, even by SIGKILL (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    parent = os.getpid()

    def arm():
        libc.prctl(1, ctypes.c_ulong(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the prctl: no signal will come
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def start_lighthouse(port: int, replicas: int, tick_ms: int, log: Path) -> subprocess.Popen:
    exe = shutil.which("torchft_lighthouse", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                   os.environ.get("PATH", "")]))
    if exe is None:
        raise SystemExit("torchft_lighthouse not found (pip install torchft==0.2.0, or .[bench])")
    with open(log, "wb") as out:
        proc = subprocess.Popen([exe, "--bind", f"{HOST}:{port}", "--min_replicas", str(replicas),
                                 "--quorum_tick_ms", str(tick_ms), "--join_timeout_ms", "60000"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent())
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"torchft_lighthouse exited with {proc.returncode} (see {log})")
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"torchft_lighthouse did not answer on {HOST}:{port} in 30 s")
            time.sleep(0.1)


def stop_process(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


T0 = time.monotonic()
VERBOSE = False


def say(rank: int, what: str) -> None:
    if VERBOSE:
        print(f"[rank {rank} +{time.monotonic() - T0:.1f}s] {what}", file=sys.stderr, flush=True)


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)  # so the `finally` blocks run (mpirun forwards SIGTERM)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algo", choices=("diloco", "localsgd"), required=True)
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--sync-every", type=int, default=8, help="inner steps between syncs (hpcopt's tau: 8)")
    ap.add_argument("--outer-lr", type=float, default=0.7, help="DiLoCo's outer Nesterov SGD lr")
    ap.add_argument("--outer-momentum", type=float, default=0.9, help="DiLoCo's outer momentum")
    ap.add_argument("--eval-seconds", type=float, default=0.5)
    ap.add_argument("--port", type=int, default=29534, help="the lighthouse's port on 127.0.0.1")
    ap.add_argument("--quorum-tick-ms", type=int, default=100, help="the lighthouse's quorum tick (its default)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds for torchft's collectives, quorum, RPCs")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=0.0, help="seconds of training at most (0: no limit)")
    ap.add_argument("--hidden", default="", help="comma-separated MLP widths (default: the CNN)")
    ap.add_argument("--verbose", action="store_true", help="each rank prints its phases' times to stderr")
    args = ap.parse_args()
    global VERBOSE
    VERBOSE = args.verbose
    signal.signal(signal.SIGTERM, _sigterm)
    comm = MPI.COMM_WORLD
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", comm.rank))
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", comm.size))
    assert (rank, size) == (comm.rank, comm.size), "OMPI_COMM_WORLD_* disagree with MPI's world"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    keep_freed_memory()  # as hpcopt's workers do: the comparison is of the methods, not of malloc
    os.environ.setdefault("RUST_LOG", "warn")  # torchft's Rust side logs every quorum, commit, tick at info

    lighthouse, held = None, {}
    try:
        if rank == 0:
            lighthouse = start_lighthouse(args.port, size, args.quorum_tick_ms, Path(f"{args.out}.lighthouse.log"))
        say(rank, "lighthouse up")
        comm.Barrier()
        train(args, comm, rank, size, held)
        close_torchft(held, rank)
        say(rank, "torchft closed")
        comm.Barrier()  # every replica's manager is down before the lighthouse goes
    finally:
        close_torchft(held, rank)
        stop_process(lighthouse)
        say(rank, "done")


def close_torchft(held: dict, rank: int) -> None:
    for name, close in (("manager", lambda m: m.shutdown(wait=False)), ("pg", lambda g: g.shutdown())):
        if name in held:
            try:
                close(held.pop(name))
            except Exception as e:  # the lighthouse must still go
                print(f"rank {rank}: torchft {name} shutdown: {e}", file=sys.stderr)


def train(args, comm, rank, size, held: dict) -> None:
    """Train and (rank 0) write the result; the torchft objects go into `held` for closing."""
    from torchft.local_sgd import DiLoCo, LocalSGD
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    from ddp_baseline import common  # (this directory: the same model, data and order as DDP's)

    c = common(args, rank)  # identical initial weights on every replica: no step-0 sync needed
    model, opt = c.net, c.opt
    x, y, xt, yt, spe, total, gen, n_params = c.x, c.y, c.xt, c.yt, c.spe, c.total, c.gen, c.n_params
    H = args.sync_every

    timeout = timedelta(seconds=args.timeout)
    store = torch.distributed.TCPStore(HOST, 0, is_master=True, wait_for_workers=False)  # this replica group's
    pg = held["pg"] = ProcessGroupGloo(timeout=timeout)
    manager = held["manager"] = Manager(
        pg=pg,
        load_state_dict=lambda sd: (model.load_state_dict(sd["model"]), opt.load_state_dict(sd["opt"])),
        state_dict=lambda: {"model": model.state_dict(), "opt": opt.state_dict()},
        min_replica_size=size,  # every worker in every sync, as DDP and hpcopt's synchronous methods
        use_async_quorum=False,  # DiLoCo requires it; LocalSGD the same, for one behaviour
        timeout=timeout, quorum_timeout=timeout, connect_timeout=timeout,
        rank=0, world_size=1,  # each rank is its own replica group
        store_addr=HOST, store_port=store.port,
        lighthouse_addr=f"http://{HOST}:{args.port}",
        replica_id=f"peer{rank}", hostname=HOST, port=0,
        init_sync=False,
    )
    if args.algo == "diloco":
        outer = torch.optim.SGD(model.parameters(), lr=args.outer_lr, momentum=args.outer_momentum, nesterov=True)
        algo = DiLoCo(manager, [model], opt, outer, sync_every=H)
    else:
        algo = LocalSGD(manager, model, opt, sync_every=H)
    say(rank, "manager up")
    manager.start_quorum()  # the first quorum and gloo rendezvous, outside the clock (as DDP's init)
    manager.wait_quorum()
    say(rank, "first quorum")

    curve, last_eval, syncs, stop = [], -1e9, 0, False
    comm.Barrier()
    start = time.monotonic()
    with algo:
        for step in range(total):
            if step % spe == 0:
                perm = torch.randperm(len(x), generator=gen)
            idx = perm[(step % spe) * args.batch:(step % spe + 1) * args.batch]
            for g in opt.param_groups:
                g["lr"] = learning_rate(step, total, args.lr, "cosine")
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()  # torchft's post-step hook syncs after every H-th step
            if (step + 1) % H:
                continue
            syncs += 1
            now = time.monotonic() - start
            if args.budget:  # rank 0's clock decides, so every rank stops after the same sync
                stop = comm.bcast(rank == 0 and now > args.budget, root=0)
            if rank == 0 and (now - last_eval >= args.eval_seconds or stop or step == total - 1):
                last_eval = now
                curve.append((now, *evaluate(model, xt, yt)))
            if stop:
                total = step + 1  # the steps actually taken
                break
        if total % H and not stop:  # a partial last period
            if args.algo == "localsgd":
                algo.sync()
                syncs += 1
            if rank == 0:
                curve.append((time.monotonic() - start, *evaluate(model, xt, yt)))
    wall = time.monotonic() - start
    say(rank, f"trained {total} steps in {wall:.1f} s")
    commits = manager.current_step()
    comm.Barrier()
    if rank == 0:
        ring = 2 * 2 * (size - 1) / size * n_params * 4  # float32 ring allreduce of P values, sent + received
        with open(args.out, "w") as f:
            json.dump({"wall_seconds": wall, "curve": curve, "bytes_per_worker": ring * syncs, "workers": size,
                       "algo": args.algo, "sync_every": H, "syncs": syncs, "commits": commits}, f)


if __name__ == "__main__":
    main()
