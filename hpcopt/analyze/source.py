"""A recorded run, read back for analysis: parameter snapshots, tables, the run's config, and
named points ("center", "worker:2", "init", "runs/b/trajectory.h5#center:-1").

Plain h5py, no MPI: every rank that needs the run reads the file on its own (read-only, no
locking, so a run that is still training can be analysed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tomllib

from hpcopt.io.inspect import TrajectoryError, open_trajectory


@dataclass
class Run:
    """Everything the analysis reads from one trajectory file (parameters as float32 arrays)."""

    path: str
    method: str
    status: str
    attrs: dict
    config: object                     # hpcopt.config.Config
    layout: dict                       # names, shapes, offsets of the flat vector
    center: np.ndarray                 # [n_center, P]
    center_meta: np.ndarray            # exchanges, time
    workers: np.ndarray                # [n_worker_snapshots, P]
    workers_meta: np.ndarray           # worker_id, step, exchange, time
    exchanges: np.ndarray
    evals: np.ndarray
    events: np.ndarray
    label: str = field(default="")

    @property
    def n_parameters(self) -> int:
        return int(self.center.shape[1])

    @property
    def worker_ids(self) -> list[int]:
        ids = {int(w) for w in self.workers_meta["worker_id"]} if len(self.workers_meta) else set()
        if len(self.exchanges):
            ids |= {int(w) for w in np.unique(self.exchanges["worker_id"])}
        return sorted(ids)


def load_run(path: str | Path, probe: bool = True) -> Run:
    """Read a trajectory file (or run directory). Raises TrajectoryError with a clear message
    for a missing, foreign, corrupt, empty or newer-schema file. probe=False: the caller has
    already checked the file's metadata (hpcopt.io.inspect.probe_trajectory)."""
    from hpcopt import config as C

    with open_trajectory(path, probe=probe) as f:
        try:
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            try:
                cfg = C.from_dict(tomllib.loads(str(attrs["config"])), origin=f"{f.filename} (config attribute)")
            except (KeyError, tomllib.TOMLDecodeError, C.ConfigError) as e:
                raise TrajectoryError(f"{f.filename}: cannot read the run's config attribute ({e})") from None
            m = f["model"].attrs
            layout = {k: json.loads(m[k]) for k in ("names", "shapes", "offsets")}
            run = Run(path=str(f.filename), method=str(attrs.get("method", "")), status=str(attrs.get("status", "")),
                      attrs=attrs, config=cfg, layout=layout,
                      center=f["center/params"][()], center_meta=f["center/meta"][()],
                      workers=f["workers/params"][()], workers_meta=f["workers/meta"][()],
                      exchanges=f["exchanges"][()], evals=f["evals"][()], events=f["events"][()])
        except (KeyError, OSError) as e:
            raise TrajectoryError(f"{f.filename}: damaged or incomplete trajectory ({e})") from None
    if run.center.shape[0] == 0:
        raise TrajectoryError(f"{run.path} holds no center snapshot yet; nothing to analyse")
    run.label = label_of(run.path)
    return run


def label_of(path: str) -> str:
    """A short name for a run in legends: its run directory's name."""
    p = Path(path)
    return p.parent.name if p.name == "trajectory.h5" else p.stem


def point(run: Run, spec: str) -> tuple[str, np.ndarray]:
    """A saved model of `run` by name: `center` (the last snapshot), `center:I` (row I, negative
    counts from the end), `init` (center row 0), `worker:ID` (that worker's last snapshot) or
    `worker:ID:K` (its K-th snapshot). Returns (label, float32 vector). A name that is malformed,
    out of range or of a worker never recorded is a ValueError saying what there is."""
    kind, *rest = spec.split(":")
    try:
        numbers = [int(r) for r in rest]
    except ValueError:
        numbers = None
    if kind in ("center", "init") and numbers is not None and len(numbers) <= (1 if kind == "center" else 0):
        i = numbers[0] if numbers else 0 if kind == "init" else -1
        n = len(run.center)
        return (spec, run.center[_row(spec, i, n, f"{run.path} has {n} center snapshots")].copy())
    if kind == "worker" and numbers is not None and 1 <= len(numbers) <= 2:
        wid = numbers[0]
        rows = np.flatnonzero(run.workers_meta["worker_id"] == wid)
        if len(rows) == 0:
            recorded = sorted({int(w) for w in run.workers_meta["worker_id"]})
            raise ValueError(f"worker {wid} has no recorded snapshot in {run.path} ("
                             + (f"workers with snapshots: {', '.join(map(str, recorded))})" if recorded else
                                "no worker has one: record.worker_every may be 0)"))
        k = numbers[1] if len(numbers) > 1 else -1
        return (spec, run.workers[rows[_row(spec, k, len(rows), f"worker {wid} has {len(rows)} snapshots")]].copy())
    raise ValueError(f"model {spec!r} must be center, center:I, init, worker:ID or worker:ID:K")


def _row(spec: str, i: int, n: int, what: str) -> int:
    if not -n <= i < n:
        raise ValueError(f"model {spec!r}: index {i} out of range: {what} (0..{n - 1}, or -{n}..-1 from the end)")
    return i


def resolve_point(run: Run, spec: str, runs: dict | None = None) -> tuple[str, np.ndarray]:
    """Like `point`, also across runs: `OTHER.h5#worker:1` reads OTHER (cached in `runs`)."""
    if "#" not in spec:
        return point(run, spec)
    path, _, inner = spec.partition("#")
    runs = runs if runs is not None else {}
    if path not in runs:
        runs[path] = load_run(path)
    other = runs[path]
    if other.n_parameters != run.n_parameters:
        raise ValueError(f"{path} has {other.n_parameters} parameters, {run.path} has {run.n_parameters}: "
                         f"not the same model")
    label, vec = point(other, inner)
    return (f"{other.label}#{label}", vec)


def default_workers_last(run: Run) -> list[str]:
    """Specs of every worker's last snapshot."""
    if len(run.workers_meta) == 0:
        return []
    return [f"worker:{w}" for w in sorted({int(w) for w in run.workers_meta["worker_id"]})]
