"""A small flatness study: train DP-SGD, EASGD (EAMSGD), LSGD and MGRAWA on MNIST-1D with 4
workers each, then measure the curvature where each ended and print one table (test accuracy,
top Hessian eigenvalue, Hessian trace, epsilon-sharpness), as in the GRAWA paper's tables.

    .venv/bin/python benchmarks/study.py [--epochs 30] [--out runs/study] [--samples 1000]

Each method trains with its config in configs/ (the same epochs per worker for all) by
`mpirun -n 5` (4 for DP-SGD, which has no server); then `hpcopt analyze --compare` measures all
runs on the same 1000 training samples and writes OUT/compare/compare.html. A run whose
trajectory is already complete in OUT is not trained again.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import h5py

METHODS = [("dp-sgd", "configs/mnist1d_dp_sgd.toml", 4), ("eamsgd", "configs/mnist1d_easgd.toml", 5),
           ("lsgd", "configs/mnist1d_lsgd.toml", 5), ("mgrawa", "configs/mnist1d_mgrawa.toml", 5)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--ranks", type=int, default=2, help="ranks for the analysis")
    a = ap.parse_args()
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    mpirun = ["mpirun", "--oversubscribe"]
    runs = []
    for name, config, n in METHODS:
        out = Path(a.out) / name
        path = out / "trajectory.h5"
        done = False
        if path.exists():
            with h5py.File(path, "r", locking=False) as f:
                done = f.attrs.get("status") == "complete"
        if not done:
            print(f"training {name} ({a.epochs:g} epochs per worker) ...", flush=True)
            subprocess.run(mpirun + ["-n", str(n), sys.executable, "-m", "hpcopt", "train", "--config", config,
                                     "--out", str(out), "--train.epochs", str(a.epochs), "--force"],
                           check=True, env=env, stdout=subprocess.DEVNULL)
        runs.append(str(path))
    print("analysing ...", flush=True)
    cmd = mpirun + ["-n", str(a.ranks), sys.executable, "-m", "hpcopt", "analyze", runs[0], "--compare", *runs[1:],
                    "--out", str(Path(a.out) / "compare"), "--skip", "landscape,interpolation",
                    "--curvature-samples", str(a.samples), "--no-progress"]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    print(f"\n{'method':<8} {'test acc':>9} {'top eig':>9} {'trace':>16} {'eps-sharp':>10}")
    for name, path in zip([m[0] for m in METHODS], runs):
        with h5py.File(Path(path).parent / "analysis" / "analysis.h5", "r") as f, \
                h5py.File(path, "r", locking=False) as t:
            cv = f["curvature"]
            acc = 100 * float(t["evals"]["test_accuracy"][-1])
            print(f"{name:<8} {acc:>8.2f}% {cv['eigenvalues'][0]:>9.4g} "
                  f"{cv.attrs['trace']:>9.4g} +- {cv.attrs['trace_stderr']:<4.2g} {cv['sharpness'].attrs['value']:>10.4g}")
    print(f"\n(final center / average of each run, {a.samples} training samples; report: "
          f"{Path(a.out) / 'compare' / 'compare.html'})")


if __name__ == "__main__":
    main()
