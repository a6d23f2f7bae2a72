"""Every method on MNIST-1D with 4 workers, side by side, against PyTorch DDP (gloo).

    .venv/bin/python benchmarks/compare.py [--epochs 30] [--workers 4]

Runs, one after the other on this machine, `hpcopt train` for each method (the asynchronous
ones with 1 server + W workers, the synchronous ones with W workers) and the DDP baseline
(benchmarks/ddp_baseline.py) with the same model, data, batch size per worker and epochs per
worker, and prints one table: final center (or average) test accuracy, wall time of training,
wall time to 90% test accuracy, and bytes sent + received per worker.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py

ROOT = Path(__file__).resolve().parent.parent
METHODS = {  # method -> (config, extra flags)
    "easgd": ("mnist1d_easgd.toml", ["--run.method", "easgd", "--train.momentum", "0.0"]),
    "eamsgd": ("mnist1d_easgd.toml", []),
    "mgrawa": ("mnist1d_mgrawa.toml", []),
    "lsgd": ("mnist1d_lsgd.toml", []),
    "dp-sgd": ("mnist1d_dp_sgd.toml", []),
    "local-sgd": ("mnist1d_local_sgd.toml", []),
    "diloco": ("mnist1d_diloco.toml", []),
}


def env():
    e = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             OMPI_MCA_rmaps_base_oversubscribe="1")
    return e


def time_to(curve, target):
    for t, _, acc in curve:
        if acc >= target:
            return t
    return None


def run_hpcopt(method, workers, epochs, out):
    config, extra = METHODS[method]
    ranks = workers + (0 if method in ("dp-sgd", "local-sgd", "diloco") else 1)
    cmd = ["mpirun", "-n", str(ranks), sys.executable, "-m", "hpcopt", "train", "--config",
           str(ROOT / "configs" / config), "--out", str(out), "--train.epochs", str(epochs),
           "--record.eval_seconds", "0.5", "--record.flush_seconds", "0.5", *extra]
    subprocess.run(cmd, check=True, env=env(), capture_output=True, text=True)
    with h5py.File(out / "trajectory.h5", "r") as f:
        ev = f["evals"][()]
        ex = f["exchanges"][()]
        curve = [(float(t), float(l), float(a)) for _, t, l, a in ev]
        return {"wall_seconds": float(f.attrs["wall_seconds"]), "curve": curve,
                "bytes_per_worker": float(ex["bytes"].sum()) / workers}


def run_ddp(workers, epochs, out):
    cmd = ["mpirun", "-n", str(workers), sys.executable, str(ROOT / "benchmarks" / "ddp_baseline.py"),
           "--epochs", str(epochs), "--out", str(out)]
    subprocess.run(cmd, check=True, env=env(), capture_output=True, text=True)
    r = json.loads(Path(out).read_text())
    r["curve"] = [tuple(c) for c in r["curve"]]
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=30, help="epochs per worker, every method")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hpcopt-compare-"))
    rows = []
    for method in args.methods.split(","):
        print(f"running {method} ...", flush=True)
        rows.append((method, run_hpcopt(method, args.workers, args.epochs, tmp / method)))
    print("running torch DDP (gloo) ...", flush=True)
    rows.append(("torch DDP (gloo)", run_ddp(args.workers, args.epochs, tmp / "ddp.json")))
    print(f"\nMNIST-1D CNN, {args.workers} workers, {args.epochs:g} epochs per worker, batch 100 per worker")
    print(f"{'method':18s} {'final acc':>9s} {'wall s':>7s} {'s to 90%':>9s} {'MB/worker':>10s}  note")
    for name, r in rows:
        acc = r["curve"][-1][2] if r["curve"] else float("nan")
        t90 = time_to(r["curve"], 0.90)
        note = "" if acc >= 0.94 else "below the paper's 94% within this budget"
        print(f"{name:18s} {100 * acc:8.2f}% {r['wall_seconds']:7.1f} "
              f"{(f'{t90:9.1f}' if t90 is not None else '    never'):>9s} {r['bytes_per_worker'] / 1e6:10.1f}  {note}")


if __name__ == "__main__":
    main()
