"""`analyze()`: the whole analysis of one run, collective over an MPI communicator (or none).

    from hpcopt.analyze import AnalyzeOptions, analyze
    results = analyze("runs/demo/trajectory.h5", AnalyzeOptions(skip=("hessian",)))   # one process
    # under mpirun: analyze(path, opts, comm=MPI.COMM_WORLD) on every rank

Rank 0 computes the cheap parts (trajectory measures, PCA), owns the results file and makes the
report; grid points (landscape slices, interpolations) go through the dynamic queue of
`parallel.run_queue`; Hessian-vector products are summed over ranks, each rank holding a part of
the data subsample, and every rank runs the same Lanczos / Hutchinson iterations on the summed
products (so all ranks stop together without further messages).

Each rank computes losses and products on its device (`opts.device`: by default the GPU of its
node-local rank when it has one, as training's workers do); the Lanczos basis and the probes stay
on that GPU when every rank has room for them there; what crosses MPI and the results go through
host memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from hpcopt.io import tensorboard
from hpcopt.io.inspect import TrajectoryError, probe_trajectory

from . import curvature as K
from . import landscape as L
from . import parallel as par
from . import pca as PCA
from . import trajectory as T
from .objective import make_objective, subsample
from .options import PARTS, AnalyzeOptions, out_dir  # noqa: F401  (re-exported)
from .source import Run, default_workers_last, load_run, resolve_point
from .store import Grid, ResultsError, open_results, replace_group, write_tree


class _Progress:
    """A tqdm bar on rank 0 (none elsewhere, or when progress is off)."""

    def __init__(self, enabled: bool, total: int, desc: str, unit: str = "pt"):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, **post) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if post:
                self.bar.set_postfix(**post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Session:
    """State of one analysis on one rank."""

    def __init__(self, path: str, opts: AnalyzeOptions, comm, log, device: str = "cpu"):
        self.opts, self.comm, self.log, self.device = opts, comm, log, device
        self.rank = comm.rank if comm is not None else 0
        self.size = comm.size if comm is not None else 1
        self.probe(path)
        self.run: Run = load_run(path, probe=False)
        self.others: dict = {}
        self.out = out_dir(path, opts)
        self.f, error = None, None
        if self.rank == 0:
            try:
                run_id = str(self.run.attrs.get("run_id") or os.path.realpath(self.run.path))
                self.f = open_results(self.out / "analysis.h5", self.run.path, run_id)
            except (ResultsError, OSError) as e:
                error = str(e)
        error = par.bcast(comm, error, opts.timeout, "whether rank 0 opened the results file")
        if error:  # raised on every rank, so none waits for the others
            raise ResultsError(error)
        self.results: dict = {"run": _summary(self.run), "grids": {}, "options": asdict(opts)}
        self.data = None
        self.started = time.monotonic()
        self.points_done = 0
        self.stopped = False
        pb = opts.progress
        if pb is None:
            import sys
            pb = sys.stderr.isatty()
        self.progress = bool(pb) and self.rank == 0

    # ---- helpers -------------------------------------------------------------------------
    def bcast(self, obj, what: str):
        return par.bcast(self.comm, obj, self.opts.timeout, what)

    def load_data(self) -> dict:
        if self.data is None:
            from hpcopt.data import load_data

            cfg = self.run.config
            data = load_data(cfg.data.name, cfg.data.seed) if self.rank == 0 else None
            self.data = self.bcast(data, "the data set from rank 0")
        return self.data

    def probe(self, path: str) -> None:
        """Collective: rank 0 checks the trajectory's metadata in a child process (a damaged
        file can crash HDF5), and every rank raises its TrajectoryError, so none waits."""
        error = None
        if self.rank == 0:
            try:
                probe_trajectory(path)
            except TrajectoryError as e:
                error = str(e)
        error = self.bcast(error, f"whether rank 0 could read {path}")
        if error:
            raise TrajectoryError(error)

    def point(self, spec: str) -> tuple[str, np.ndarray]:
        other = spec.partition("#")[0] if "#" in spec else None
        if other is not None and other not in self.others:  # another run's model: probed as this one was
            self.probe(other)
            self.others[other] = load_run(other, probe=False)
        return resolve_point(self.run, spec, self.others)

    def stop(self) -> bool:
        o = self.opts
        if o.max_points and self.points_done >= o.max_points:
            return True
        return bool(o.time_limit and time.monotonic() - self.started > o.time_limit)

    # ---- parts ---------------------------------------------------------------------------
    def trajectory(self) -> None:
        if self.rank != 0:
            return
        m = T.measures(self.run)
        self.results["trajectory"] = m
        self.results["curves"] = T.curves(self.run)
        g = replace_group(self.f, "trajectory")
        write_tree(g, {
            "center_time": m["center_time"], "center_exchanges": m["center_exchanges"],
            "center_path_length": m["center_path_length"], "center_displacement": m["center_displacement"],
            "center_distance_from_init": m["center_distance_from_init"],
            "spread_time": m["spread_time"], "spread": m["spread"],
            "membership_time": m["membership"][0], "membership_workers": m["membership"][1],
            "per_layer": m["per_layer"],
            "workers": {str(w): v for w, v in m["workers"].items()},
        })
        self.f.flush()

    def pca(self) -> None:
        if self.rank != 0 or len(self.run.center) + len(self.run.workers) < 3:
            return  # a plane needs at least three snapshots (a run that has only just started)
        fit, paths = PCA.run_pca(self.run, k=2)
        self.results["pca"] = {"fit": fit, "paths": paths}
        g = replace_group(self.f, "pca")
        write_tree(g, {"origin": fit.origin, "components": fit.components, "explained": fit.explained,
                       "singular_values": fit.singular_values,
                       "paths": {k.replace(":", "_"): v for k, v in paths.items()}})
        self.f.flush()

    def grid(self, name: str, spec: dict, origin: np.ndarray, directions: np.ndarray,
             xs: np.ndarray, ys: np.ndarray | None, objective) -> None:
        """Collective: evaluate one slice (or line) through the dynamic queue, resuming from
        the done-mask of an earlier run."""
        if self.stopped:
            return
        todo, grid = [], None
        if self.rank == 0:
            grid = Grid(self.f, name, spec, origin, directions, xs, ys)
            todo = grid.todo()
        # the slice's definition comes from rank 0, so every rank evaluates the same points
        origin, directions, xs, ys, n = self.bcast((origin, directions, xs, ys, len(todo)), f"slice {name}")
        if n:
            bar = _Progress(self.progress, n, name)

            def compute(i: int) -> tuple:
                return objective.loss_accuracy(torch.from_numpy(L.grid_point(origin, directions, xs, ys, i)))

            def on_results(res: list) -> None:
                grid.record(res)
                self.points_done += len(res)
                bar.update(len(res))

            t0, c0 = time.perf_counter(), time.process_time()
            try:
                par.run_queue(self.comm, todo, compute, timeout=self.opts.timeout,
                              on_results=on_results if self.rank == 0 else None, stop=self.stop)
            finally:
                bar.close()  # also on Ctrl-C: the bar's line ends before "interrupted" is said
            seconds = time.perf_counter() - t0
            cpu = par.allreduce_sum(self.comm, np.array([time.process_time() - c0]), self.opts.timeout)
            if self.rank == 0:  # what this (last) pass over the grid took, for benchmarks
                grid.g.attrs["seconds"] = seconds
                grid.g.attrs["cpu_seconds"] = float(cpu[0])  # summed over ranks
                grid.g.attrs["ranks"] = self.size
                grid.g.attrs["points_computed"] = n
        if self.rank == 0:
            grid.flush()
            self.results["grids"][name] = {"spec": spec, "x": xs, "y": ys, "loss": grid.loss.copy(),
                                           "accuracy": grid.accuracy.copy(), "done": grid.done.copy()}
            if not grid.complete:
                self.stopped = True
        self.stopped = self.bcast(self.stopped, "whether the grid stopped early")

    def landscapes(self) -> None:
        o = self.opts
        data = self.load_data()
        x, y = data[f"x_{o.split}"], data[f"y_{o.split}"]
        idx = subsample(len(x), o.samples, o.seed)
        from hpcopt.models import build_model
        torch.manual_seed(0)
        from .objective import Objective
        obj = Objective(build_model(self.run.config.model.name, self.run.config.model.kwargs), self.run.layout,
                        x[idx], y[idx], batch=o.batch, device=self.device)
        at_label, at = self.point(o.at)
        base = {"split": o.split, "samples": len(idx), "subsample_seed": o.seed, "at": at_label}
        nx, ny = o.grid
        if o.wants("landscape"):
            d1 = L.filter_normalized(at, self.run.layout, seed=o.seed)
            d2 = L.filter_normalized(at, self.run.layout, seed=o.seed + 1)
            norm = {"directions": "random, filter-normalised (Li et al. 2018)", "one_d_parameters": "zero",
                    "direction_seeds": [o.seed, o.seed + 1]}
            self.grid("random_1d", {**base, **norm, "kind": "1d"}, at, d1[None], L.axis(-o.span, o.span, o.line_points),
                      None, obj)
            self.grid("random_2d", {**base, **norm, "kind": "2d"}, at, np.stack([d1, d2]),
                      L.axis(-o.span, o.span, nx), L.axis(-o.span, o.span, ny), obj)
            if o.wants("pca") and self.rank == 0 and len(self.run.center) + len(self.run.workers) >= 3:
                fit = PCA.fit(np.concatenate([self.run.center] + ([self.run.workers] if len(self.run.workers) else [])),
                              at, 2)
                coords = fit.project(np.concatenate([self.run.center] + ([self.run.workers] if len(self.run.workers) else [])))
                lo, hi = coords.min(axis=0), coords.max(axis=0)
                pad = 0.15 * np.maximum(hi - lo, 1e-6)
                pca_def = (fit.components, L.axis(lo[0] - pad[0], hi[0] + pad[0], nx),
                           L.axis(lo[1] - pad[1], hi[1] + pad[1], ny), fit.explained)
            else:
                pca_def = None
            pca_def = self.bcast(pca_def, "the PCA plane")
            if pca_def is not None:
                comps, xs, ys, explained = pca_def
                self.grid("pca_2d", {**base, "kind": "2d", "directions": "PCA of center and worker snapshots "
                                     "around the slice's origin (Li et al. 2018)", "explained": list(map(float, explained))},
                          at, comps, xs, ys, obj)
        if o.plane and o.wants("landscape"):
            pts = [self.point(s) for s in o.plane]
            origin, dirs = L.plane_through(*[p for _, p in pts])
            ax = L.axis(-0.5, 1.5, nx)
            self.grid("plane", {**base, "kind": "2d" if len(pts) == 3 else "1d", "directions": "through saved models",
                                "models": [lab for lab, _ in pts]}, origin, dirs, ax,
                      L.axis(-0.5, 1.5, ny) if len(pts) == 3 else None, obj)
        if o.wants("interpolation"):
            pairs = list(o.interpolate) or (["init,center"] + [f"center,{w}" for w in default_workers_last(self.run)])
            ts = L.axis(-0.25, 1.25, o.interp_points) if o.interp_points > 1 else np.array([0.0, 1.0])
            ts = np.union1d(np.round(ts, 12), [0.0, 1.0])  # the end points are always on the line
            for k, pair in enumerate(pairs):
                a_spec, b_spec = pair.split(",")
                (la, a), (lb, b) = self.point(a_spec.strip()), self.point(b_spec.strip())
                origin, dirs = L.plane_through(a, b)
                self.grid(f"interp_{k}", {**base, "kind": "interpolation", "a": la, "b": lb}, origin, dirs, ts, None, obj)
                if self.rank == 0 and f"interp_{k}" in self.results["grids"]:
                    g = self.results["grids"][f"interp_{k}"]
                    if g["done"].all():
                        g["barrier"] = L.barrier(ts, g["loss"])
                        write_tree(self.f.require_group(f"grids/interp_{k}"), g["barrier"])

    def basis_device(self, dim: int, rows: int) -> str:
        """Where the Lanczos basis (rows x dim float64) lives: on this rank's GPU when every rank
        computes on one and has room for it there, else in host memory. The room: what the GPU
        has free (and its allocator holds unused), shared by the ranks on it, less 40% left for
        the products' graphs. One decision for all ranks, so they run the same arithmetic."""
        import zlib

        need = rows * dim * 8
        wants = self.device != "cpu" and rows > 0
        # ranks per GPU: a count per (host, GPU) slot of a small table (a collision counts more
        # ranks, never fewer); a second sum then says whether every rank has room
        slot = zlib.crc32(f"{socket.gethostname()}:{self.device}".encode()) % 256
        table = np.zeros(256)
        table[slot] = wants
        counts = par.allreduce_sum(self.comm, table, self.opts.timeout, "where the Lanczos basis lives")
        fits = 0.0
        if wants:
            dev = torch.device(self.device)
            free, _ = torch.cuda.mem_get_info(dev)
            free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
            fits = float(need * counts[slot] <= 0.6 * free)
        agreed = par.allreduce_sum(self.comm, np.array([fits]), self.opts.timeout, "where the Lanczos basis lives")
        on_gpu = rows > 0 and agreed[0] == self.size
        if self.rank == 0 and wants:
            self.log(f"[hpcopt analyze] Lanczos basis ({rows} x {dim} float64, {need / 2 ** 30:.2f} GiB) "
                     + ("on the GPU" if on_gpu else "in host memory (not every rank's GPU has room for it)"))
        return self.device if on_gpu else "cpu"

    def curvature(self) -> None:
        o = self.opts
        data = self.load_data()
        obj = make_objective(self.run, data, split=o.split, samples=o.curvature_samples, seed=o.seed,
                             rank=self.rank, size=self.size, batch=o.batch, device=self.device)
        at_label, at = self.point(o.at)
        w = torch.from_numpy(at)  # sharpness steps from it on the CPU
        w_dev = obj.on_device(w)  # the point of every HVP, moved to the device once
        P = len(at)
        idx = subsample(len(data[f"x_{o.split}"]), o.curvature_samples, o.seed)
        depends = {"at": at_label, "split": o.split, "samples": len(idx), "subsample_seed": o.seed,
                   "probe_seed": o.seed, "loss": "mean cross-entropy (or the model's own loss)",
                   "ranks": self.size}
        out: dict = {"depends_on": depends}
        count = [0]

        def hvp(v: torch.Tensor) -> torch.Tensor:
            count[0] += 1
            hv = obj.hvp(w_dev, v)
            if self.comm is None or self.size == 1:
                return hv
            return torch.from_numpy(par.allreduce_sum(self.comm, hv.cpu().numpy(), o.timeout,
                                                   "a Hessian-vector product"))

        steps = o.lanczos_steps or max(3 * o.top_k, 30)
        # rows of vectors alive at once: the basis, then the k Ritz vectors beside it, and a few more
        rows = max(steps + o.top_k if o.wants("hessian") else 0, o.density_steps if o.wants("density") else 0)
        basis = self.basis_device(P, rows + 4 if rows else 0)
        t0 = time.monotonic()
        if o.wants("hessian"):
            bar = _Progress(self.progress, steps, "hessian eigenvalues", "step")
            eig = K.top_eigenvalues(hvp, P, o.top_k, steps=steps, seed=o.seed, progress=lambda j: bar.update(),
                                    device=basis)
            bar.close()
            bar = _Progress(self.progress, o.trace_max_probes, "hessian trace", "probe")
            tr = K.hutchinson_trace(hvp, P, rtol=o.trace_rtol, max_probes=o.trace_max_probes, seed=o.seed + 1,
                                    progress=lambda n, m, se: bar.update(1, trace=f"{m:.4g}", se=f"{se:.2g}"),
                                    device=basis)
            bar.close()
            out["eigenvalues"] = eig.values
            out["eigen_residuals"] = eig.residuals
            out["lanczos_steps"] = eig.iterations
            out["trace"] = tr.value
            out["trace_stderr"] = tr.stderr
            out["trace_probes"] = tr.probes
            out["trace_samples"] = tr.samples
            out["trace_rtol"] = o.trace_rtol
        if o.wants("density"):
            bar = _Progress(self.progress, o.density_runs * o.density_steps, "spectral density", "step")
            den = K.slq_density(hvp, P, runs=o.density_runs, steps=o.density_steps, seed=o.seed + 2,
                                progress=lambda j: bar.update(), device=basis)
            bar.close()
            out["density"] = {"grid": den.grid, "density": den.density, "nodes": den.nodes, "weights": den.weights,
                              "sigma": den.sigma}
        if o.wants("sharpness"):
            def loss_grad(x):
                f, g = obj.loss_grad(x)
                buf = par.allreduce_sum(self.comm, np.concatenate([[f], g.numpy().astype(np.float64)]), o.timeout,
                                        "a gradient")
                return float(buf[0]), torch.from_numpy(buf[1:].astype(np.float32))

            bar = _Progress(self.progress, o.sharpness_steps, "epsilon-sharpness", "step")
            sh = K.epsilon_sharpness(loss_grad, w, epsilon=o.sharpness_eps, steps=o.sharpness_steps,
                                     progress=lambda s: bar.update())
            bar.close()
            out["sharpness"] = {"value": sh.value, "loss": sh.loss, "max_loss": sh.max_loss, "epsilon": sh.epsilon,
                                "steps": sh.steps, "box": "|z_i| <= epsilon (|x_i| + 1) (Keskar et al. 2017)",
                                "ascent": "projected sign-gradient ascent from z = 0"}
        out["hvp_count"] = count[0]
        out["seconds"] = time.monotonic() - t0
        if self.rank == 0:
            self.results["curvature"] = out
            g = replace_group(self.f, "curvature")
            write_tree(g, {k: v for k, v in out.items() if k != "depends_on"})
            g.attrs["depends_on"] = json.dumps(depends)
            g.create_dataset("subsample_indices", data=idx)
            self.f.flush()


def choose_device(option: str, comm=None, timeout: float = 120.0, log=None) -> str:
    """This rank's torch device for the analysis option `option` (auto, cpu or cuda): for auto and
    cuda the GPU of the node-local rank (hpcopt.launch.device.select_device, by the launcher's
    variables; not collective by itself), for auto the CPU without a GPU. Collective over comm (one
    small sum): `cuda` on a rank without a GPU is a ValueError on every rank, so none waits for
    the others, and rank 0 logs one line saying where the analysis runs."""
    rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
    device, error, line = "cpu", None, "CPU (--device cpu)"
    if option != "cpu":
        from hpcopt.launch.device import local_rank_by_split, select_device

        # The launcher's variables pick the GPU, else the rank's place on its node (a split every
        # rank makes, so none waits). Whether MPI is CUDA-aware does not matter here (every sum is
        # on host buffers): not asking spares starting MPI in a plain Python process of the API.
        node_rank = local_rank_by_split(comm) if comm is not None else None
        choice = select_device("worker", node_rank=node_rank, ask_mpi=False)
        device = choice.device
        if device == "cpu":
            line = "CPU (no GPU available)"
            if option == "cuda":
                host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
                error = (f"--device cuda: rank {rank} on {host} has no GPU (torch.cuda.is_available() is False: "
                         f"no GPU or driver, CUDA_VISIBLE_DEVICES hides every GPU, or torch was built "
                         f"without CUDA); use --device auto or --device cpu")
        else:
            line = f"{device} (GPU {choice.gpu}), node-local rank {choice.local_rank} ({choice.local_rank_source})"
    counts = par.allreduce_sum(comm, np.array([device != "cpu", error is not None], dtype=np.float64), timeout,
                               "the ranks' devices")
    gpus, failed = int(counts[0]), int(counts[1])
    if failed:
        raise ValueError(error or f"--device cuda: {failed} of {size} ranks have no GPU (torch.cuda.is_available() "
                                  f"is False there); use --device auto or --device cpu")
    if rank == 0 and log is not None:
        if size == 1:
            log(f"[hpcopt analyze] device {line}")
        elif gpus == 0:
            log(f"[hpcopt analyze] device {line} on all {size} ranks")
        else:
            log(f"[hpcopt analyze] device of rank 0: {line}; {gpus} of {size} ranks on a GPU")
    return device


@contextlib.contextmanager
def _on(device: str):
    """On a GPU: that GPU is the current device (nothing lands on GPU 0 by default), and cuDNN
    computes in full float32 (no TF32) with deterministic algorithms, as the analysis needs;
    the previous settings come back afterwards. On the CPU: nothing."""
    if device == "cpu":
        yield
        return
    with full_float32(), torch.cuda.device(torch.device(device)):
        yield


# torch >= 2.9 sets TF32 through fp32_precision. A program may have used either API, and reading
# the legacy flags after the new ones were set raises, so the settings are saved through the new
# API where it exists (always readable) and TF32 is turned off through the legacy setters: they
# leave state that both APIs (and torch.backends.cudnn.flags()) read without complaint.
_NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


def _tf32_state() -> list:
    b = torch.backends
    if _NEW_API:
        return [(o, "fp32_precision") for o in (b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn)]
    return [(b.cuda.matmul, "allow_tf32"), (b.cudnn, "allow_tf32")]


@contextlib.contextmanager
def full_float32():
    """cuBLAS and cuDNN in full float32 (no TF32), deterministic cuDNN, no autotuning; the
    previous settings come back afterwards."""
    cudnn = torch.backends.cudnn
    kept = [(cudnn, "deterministic"), (cudnn, "benchmark")] + _tf32_state()
    saved = [getattr(owner, name) for owner, name in kept]
    cudnn.deterministic, cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = False
    cudnn.allow_tf32 = False
    try:
        yield
    finally:
        for (owner, name), value in zip(kept, saved):
            setattr(owner, name, value)


def _summary(run: Run) -> dict:
    ev = run.evals
    return {"path": run.path, "label": run.label, "method": run.method, "status": run.status,
            "parameters": run.n_parameters, "workers": run.worker_ids,
            "exchanges": len(run.exchanges), "center_snapshots": len(run.center),
            "worker_snapshots": len(run.workers),
            "final_test_accuracy": float(ev["test_accuracy"][-1]) if len(ev) else float("nan"),
            "final_test_loss": float(ev["test_loss"][-1]) if len(ev) else float("nan"),
            "wall_seconds": float(run.attrs.get("wall_seconds", float("nan")))}


def analyze(path: str, opts: AnalyzeOptions | None = None, comm=None, log=None) -> dict | None:
    """Analyse one run. Collective over `comm` (None: this process alone). Returns the results
    on rank 0 (also written to OUT/analysis.h5, and with opts.report the figures and
    report.html), None on other ranks. results['complete'] is False when max_points or
    time_limit stopped it early (run it again to resume). Each rank computes on the device
    opts.device gives it (`choose_device`; log gets the one line saying which, on rank 0)."""
    opts = opts or AnalyzeOptions()
    log = log or (lambda *a: None)
    if opts.tensorboard:
        _check_tensorboard(opts, comm)  # before anything is computed
    torch.set_num_threads(opts.threads)
    device = choose_device(opts.device, comm, opts.timeout, log)
    with _on(device):
        return _analyze(path, opts, comm, log, device)


def _analyze(path: str, opts: AnalyzeOptions, comm, log, device: str) -> dict | None:
    s = _Session(path, opts, comm, log, device)
    try:
        if opts.wants("trajectory"):
            s.trajectory()
        if opts.wants("pca"):
            s.pca()
        if any(opts.wants(p) for p in ("landscape", "interpolation")):
            s.landscapes()
        if not s.stopped and any(opts.wants(p) for p in ("hessian", "sharpness", "density")):
            s.curvature()
        par.barrier(comm, opts.timeout, "the other ranks to finish")
        if s.rank != 0:
            return None
        s.results["complete"] = not s.stopped
        s.results["out"] = str(s.out)
        s.results["seconds"] = time.monotonic() - s.started
        s.f.attrs["complete"] = not s.stopped
        if opts.report:
            from .report import write_report
            s.results["report"] = write_report(s.results, s.out)
        if opts.tensorboard:
            _write_tensorboard(s.results, opts.tensorboard, log)
        return s.results
    finally:
        if s.f is not None:
            s.f.close()


def compare(paths: list[str], opts: AnalyzeOptions | None = None, comm=None, out: str = "compare", log=None) -> dict | None:
    """Analyse several runs (each into its own RUN_DIR/analysis, resuming what is done) and put
    them side by side in OUT/compare.html. Collective over comm; returns on rank 0
    {'runs': [results...], 'report': path}."""
    from dataclasses import replace

    opts = opts or AnalyzeOptions()
    if opts.tensorboard:
        _check_tensorboard(opts, comm)
    all_results = []
    for p in paths:  # (their TensorBoard events below, once the labels are told apart)
        r = analyze(p, replace(opts, out=None, tensorboard=None), comm=comm, log=log)
        all_results.append(r)
    if comm is not None and comm.rank != 0:
        return None
    seen: dict = {}
    runs = []
    for r in all_results:  # distinct labels for legends, even for runs in same-named directories
        lab = r["run"]["label"]
        seen[lab] = seen.get(lab, 0) + 1
        if seen[lab] > 1:
            r["run"]["label"] = f"{lab} ({seen[lab]})"
        run = load_run(r["run"]["path"], probe=False)  # analyze() above has probed it
        run.label = r["run"]["label"]
        runs.append(run)
    shared = None
    if len({run.n_parameters for run in runs}) == 1 and sum(len(run.center) for run in runs) >= 3:
        shared = PCA.shared_pca(runs)
    from .report import write_compare

    if opts.tensorboard:  # one subdirectory per run: TensorBoard shows each as a run of its own
        for r in all_results:
            _write_tensorboard(r, Path(opts.tensorboard) / re.sub(r"[^\w.-]+", "_", r["run"]["label"]), log)
    return {"runs": all_results, "report": write_compare(all_results, Path(out), shared)}


def _check_tensorboard(opts: AnalyzeOptions, comm) -> None:
    """--tensorboard DIR: the package imports and rank 0 (the one that writes) can create DIR and
    write in it; else the same ValueError on every rank, before anything is analysed."""
    tensorboard.require()
    error = None
    if comm is None or comm.rank == 0:
        try:
            tensorboard.check_dir(opts.tensorboard)
        except ValueError as e:
            error = str(e)
    error = par.bcast(comm, error, opts.timeout, "whether rank 0 can write the TensorBoard directory")
    if error:
        raise ValueError(error)


def _write_tensorboard(results: dict, log_dir, log) -> None:
    """Rank 0: the analysis's numbers (report.tensorboard_scalars) and its table as TensorBoard
    events in log_dir, replacing an earlier analysis's there (the training's events stay)."""
    from .report import numbers, tensorboard_scalars

    scalars = tensorboard_scalars(results)
    tensorboard.clear(log_dir, tensorboard.ANALYZE_SUFFIX)
    events = tensorboard.EventLog(log_dir, suffix=tensorboard.ANALYZE_SUFFIX, log=log,
                                  goes_on="the analysis's other results are written")
    for tag, step, value in scalars:
        events.scalars(step, {tag: value})
    table = "| | |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in numbers(results))
    events.text("analysis/summary", table, max((s for _, s, _ in scalars), default=0))
    events.close(timeout=60)
    if not events.failed:
        results["tensorboard"] = str(log_dir)
