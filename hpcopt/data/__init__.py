"""Data sets: MNIST-1D (generated locally), a user HDF5 file, or a user 'module:function'.

Every source yields the same dict of numpy arrays: x_train, y_train, x_test, y_test
(x float32 of shape [n, ...], y integer class labels of shape [n]).
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np

KEYS = ("x_train", "y_train", "x_test", "y_test")
NO_DATA = "none"  # [data] name of a run recorded (hpcopt.Recorder) or imported without a data set


def mnist1d(seed: int = 42) -> dict:
    """The standard MNIST-1D split (4000 train / 1000 test, 40 samples each), generated locally
    (about 2 s), or read from the cache of an earlier generation (_cache_dir)."""
    from importlib.metadata import version

    cached = _cache_dir()
    path = cached / f"mnist1d-{version('mnist1d')}-seed{int(seed)}.npz" if cached else None
    if path is not None and path.is_file():
        try:  # (no pickles: a file in a cache is data, never code)
            with np.load(path, allow_pickle=False) as f:
                d = {k: f[k] for k in KEYS}
            if {k: a.shape for k, a in d.items()} == _MNIST1D_SHAPES:
                return d
        except Exception:  # noqa: BLE001 (zipfile, OS, value, key errors: any failure just regenerates)
            pass  # damaged or foreign: generated again below, and rewritten
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    # the generator seeds NumPy's and Python's global generators: keep the caller's as they were,
    # so a model built after the data is the same whether the data came from the cache or not
    states = np.random.get_state(), random.getstate()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the generator prints progress
            g = make_dataset(args)
    finally:
        np.random.set_state(states[0])
        random.setstate(states[1])
    d = {"x_train": g["x"], "y_train": g["y"], "x_test": g["x_test"], "y_test": g["y_test"]}
    if path is not None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, **d)
            os.replace(tmp, path)  # readers see a whole file or none
        except OSError:
            pass  # a read-only home or a full disk: generated each time, as before
        finally:
            try:
                tmp.unlink(missing_ok=True)  # (a failed write's leftover)
            except OSError:
                pass
    return d


_MNIST1D_SHAPES = {"x_train": (4000, 40), "y_train": (4000,), "x_test": (1000, 40), "y_test": (1000,)}


def _cache_dir() -> Path | None:
    """Where generated data sets are kept between runs: $HPCOPT_CACHE, else
    $XDG_CACHE_HOME/hpcopt, else ~/.cache/hpcopt; HPCOPT_CACHE=off keeps nothing. (A run's own
    copy of its data is OUT/data.npz; this only saves generating it again.)"""
    where = os.environ.get("HPCOPT_CACHE")
    if where == "off":
        return None
    if where:
        return Path(where)
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # (the XDG spec: a relative one is ignored)
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hpcopt"


def from_hdf5(path: Path) -> dict:
    """A user data set: an HDF5 file with datasets x_train, y_train, x_test, y_test."""
    import h5py

    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        raise ValueError(f"data file {path} is not a readable HDF5 file ({e})") from None
    with f:
        missing = [k for k in KEYS if k not in f]
        if missing:
            raise ValueError(f"data file {path} lacks dataset(s) {', '.join(missing)}; "
                             f"it needs {', '.join(KEYS)}")
        return {k: f[k][()] for k in KEYS}


def load_data(name: str, seed: int = 42) -> dict:
    if name == "mnist1d":
        data = mnist1d(seed)
    elif name == NO_DATA:
        raise ValueError("the run names no data set (it was recorded or imported without one: pass data= to "
                         "hpcopt.Recorder, --data to hpcopt import); its trajectory alone can be analysed "
                         "with --skip landscape,interpolation,hessian,sharpness")
    elif name.endswith((".h5", ".hdf5", ".hdf")) or Path(name).is_file():
        if not Path(name).is_file():
            raise ValueError(f"data file {name} does not exist")
        data = from_hdf5(Path(name))
    elif ":" in name:
        from hpcopt.models import resolve

        data = resolve(name, "data")()
        if not isinstance(data, dict) or any(k not in data for k in KEYS):
            raise ValueError(f"data factory {name!r} must return a dict with keys {', '.join(KEYS)}")
    else:
        raise ValueError(f"data {name!r} is not 'mnist1d', an existing HDF5 file, nor 'module:function'")
    return _check({k: np.asarray(data[k]) for k in KEYS}, name)


def _check(data: dict, name: str) -> dict:
    for split in ("train", "test"):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        if len(x) != len(y):
            raise ValueError(f"data {name}: x_{split} has {len(x)} rows but y_{split} has {len(y)}")
        if len(x) == 0:
            raise ValueError(f"data {name}: x_{split} is empty")
    data["x_train"] = data["x_train"].astype(np.float32, copy=False)
    data["x_test"] = data["x_test"].astype(np.float32, copy=False)
    data["y_train"] = data["y_train"].astype(np.int64, copy=False)
    data["y_test"] = data["y_test"].astype(np.int64, copy=False)
    return data


def fingerprint(data: dict) -> str:
    """A digest of a loaded data set (its arrays as training sees them): a run keeps it, and a
    resume or a join refuses a file that has changed under the same name since the run began
    (the workers' saved data orders index the old rows)."""
    import hashlib

    h = hashlib.sha256()
    for k in KEYS:
        a = np.ascontiguousarray(data[k])
        h.update(f"{k}{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()
