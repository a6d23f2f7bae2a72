"""Reading a trajectory file back: a summary for `hpcopt inspect`, with plain h5py.

Opens without file locking, so a run that is still writing can be inspected."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import schema


class TrajectoryError(ValueError):
    """The file is missing, not HDF5, not an hpcopt trajectory, or of an unknown schema."""


def open_trajectory(path: str | Path):
    import h5py

    path = Path(path)
    if not path.exists():
        raise TrajectoryError(f"{path} does not exist")
    if path.is_dir():
        if (path / "trajectory.h5").exists():
            path = path / "trajectory.h5"
        else:
            raise TrajectoryError(f"{path} is a directory without a trajectory.h5")
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        raise TrajectoryError(f"{path} is not a readable HDF5 file ({e})") from None
    fmt = f.attrs.get("format")
    if fmt != schema.FORMAT:
        f.close()
        raise TrajectoryError(f"{path} is an HDF5 file but not an hpcopt trajectory "
                              f"(attribute format={fmt!r}, expected {schema.FORMAT!r})")
    version = int(f.attrs.get("schema_version", -1))
    if version > schema.SCHEMA_VERSION or version < 1:
        f.close()
        raise TrajectoryError(f"{path} has schema version {version}; this hpcopt reads 1..{schema.SCHEMA_VERSION}")
    return f


def summarize(path: str | Path) -> dict:
    """The run's summary; a damaged file (a missing field, a garbled attribute or dataset) is a
    TrajectoryError that says so, never a traceback."""
    try:
        return _summarize(path)
    except TrajectoryError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, OSError, RuntimeError, MemoryError, json.JSONDecodeError) as e:
        raise TrajectoryError(f"{path} is damaged: {type(e).__name__}: {e}") from None


def _summarize(path: str | Path) -> dict:
    with open_trajectory(path) as f:
        a = f.attrs
        exchanges = f["exchanges"][()]
        evals = f["evals"][()]
        events = f["events"][()]
        workers = sorted(int(w) for w in np.unique(exchanges["worker_id"])) if len(exchanges) else []
        # evaluations may hold a loss or an accuracy only (NaN for the other; hpcopt.Recorder's
        # evaluate(loss=...)): the last and best accuracy that is there, None when none is; the
        # last loss as it is (NaN after a divergence), None when no evaluation has one
        acc = _finite(evals["test_accuracy"])
        final_acc = float(acc[-1]) if len(acc) else None
        final_loss = float(evals["test_loss"][-1]) if len(_finite(evals["test_loss"])) else None
        return {
            "path": str(Path(f.filename)),
            "schema_version": int(a["schema_version"]),
            "method": str(a["method"]),
            "status": str(a.get("status", "unknown")),
            "created": str(a.get("created", "")),
            "parameters": int(a["n_parameters"]),
            "servers": int(a["n_servers"]),
            "workers": workers,
            "tau": int(a["tau"]),
            "alpha": float(a["alpha"]),
            "exchanges": int(len(exchanges)),
            "center_snapshots": int(f["center/params"].shape[0]),
            "worker_snapshots": int(f["workers/params"].shape[0]),
            "evaluations": int(len(evals)),
            "final_center_test_accuracy": final_acc,
            "final_center_test_loss": final_loss,
            "best_center_test_accuracy": float(acc.max()) if len(acc) else None,
            "wall_seconds": float(a.get("wall_seconds", float("nan"))),
            "samples_seen": int(exchanges["samples"].astype(np.int64).max()) if len(exchanges) else 0,
            "bytes_moved": int(exchanges["bytes"].sum()) if len(exchanges) else 0,
            "events": {k.decode(): int(n) for k, n in zip(*np.unique(events["kind"], return_counts=True))} if len(events) else {},
            "hosts": sorted(set(json.loads(a.get("hosts", "{}")).values())),
            "mpi_library": str(a.get("mpi_library", "")).splitlines()[0] if a.get("mpi_library") else "",
        }


def _finite(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def format_summary(s: dict) -> str:
    acc, loss = s["final_center_test_accuracy"], s["final_center_test_loss"]
    if acc is not None:
        accuracy = f"{100 * acc:.2f}% final, {100 * s['best_center_test_accuracy']:.2f}% best"
    elif s["evaluations"]:
        accuracy = "no accuracy recorded" + (f" (test loss {loss:.4g} last)" if loss is not None else "")
    else:
        accuracy = "none yet"
    lines = [
        f"{s['path']}  (hpcopt trajectory, schema {s['schema_version']}, {s['status']})",
        f"  method            {s['method']}  tau={s['tau']}  alpha={s['alpha']:.4g}",
        f"  model             {s['parameters']:,} parameters over {s['servers']} server shard(s)",
        f"  workers           {len(s['workers'])}: ids {s['workers']}",
        f"  exchanges         {s['exchanges']:,}  ({s['bytes_moved'] / 1e6:,.1f} MB moved)",
        f"  snapshots         {s['center_snapshots']} center, {s['worker_snapshots']} worker",
        f"  evaluations       {s['evaluations']}",
        f"  center test acc   {accuracy}",
        f"  wall time         {s['wall_seconds']:.1f} s",
        "  events            " + ", ".join(f"{k} x{n}" for k, n in s["events"].items()),
        f"  hosts             {', '.join(s['hosts'])}",
        f"  MPI               {s['mpi_library']}",
    ]
    return "\n".join(lines)
