"""Parallel efficiency of a 2-D landscape grid: `hpcopt analyze` on 1 rank and on N ranks.

    .venv/bin/python benchmarks/analyze_grid.py runs/demo/trajectory.h5 [--ranks 2] [--grid 21x21] [--rounds 2]

Runs the same random 2-D slice (nothing else) alternately on 1 and on N ranks, each into a fresh
results file, and reads back the seconds the grid itself took (recorded in the file: start-up,
imports and data loading are not part of it). Prints the medians, the speed-up and the parallel
efficiency t1 / (N tN) (goal on a 2-core machine at N = 2: >= 0.8), and checks that both give
the same values.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np


def grid_once(file: str, ranks: int, grid: str) -> tuple[float, float, np.ndarray]:
    out = Path(tempfile.mkdtemp())
    cmd = [sys.executable, "-m", "hpcopt", "analyze", file, "--out", str(out), "--grid", grid, "--line-points", "1",
           "--skip", "trajectory,pca,interpolation,hessian,sharpness", "--no-report", "--no-progress"]
    # the baseline runs under mpirun too: same launcher, same process binding
    cmd = ["mpirun", "--oversubscribe", "-n", str(ranks)] + cmd
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    with h5py.File(out / "analysis.h5", "r") as f:
        g = f["grids/random_2d"]
        return float(g.attrs["seconds"]), float(g.attrs["cpu_seconds"]), g["loss"][()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--grid", default="21x21")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    load = f"{os.getloadavg()[0]:.1f}"
    t1, tn, c1, cn = [], [], [], []
    for _ in range(a.rounds):
        s, c, loss1 = grid_once(a.file, 1, a.grid)
        t1.append(s)
        c1.append(c)
        s, c, lossn = grid_once(a.file, a.ranks, a.grid)
        tn.append(s)
        cn.append(c)
        assert np.array_equal(loss1, lossn), "1 rank and N ranks gave different grids"
    m1, mn = statistics.median(t1), statistics.median(tn)
    print(f"grid {a.grid} ({loss1.size} points) on {a.file}; load average before/after: {load}, {os.getloadavg()[0]:.1f}")
    print(f"  1 rank:   {m1:.2f} s   (runs: {', '.join(f'{t:.2f}' for t in t1)}; CPU {statistics.median(c1):.2f} s)")
    print(f"  {a.ranks} ranks:  {mn:.2f} s   (runs: {', '.join(f'{t:.2f}' for t in tn)}; CPU {statistics.median(cn):.2f} s summed)")
    print(f"  speed-up {m1 / mn:.2f}x, parallel efficiency {m1 / (a.ranks * mn):.2f} (goal >= 0.8); identical values")
    print(f"  CPU of 1 rank / CPU of {a.ranks} ranks: {statistics.median(c1) / statistics.median(cn):.2f} "
          f"(below 1: work the parallel run adds; the efficiency is only meaningful on otherwise idle cores)")

if __name__ == "__main__":
    main()
