"""Elasticity benchmark: how fast a join is, how fast a crash is detected, and whether the other
workers keep exchanging meanwhile. Real processes, real signals, real MPI (MNIST-1D CNN).

    .venv/bin/python benchmarks/elastic.py [--workers 3] [--worker-timeout 10]

1. `hpcopt train -n 1+W` (the launcher: ompi-server + mpirun) trains for a long time;
2. after a quiet interval, `hpcopt join RUN -n 1` adds a worker: seconds from launching it to
   its first exchange (server clock), against the start-up of an MPI job that only imports
   what a joiner imports (interpreter + torch + mpi4py + h5py start-up, measured in the same run);
3. after another interval, one of the first workers gets SIGKILL: seconds to the server's crash
   event (goal: within comm.worker_timeout);
4. a graceful stop; then, from the trajectory file: the others' exchanges per second in the
   window before and after each event, and their longest gap without any exchange.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def status(run):
    try:
        return json.loads((run / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def wait(what, pred, timeout=180):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def startup_seconds() -> float:
    t = time.time()
    subprocess.run(["mpirun", "--oversubscribe", "-n", "1", sys.executable, "-c",
                    "import torch, h5py; from mpi4py import MPI; import hpcopt.roles.train, hpcopt.roles.worker"],
                   env=ENV, check=True)
    return time.time() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--worker-timeout", type=float, default=10.0)
    ap.add_argument("--quiet", type=float, default=8.0, help="seconds between events")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hpcopt-elastic-"))
    run = tmp / "run"
    base = startup_seconds()
    train = subprocess.Popen([sys.executable, "-m", "hpcopt", "train", "-n", str(args.workers + 1), "--out", str(run),
                              "--train.epochs", "100000", "--record.flush_seconds", "0.5",
                              "--comm.worker_timeout", str(args.worker_timeout)],
                             env=ENV, stdout=open(tmp / "train.log", "w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        wait("the training to run", lambda: status(run).get("exchanges", 0) > 50)
        s = status(run)
        run_start = s["updated"] - s["elapsed_seconds"]  # wall clock of the servers' t = 0
        time.sleep(args.quiet)
        t_join = time.time()
        joiner = subprocess.Popen([sys.executable, "-m", "hpcopt", "join", str(run), "-n", "1"], env=ENV,
                                  stdout=open(tmp / "join.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        wait("the joiner", lambda: len(status(run).get("workers", [])) == args.workers + 1)
        time.sleep(args.quiet)
        victim = next(w for w in status(run)["workers"] if w["id"] == 1)
        t_kill = time.time()
        os.kill(victim["pid"], signal.SIGKILL)
        wait("the crash to be detected", lambda: 1 not in [w["id"] for w in status(run).get("workers", [])],
             timeout=args.worker_timeout * 3 + 30)
        time.sleep(args.quiet)
        os.kill(train.pid, signal.SIGINT)  # graceful stop
        train.wait(timeout=300)
        joiner.wait(timeout=60)
    finally:
        for p in (train,):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    with h5py.File(run / "trajectory.h5", "r") as f:
        ex = f["exchanges"][...]
        ev = f["events"][...]
    first_join_ex = ex[ex["worker_id"] == args.workers]["time"].min()
    crash = ev[(ev["kind"] == b"crash") & (ev["worker_id"] == 1)]["time"][0]
    join_s = run_start + first_join_ex - t_join
    crash_s = run_start + crash - t_kill
    print(f"MNIST-1D CNN, 1 server + {args.workers} workers on {os.cpu_count()} cores; comm.worker_timeout "
          f"{args.worker_timeout:g} s; run dir {run}")
    print(f"join: {join_s:.2f} s from `hpcopt join -n 1` to the joiner's first exchange; an MPI job that "
          f"only starts up and imports takes {base:.2f} s here, so the join itself took {join_s - base:.2f} s "
          f"beyond start-up (goal < 3 s)")
    print(f"crash: detected {crash_s:.2f} s after SIGKILL (goal: within comm.worker_timeout = "
          f"{args.worker_timeout:g} s)")
    others = [w for w in range(args.workers) if w != 1]
    w = args.quiet
    print(f"{'window':<34} {'exch/s of workers ' + str(others):>26} {'longest gap (s)':>16}")
    for name, t0 in (("join", t_join - run_start), ("crash", t_kill - run_start)):
        for label, lo, hi in ((f"{w:g} s before the {name}", t0 - w, t0), (f"{w:g} s after the {name}", t0, t0 + w)):
            sel = ex[(ex["time"] >= lo) & (ex["time"] < hi) & np.isin(ex["worker_id"], others)]
            times = np.concatenate([[lo], np.sort(sel["time"]), [hi]])
            print(f"{label:<34} {len(sel) / (hi - lo):>26.1f} {np.diff(times).max():>16.2f}")


if __name__ == "__main__":
    main()
