"""Reading a trajectory file back: a summary for `hpcopt inspect`, with plain h5py.

Opens without file locking, so a run that is still writing can be inspected."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import schema


class TrajectoryError(ValueError):
    """The file is missing, not HDF5, not an hpcopt trajectory, or of an unknown schema."""


def trajectory_path(path: str | Path) -> Path:
    """The trajectory file that `path` (the file, or its run directory) names."""
    path = Path(path)
    if not path.exists():
        raise TrajectoryError(f"{path} does not exist")
    if path.is_dir():
        if (path / "trajectory.h5").exists():
            return path / "trajectory.h5"
        raise TrajectoryError(f"{path} is a directory without a trajectory.h5")
    return path


def open_trajectory(path: str | Path, probe: bool = True):
    """The trajectory file, open read-only without locking. probe: first walk its metadata in a
    child process (probe_trajectory), so that damaged metadata is a TrajectoryError, not a crash."""
    import h5py

    path = trajectory_path(path)
    if probe:
        probe_trajectory(path)
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


# ---- the metadata probe ----------------------------------------------------------------------
# A flipped byte in an HDF5 object header, B-tree or heap can make the HDF5 library itself crash
# (SIGSEGV, abort) or loop, where no Python `except` helps: the command would die with a bare
# "Segmentation fault" or hang. So before a reader opens a trajectory in its own process, a child
# process walks the metadata those readers touch; the child dying or running past a deadline is
# reported as a damaged file. A child process, not fork(): the caller may have MPI initialised.
# Python errors in the child are not reported: the reader meets them too and says what they are.

PROBE_TIMEOUT_ENV = "HPCOPT_PROBE_TIMEOUT"
PROBE_TIMEOUT = 60.0          # seconds; HDF5 walking a sane trajectory's metadata takes well under 1
_PROBE_READ_BYTES = 64 << 20  # datasets up to this size are read whole (the tables, the meta rows)
_PROBE_MAX_OBJECTS = 100_000  # a damaged group structure that points in circles ends here


def probe_trajectory(path: str | Path, timeout: float | None = None) -> None:
    """Walk the trajectory's HDF5 metadata in a child process (read-only, no file locking, so a
    file a training is writing is read as any reader reads it). A TrajectoryError when the child
    is killed by a signal (HDF5 crashed), fails, or has not finished within `timeout` seconds
    (default PROBE_TIMEOUT, or $HPCOPT_PROBE_TIMEOUT). The file is never changed."""
    import os
    import signal
    import subprocess
    import sys

    path = trajectory_path(path)
    if timeout is None:
        try:
            timeout = float(os.environ.get(PROBE_TIMEOUT_ENV) or PROBE_TIMEOUT)
        except ValueError:
            timeout = PROBE_TIMEOUT
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # hpcopt importable in the child, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.pop("PYTHONSTARTUP", None)
    code = "import sys; from hpcopt.io.inspect import _probe_child; _probe_child(sys.argv[1])"
    try:
        child = subprocess.run([sys.executable, "-c", code, str(path)], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:  # subprocess.run has killed the child and waited for it
        raise TrajectoryError(f"{path} is damaged: HDF5 did not finish reading its metadata in {timeout:g} s "
                              f"(it may be going round a damaged structure); the file is left as it is. "
                              f"If it is only slow (a very slow file system), set {PROBE_TIMEOUT_ENV}=SECONDS "
                              f"to wait longer") from None
    except OSError as e:  # no child at all (out of processes): the reader goes on unprobed
        print(f"hpcopt: warning: cannot check {path} in a child process ({e}); reading it directly",
              file=sys.stderr)
        return
    if child.returncode < 0:
        try:
            name = signal.Signals(-child.returncode).name
        except ValueError:
            name = f"signal {-child.returncode}"
        raise TrajectoryError(f"{path} is damaged: HDF5 crashed ({name}) reading its metadata; the file is "
                              f"left as it is")
    if child.returncode != 0:
        lines = child.stderr.decode(errors="replace").strip().splitlines()
        raise TrajectoryError(f"{path} is damaged: reading its metadata failed (exit status {child.returncode}"
                              + (f": {lines[-1]}" if lines else "") + ")")


def _probe_child(path: str) -> None:
    """The probe's child: open the file and touch every object's header, attributes, dataspace,
    datatype and chunk index as the readers would; Python errors are passed over (see above)."""
    import time

    import h5py

    from hpcopt.failpoints import failpoint

    failpoint("inspect.probe.crash")  # tests: the child dies (SIGKILL) as a crashing HDF5 does
    try:
        failpoint("inspect.probe.hang", error=TimeoutError())
    except TimeoutError:  # tests: an HDF5 that spins
        time.sleep(3600)
    try:
        f = h5py.File(path, "r", locking=False)
    except Exception:
        return
    seen = [0]

    def attrs(obj) -> None:
        try:
            for name in list(obj.attrs):
                try:
                    obj.attrs[name]
                except Exception:
                    pass
        except Exception:
            pass

    def dataset(d) -> None:
        shape, dtype, chunks = d.shape, d.dtype, d.chunks
        if d.size * dtype.itemsize <= _PROBE_READ_BYTES:
            d[()]
        elif chunks is not None and all(shape):
            # the parameters (gigabytes on a long run): walk the whole chunk index without reading
            # the data (a strided read of one value per chunk reads every chunk), then read one
            # value at each end
            d.id.get_num_chunks()
            d[(0,) * len(shape)]
            d[tuple(n - 1 for n in shape)]

    def walk(group, depth: int) -> None:  # not visititems: it stops at the first damaged object
        for name in list(group):
            seen[0] += 1
            if seen[0] > _PROBE_MAX_OBJECTS or depth > 32:
                return
            try:
                obj = group[name]
            except Exception:
                continue
            attrs(obj)
            try:
                if isinstance(obj, h5py.Group):
                    walk(obj, depth + 1)
                elif isinstance(obj, h5py.Dataset):
                    dataset(obj)
            except Exception:
                pass

    with f:
        attrs(f)
        try:
            walk(f, 0)
        except Exception:
            pass


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
