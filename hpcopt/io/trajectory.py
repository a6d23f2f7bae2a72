"""Writing the trajectory file: collective over the server communicator.

Every server rank opens OUT/trajectory.h5 with h5py's mpio driver and writes its own column
slice [lo, hi) of the parameter datasets; server 0 alone writes the small tables. HDF5 needs
every structural call (create, resize, attribute write, close) made by all ranks with the same
arguments, so all writing happens in `flush`, which all servers enter together; between two
flushes records are buffered in memory. Few, large, collective writes are also what parallel
HDF5 is fastest at.

With `comm=None` one process writes the whole file with plain h5py and MPI is never touched
(hpcopt.record: trajectories of a user's own PyTorch training, and `hpcopt import`).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import TYPE_CHECKING

import h5py
import numpy as np

from ..failpoints import failpoint
from . import schema

if TYPE_CHECKING:
    from mpi4py import MPI


def run_attributes(cfg, *, n_parameters: int, hosts: dict, bounds: list, n_servers: int, n_workers: int,
                   alpha: float, tau: int, mpi_library: str = "", run_id: str | None = None) -> dict:
    """The root attributes a new trajectory file starts with (docs/trajectory-schema.md); `cfg` is
    the run's hpcopt.config.Config. `run_id` (a new random one if None) names the run: its
    checkpoints carry it too, so a resume refuses a trajectory of another run."""
    import datetime

    import torch

    from hpcopt import __version__

    return {
        "method": cfg.run.method, "config": cfg.to_toml(), "hpcopt_version": __version__,
        "torch_version": str(torch.__version__), "h5py_version": h5py.version.version,
        "hdf5_version": h5py.version.hdf5_version, "mpi_library": mpi_library,
        "hosts": json.dumps(hosts), "server_ranks": json.dumps(list(range(n_servers))),
        "n_servers": n_servers, "n_workers": n_workers, "n_parameters": n_parameters,
        "alpha": alpha, "beta": cfg.easgd.beta, "tau": tau, "seed": cfg.run.seed,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shard_bounds": json.dumps(bounds), "run_id": run_id or uuid.uuid4().hex,
    }


class TrajectoryWriter:
    def __init__(self, path: str, comm: MPI.Comm | None, *, n_params: int, lo: int, hi: int,
                 shard_width: int, attrs: dict, model_attrs: dict, resume: dict | None = None):
        """Collective over `comm` (the server ranks): create the file and its datasets; or, with
        `resume` (dataset sizes from a checkpoint), reopen it and cut every dataset back to the
        checkpoint, so the resumed run continues exactly where the checkpoint was taken. `comm`
        None: this process alone, without MPI."""
        self.comm, self.lo, self.hi, self.n_params, self.path = comm, lo, hi, n_params, path
        self.leader = comm is None or comm.rank == 0
        self.written: dict = {}  # attributes as last written by flush
        if resume is not None:
            self._reopen(path, resume, attrs)
            self.run_id = str(self.f.attrs.get("run_id", ""))
            self.file_id = str(self.f.attrs.get("file_id", ""))
            return
        self.f = h5py.File(path, "w", **self._driver())
        f = self.f
        for k, v in attrs.items():
            f.attrs[k] = str(v) if isinstance(v, str) else v
        f.attrs["format"] = schema.FORMAT
        f.attrs["schema_version"] = schema.SCHEMA_VERSION
        f.attrs["status"] = "running"
        self.run_id = str(attrs.get("run_id", ""))  # "" in files written before run ids
        # one per file: a trajectory set aside and begun again keeps its run's run_id, not this
        self.file_id = self._bcast(uuid.uuid4().hex)
        f.attrs["file_id"] = self.file_id
        model = f.create_group("model")
        for k, v in model_attrs.items():
            model.attrs[k] = v if isinstance(v, (str, int, float)) else json.dumps(v)
        # Chunks line up with shards (every shard but the last is shard_width wide), so each
        # server writes whole chunks; several rows per chunk when rows are small (~1 MB chunks).
        rows = max(1, min(1024, (1 << 20) // (4 * shard_width)))
        chunks = (rows, shard_width)
        self.center = f.create_dataset("center/params", (0, n_params), "<f4", maxshape=(None, n_params), chunks=chunks)
        self.center_meta = f.create_dataset("center/meta", (0,), schema.CENTER_META, maxshape=(None,), chunks=(1024,))
        self.workers = f.create_dataset("workers/params", (0, n_params), "<f4", maxshape=(None, n_params), chunks=chunks)
        self.workers_meta = f.create_dataset("workers/meta", (0,), schema.WORKER_META, maxshape=(None,), chunks=(1024,))
        self.tables = {name: f.create_dataset(name, (0,), dtype, maxshape=(None,), chunks=(1024,))
                       for name, dtype in schema.TABLES.items()}
        n_layers = len(model_attrs.get("names", []))
        if n_layers:  # LGRAWA's per-layer gradient norms, one row per /exchanges row (empty otherwise)
            self.tables[schema.LAYER_NORMS] = f.create_dataset(
                schema.LAYER_NORMS, (0, n_layers), "<f4", maxshape=(None, n_layers),
                chunks=(max(1, min(1024, 65536 // n_layers)), n_layers))
        f.flush()

    def _reopen(self, path: str, sizes: dict, attrs: dict) -> None:
        self.f = h5py.File(path, "r+", **self._driver())
        try:
            self._cut_back(path, sizes, attrs)
        except BaseException:
            # (left open, the mpio file made the caller's next step, setting it aside, abort the job)
            self.f.close()
            raise

    def _cut_back(self, path: str, sizes: dict, attrs: dict) -> None:
        f = self.f
        if f.attrs.get("format") != schema.FORMAT or f["center/params"].shape[1] != self.n_params:
            raise ValueError(f"{path} is not this run's trajectory file")
        expected = sizes.get("file_id")
        if expected and f.attrs.get("file_id") != expected:
            raise ValueError(f"{path} is not the file the checkpoint was taken of (file_id "
                             f"{f.attrs.get('file_id')!r}, the checkpoint's {expected!r})")
        self.center, self.center_meta = f["center/params"], f["center/meta"]
        self.workers, self.workers_meta = f["workers/params"], f["workers/meta"]
        self.tables = {name: f[name] for name in schema.TABLES}
        if schema.LAYER_NORMS in f:
            self.tables[schema.LAYER_NORMS] = f[schema.LAYER_NORMS]
        for name, dset in self._datasets().items():
            n = int(sizes.get(name, 0))  # (every growing dataset; file_id is not one)
            if dset.shape[0] < n:
                raise ValueError(f"{path}: /{name} has {dset.shape[0]} rows, fewer than the "
                                 f"checkpoint's {n}: the file does not belong to this checkpoint")
            dset.resize(n, axis=0)
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs["status"] = "running"
        f.flush()

    def _driver(self) -> dict:
        return {} if self.comm is None else {"driver": "mpio", "comm": self.comm}

    def _bcast(self, obj):
        """The leader's `obj` on every rank."""
        return obj if self.comm is None else self.comm.bcast(obj, root=0)

    def _datasets(self) -> dict:
        return {"center/params": self.center, "center/meta": self.center_meta, "workers/params": self.workers,
                "workers/meta": self.workers_meta, **self.tables}

    def sizes(self) -> dict:
        """Rows in every growing dataset, and which file they are of (a checkpoint records them):
        a resume cuts back only the very file they were counted in."""
        sizes: dict = {name: int(d.shape[0]) for name, d in self._datasets().items()}
        if self.file_id:
            sizes["file_id"] = self.file_id
        return sizes

    def _append_params(self, dset, meta, rows: list[np.ndarray], meta_rows: np.ndarray | None) -> None:
        """Collective: append len(rows) rows (same count on every rank); this rank's columns."""
        n = len(rows)
        if n == 0:
            return
        base = dset.shape[0]
        dset.resize(base + n, axis=0)
        meta.resize(base + n, axis=0)
        failpoint("trajectory.flush.resized")
        failpoint(f"trajectory.flush.resized.server{self.comm.rank if self.comm is not None else 0}")  # one server only
        block = np.stack(rows) if n > 1 else rows[0][None, :]
        with dset.collective if self.comm is not None else contextlib.nullcontext():
            dset[base:base + n, self.lo:self.hi] = block
        failpoint("trajectory.flush.params")
        if self.leader:
            meta[base:base + n] = meta_rows

    def flush(self, *, center_rows: list[np.ndarray], center_meta: np.ndarray | None,
              worker_rows: list[np.ndarray], worker_meta: np.ndarray | None,
              tables: dict[str, list] | None, attrs: dict | None) -> None:
        """Collective over the servers: append agreed rows, the leader's table rows, attributes.

        `center_rows` and `worker_rows` must have the same length on every rank (the caller
        agrees on them); `*_meta`, `tables` and `attrs` are taken from the leader."""
        self._append_params(self.center, self.center_meta, center_rows, center_meta)
        self._append_params(self.workers, self.workers_meta, worker_rows, worker_meta)
        counts = {name: len(rows) for name, rows in (tables or {}).items()} if self.leader else None
        counts = self._bcast(counts)
        for name, n in counts.items():
            if n == 0:
                continue
            dset = self.tables[name]
            base = dset.shape[0]
            dset.resize(base + n, axis=0)
            if self.leader:
                dset[base:base + n] = np.array(tables[name], dtype=dset.dtype)
        failpoint("trajectory.flush.tables")
        attrs = self._bcast(attrs if self.leader else None)
        for k, v in (attrs or {}).items():
            if self.written.get(k, self) != v:  # a string attribute rewritten at every flush
                self.f.attrs[k] = v             # would leave its old copy in the file's heap
                self.written[k] = v
        failpoint("trajectory.flush.attrs")
        self.f.flush()
        failpoint("trajectory.flush.done")

    def close(self) -> None:
        """Collective."""
        self.f.close()
