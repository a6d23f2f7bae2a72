"""The analysis results file (OUT/analysis.h5), written by rank 0 alone with plain h5py, and
read back as plain dicts by `read_results` (`hpcopt.load_analysis`).

Results are a few numbers per grid point, so one writer is enough and keeps the file
consistent without collective calls between ranks that work at different paces.

Layout (format "hpcopt.analysis", schema_version 1):

    /trajectory/...            measures from the trajectory file alone
    /pca/...                   components, explained variance, projected paths
    /grids/NAME/               one landscape slice or interpolation line
        x [nx], y [ny]         coordinates along directions[0] and directions[1] (no y for 1-D)
        origin [P], directions [k, P]
        loss, accuracy [ny, nx] (1-D: [nx]), NaN until computed
        done [ny, nx] uint8    1 once the point's values are in the file
        attrs: spec (JSON: what the slice is), key (hash of spec, origin and directions)
    /curvature/...             eigenvalues, trace, density, sharpness, with the data subset used

A grid's values are written before its done flags, each followed by a flush, and its datasets
are contiguous (a write never changes file metadata), so a job killed at any moment leaves a
file whose done points are exact; running the same analysis again computes only the rest. A
grid whose spec, origin or directions changed is recomputed from scratch.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

FORMAT = "hpcopt.analysis"
SCHEMA_VERSION = 1


class ResultsError(ValueError):
    """The results file exists but is not an hpcopt analysis file of a readable version."""


def key_of(spec: dict, *arrays: np.ndarray) -> str:
    h = hashlib.sha1(json.dumps(spec, sort_keys=True).encode())
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return h.hexdigest()


def _writer_lock(path: Path) -> int:
    """An exclusive lock on PATH.lock for as long as the returned descriptor is open (the kernel
    drops it with the process, so a killed analysis leaves none): two analyses writing one
    results file at once corrupt its HDF5 metadata (a bad heap free list), losing all of it."""
    from hpcopt.io.rundir import hold_flock

    lock = path.with_name(path.name + ".lock")
    fd = hold_flock(lock)
    if fd is None:
        raise ResultsError(f"{path} is being written by another hpcopt analyze (it holds {lock}); wait for it to "
                           f"end, or pick another --out")
    return fd


def open_results(path: str | Path, source: str, run: str = ""):
    """Open (or create) the results file; refuse a foreign file or a newer schema, a file
    another analysis is writing, and one holding the analysis of another run (`run`: the
    trajectory's run_id, or its real path for files from before run ids): its grids and
    measures would read as this run's. Closing the file releases it."""
    import os

    import h5py

    class Results(h5py.File):
        def close(self):
            try:
                super().close()
            finally:
                fd, self._lock_fd = getattr(self, "_lock_fd", None), None
                if fd is not None:
                    os.close(fd)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _writer_lock(path)
    existed, f = path.exists(), None
    try:
        try:
            f = Results(path, "a" if existed else "w", locking=False)
        except OSError as e:
            raise ResultsError(f"{path} exists but is not a readable HDF5 file ({e}); remove it or pick another --out") from None
        f._lock_fd, fd = fd, None  # the file holds the lock now
        if existed:
            _check_format(f, path, "remove it or pick another --out")
            theirs = str(f.attrs.get("run", ""))
            if run and theirs and theirs != run:
                raise ResultsError(f"{path} holds the analysis of another run ({f.attrs.get('source')}, run "
                                   f"{theirs}); its results would read as this run's: pick another --out, or "
                                   f"remove it")
        else:
            f.attrs["format"] = FORMAT
            f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["source"] = str(source)
        if run:
            f.attrs["run"] = str(run)
    except BaseException:
        if f is not None:
            f.close()
        raise
    finally:
        if fd is not None:
            os.close(fd)
    return f


def _check_format(f, path, advice: str) -> None:
    """Close `f` and raise ResultsError unless it is an analysis file of a schema this reads."""
    fmt, ver = f.attrs.get("format"), int(f.attrs.get("schema_version", -1))
    if fmt != FORMAT or ver > SCHEMA_VERSION:
        f.close()
        raise ResultsError(f"{path} is not an hpcopt analysis file of schema <= {SCHEMA_VERSION} "
                           f"(format={fmt!r}, schema_version={ver}); {advice}")


def read_results(path: str | Path) -> dict:
    """What `hpcopt analyze` stored, as nested plain dicts: groups as dicts, datasets as NumPy
    arrays, attributes as numbers and strings (the JSON ones, such as a grid's `spec`, decoded),
    the file's own attributes at the top (`source`, `complete`, ...). `path`: analysis.h5, the
    directory it is in (`--out`), or a run directory (its analysis/analysis.h5, the default).

        res = hpcopt.load_analysis("runs/demo")
        res["curvature"]["eigenvalues"], res["grids"]["random_2d"]["loss"], res["trajectory"]["spread"]
    """
    import h5py

    path = Path(path)
    if path.is_dir():
        found = [p for p in (path / "analysis.h5", path / "analysis" / "analysis.h5") if p.is_file()]
        if not found:
            raise ResultsError(f"{path} holds no analysis.h5 (nor analysis/analysis.h5); run `hpcopt analyze "
                               f"{path}` first")
        path = found[0]
    try:
        f = h5py.File(path, "r", locking=False)
    except (OSError, ValueError) as e:  # missing, or not HDF5
        raise ResultsError(f"cannot read {path}: {e}") from None
    _check_format(f, path, "give the analysis.h5 that `hpcopt analyze` wrote")
    with f:
        return _read_tree(f)


def _read_tree(group) -> dict:
    import h5py

    out = {k: _plain(v) for k, v in group.attrs.items()}
    for k, v in group.items():
        out[k] = _read_tree(v) if isinstance(v, h5py.Group) else v[()]
    return out


def _plain(value):
    """An HDF5 attribute as a plain Python value: numbers and strings, JSON decoded."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value.startswith(("[", "{")):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value.item() if isinstance(value, np.generic) else value


def replace_group(f, name: str):
    if name in f:
        del f[name]
    return f.create_group(name)


def write_tree(group, data: dict) -> None:
    """Write nested dicts of arrays/numbers/strings: arrays as datasets, scalars as attributes."""
    for k, v in data.items():
        k = str(k)
        if isinstance(v, dict):
            write_tree(group.require_group(k), v)
        elif isinstance(v, (str, bool, int, float, np.integer, np.floating)):
            group.attrs[k] = v
        elif isinstance(v, (list, tuple)) and v and isinstance(v[0], dict):
            group.attrs[k] = json.dumps(v)
        else:
            if k in group:
                del group[k]
            group.create_dataset(k, data=np.asarray(v))


class Grid:
    """One grid's datasets; values buffered in memory and written in whole by `flush`."""

    def __init__(self, f, name: str, spec: dict, origin: np.ndarray, directions: np.ndarray,
                 xs: np.ndarray, ys: np.ndarray | None):
        self.f, self.name, self.spec = f, name, spec
        self.shape = (len(xs),) if ys is None else (len(ys), len(xs))
        key = key_of(spec, origin, directions, xs, ys if ys is not None else np.zeros(0))
        path = f"grids/{name}"
        g = f.get(path)
        if g is None or g.attrs.get("key") != key or tuple(g["done"].shape) != self.shape:
            g = replace_group(f, path)
            g.attrs["spec"] = json.dumps(spec, sort_keys=True)
            g.attrs["key"] = key
            g.create_dataset("origin", data=np.asarray(origin, dtype=np.float64))
            g.create_dataset("directions", data=np.asarray(directions, dtype=np.float64))
            g.create_dataset("x", data=xs)
            if ys is not None:
                g.create_dataset("y", data=ys)
            for field in ("loss", "accuracy"):
                g.create_dataset(field, shape=self.shape, dtype="<f8", fillvalue=np.nan)
            g.create_dataset("done", shape=self.shape, dtype="u1", fillvalue=0)
            f.flush()
        self.g = g
        self.loss = g["loss"][()]
        self.accuracy = g["accuracy"][()]
        self.done = g["done"][()]
        self.last_flush = time.monotonic()
        self.dirty = False

    def todo(self) -> list[int]:
        """Flat row-major indices of the points not yet done."""
        return [int(i) for i in np.flatnonzero(self.done.reshape(-1) == 0)]

    def record(self, results: list, flush_seconds: float = 1.0) -> None:
        for i, (loss, acc) in results:
            self.loss.reshape(-1)[i] = loss
            self.accuracy.reshape(-1)[i] = acc
            self.done.reshape(-1)[i] = 1
        self.dirty = True
        if time.monotonic() - self.last_flush >= flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not self.dirty:
            return
        self.g["loss"][...] = self.loss
        self.g["accuracy"][...] = self.accuracy
        self.f.flush()  # values reach the file before the flags that vouch for them
        self.g["done"][...] = self.done
        self.f.flush()
        self.last_flush = time.monotonic()
        self.dirty = False

    @property
    def complete(self) -> bool:
        return bool(self.done.all())
