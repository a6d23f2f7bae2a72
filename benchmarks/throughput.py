"""Worker training throughput with tau = 8 exchanges against the same worker with no communication.

    mpirun -n 2 .venv/bin/python benchmarks/throughput.py [--epochs 20] [--rounds 5] [--tau 8]

Rank 0 is the server, rank 1 the worker, training the MNIST-1D CNN. Alternating, the worker
  alone      runs its local steps with no exchange (the server idles, waiting politely)
  easgd      runs a real `hpcopt train` (exchanges every tau steps, the server records the
             trajectory and evaluates the center)
and the benchmark prints samples/s of the worker for both and their ratio (goal >= 0.9).
"""

import argparse
import statistics
import tempfile
import time

import mpi4py

mpi4py.rc.thread_level = "funneled"
import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

from hpcopt import config as C  # noqa: E402
from hpcopt.comm.wait import wait_all  # noqa: E402
from hpcopt.data import load_data  # noqa: E402
from hpcopt.models import FlatModel, build_model  # noqa: E402
from hpcopt.roles.worker import prepare, run_worker  # noqa: E402
from hpcopt.roles.train import train  # noqa: E402


class NoCommunication:
    """The baseline: a worker that never exchanges (the same loop, every call a no-op)."""

    def __init__(self, params):
        self.params = params  # the worker's own parameters: no staging

    def exchange(self, header):
        pass

    fetch = exchange

    def poll_notices(self):
        return False

    def heartbeat(self, worker_id, step, every):
        pass

    def done(self, worker_id, step, reason=0):
        pass


def alone(cfg, comm, data):
    """Rank 1 trains with no communication; rank 0 waits politely (as an idle server does)."""
    result = None
    if comm.rank == 1:
        torch.manual_seed(cfg.run.seed)
        flat = FlatModel(build_model(cfg.model.name))
        ready = prepare(cfg, 0, flat, data)
        result = run_worker(cfg, 0, ready, NoCommunication(ready.mirror.host), time.monotonic())
    wait_all([comm.Ibarrier()], 600, "the other rank to finish its solo training")
    return comm.bcast(result, root=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tau", type=int, default=8)
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    if comm.size != 2:
        raise SystemExit("run with exactly 2 ranks: mpirun -n 2 python benchmarks/throughput.py")
    torch.set_num_threads(1)
    tmp = comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None)
    cfg = C.load(None, {"run.method": "eamsgd", "train.epochs": args.epochs, "train.lr": 0.1,
                        "easgd.tau": args.tau, "run.out": f"{tmp}/run"})
    data = load_data("mnist1d")
    rates = {"alone": [], "easgd": []}
    for r in range(args.rounds):
        res = alone(cfg, comm, data)
        rates["alone"].append(res.samples / res.seconds)
        res = train(cfg, force=True, log=lambda *a: None).worker
        res = comm.bcast(res if comm.rank == 1 else None, root=1)
        rates["easgd"].append(res.samples / res.seconds)
    if comm.rank == 0:
        a, e = statistics.median(rates["alone"]), statistics.median(rates["easgd"])
        print(f"worker samples/s, median of {args.rounds} alternating rounds of {args.epochs:g} epochs:")
        print(f"  alone (no communication) {a:10.0f}")
        print(f"  easgd (tau={args.tau})            {e:10.0f}")
        print(f"  ratio                    {e / a:10.3f}")
        print("  rounds: alone " + " ".join(f"{r:.0f}" for r in rates["alone"])
              + " | easgd " + " ".join(f"{r:.0f}" for r in rates["easgd"]))


if __name__ == "__main__":
    main()
