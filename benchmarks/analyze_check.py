"""The curvature `hpcopt analyze` reports, against an independent implementation, on a run.

    .venv/bin/python benchmarks/analyze_check.py runs/demo/trajectory.h5 [--samples 1000] [--exact-trace]

Runs `hpcopt analyze` (curvature only) on the final center and then recomputes the same
numbers on the same data subsample without any hpcopt.analyze code: the model rebuilt in
float64, Hessian-vector products by forward-over-reverse (torch.func.jvp of torch.func.grad,
not hpcopt's double backward), the top eigenvalues by ARPACK (scipy.sparse.linalg.eigsh), and
with --exact-trace the exact trace as the sum of all P diagonal entries e_i^T H e_i (P products,
batched with vmap). Prints both sides, the relative difference of the top eigenvalue (goal: 2%)
and the trace difference in units of the estimator's reported standard error.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, eigsh
from torch.func import functional_call, grad, jvp, vmap

from hpcopt.data import load_data
from hpcopt.io.inspect import open_trajectory
from hpcopt.models import build_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--exact-trace", action="store_true")
    ap.add_argument("--ranks", type=int, default=1, help="run hpcopt analyze under mpirun -n RANKS")
    a = ap.parse_args()
    torch.set_num_threads(1)

    out = Path(tempfile.mkdtemp())
    cmd = [sys.executable, "-m", "hpcopt", "analyze", a.file, "--out", str(out), "--skip",
           "trajectory,pca,landscape,interpolation,sharpness", "--curvature-samples", str(a.samples), "--no-report"]
    if a.ranks > 1:
        cmd = ["mpirun", "--oversubscribe", "-n", str(a.ranks)] + cmd
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    t_hpcopt = time.perf_counter() - t
    with h5py.File(out / "analysis.h5", "r") as f:
        cv = f["curvature"]
        eig = cv["eigenvalues"][()]
        res = cv["eigen_residuals"][()]
        trace, se, probes = cv.attrs["trace"], cv.attrs["trace_stderr"], cv.attrs["trace_probes"]
        idx = cv["subsample_indices"][()]
        depends = json.loads(cv.attrs["depends_on"])

    with open_trajectory(a.file) as f:
        import tomllib
        cfg = tomllib.loads(f.attrs["config"])
        w0 = f["center/params"][-1]
        names = json.loads(f["model"].attrs["names"])
        shapes = json.loads(f["model"].attrs["shapes"])
    data = load_data(cfg["data"]["name"], cfg["data"]["seed"])
    x = torch.from_numpy(data["x_train"][idx]).double()
    y = torch.from_numpy(data["y_train"][idx])
    model = build_model(cfg["model"]["name"], cfg["model"]["kwargs"]).double()
    w = torch.from_numpy(w0).double()
    sizes = [int(np.prod(s)) for s in shapes]

    def loss(v):
        params = dict(zip(names, (p.view(s) for p, s in zip(torch.split(v, sizes), shapes))))
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    g = grad(loss)

    def hvp(v):
        return jvp(g, (w,), (v,))[1]

    P = len(w)
    t = time.perf_counter()
    op = LinearOperator((P, P), matvec=lambda v: hvp(torch.from_numpy(np.asarray(v).reshape(-1))).numpy(),
                        dtype=np.float64)
    ref = np.sort(eigsh(op, k=len(eig), which="LA", tol=1e-8, return_eigenvectors=False))[::-1]
    t_ref = time.perf_counter() - t
    print(f"model {cfg['model']['name']} ({P} parameters), {len(idx)} {depends['split']} samples, final center")
    print(f"hpcopt analyze ({a.ranks} rank(s), {t_hpcopt:.1f} s incl. start-up):")
    print(f"  top eigenvalues  {np.array2string(eig, precision=5)}  (residuals {np.array2string(res, precision=1)})")
    print(f"  trace            {trace:.5g} +- {se:.2g}  ({probes} probes)")
    print(f"independent (float64, forward-over-reverse HVP, ARPACK eigsh, {t_ref:.1f} s):")
    print(f"  top eigenvalues  {np.array2string(ref, precision=5)}")
    rel = abs(eig[0] - ref[0]) / abs(ref[0])
    print(f"top eigenvalue relative difference {100 * rel:.4f}%  (goal <= 2%)")
    if a.exact_trace:
        t = time.perf_counter()
        diag = []
        eye = torch.eye(P, dtype=torch.float64)
        for i in range(0, P, 64):
            block = eye[i:i + 64]
            diag.append((vmap(hvp)(block) * block).sum(1))
        exact = float(torch.cat(diag).sum())
        print(f"exact trace (sum of the {P} diagonal entries, {time.perf_counter() - t:.1f} s): {exact:.5g}")
        print(f"trace difference {trace - exact:+.4g} = {(trace - exact) / se:+.2f} reported standard errors")


if __name__ == "__main__":
    main()
