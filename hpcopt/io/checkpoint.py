"""Checkpoints: what `hpcopt train --resume` needs to go on. The servers' OUT/checkpoint.h5
(below), and each worker's own state in OUT/workers/ (save_worker_state / load_worker_state).

Written by server 0 right after a collective flush of the trajectory file, into a temporary file
that is renamed over the old one (a crash leaves the old or the new checkpoint, never half of
one). It records the trajectory file's dataset sizes at that flush: a resume cuts the file back
to them, so a killed run loses at most one checkpoint interval and the file stays consistent.

    attrs   format="hpcopt.checkpoint", version, method, model, n_parameters, layout (JSON),
            exchanges, next_worker_id, time (run seconds), trajectory_sizes (JSON), created,
            run_id (the trajectory's; absent before hpcopt had run ids)
    center            float32[P]   the center variable
    workers           table        worker_id, step, exchanges, loss_avg, grad_norm (active workers)
    latest/<id>       float32[P]   MGRAWA/LSGD: each active worker's latest parameters
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
from pathlib import Path

import h5py
import numpy as np

from ..failpoints import failpoint

FORMAT = "hpcopt.checkpoint"
VERSION = 1
WORKER = np.dtype([("worker_id", "<i4"), ("step", "<i8"), ("exchanges", "<i8"), ("loss_avg", "<f8"),
                   ("grad_norm", "<f8")])


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, foreign, or does not match the model."""


def sums_path(path) -> Path:
    """PATH.sha256: the SHA-256 of the whole checkpoint file. HDF5's Fletcher-32 covers the
    datasets' chunks only; a byte changed in the file's metadata made h5py segfault, spin for
    minutes, or read a center half of zeros. The file is checked before h5py opens it."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _known_sums(path: Path) -> list[str] | None:
    """The digests PATH.sha256 accepts (the newest first), or None when there is none (a run
    written before it); CheckpointError when it is damaged."""
    try:
        sums = json.loads(sums_path(path).read_text())["sha256"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{sums_path(path)} is damaged ({type(e).__name__}): the checkpoint cannot be "
                              f"trusted") from None
    if not isinstance(sums, list) or not all(isinstance(x, str) for x in sums):
        raise CheckpointError(f"{sums_path(path)} is damaged: the checkpoint cannot be trusted")
    return sums


def write(path, *, center: np.ndarray, workers: list[tuple], latest: dict[int, np.ndarray], attrs: dict) -> None:
    from .rundir import write_atomic

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _write(tmp, center=center, workers=workers, latest=latest, attrs=attrs)
        # the new file's digest, and the old one's: a crash before the rename below leaves the old
        # file, which must still pass
        try:
            old = (_known_sums(path) or [])[:1] if path.exists() else []
        except CheckpointError:
            old = []
        write_atomic(sums_path(path), json.dumps({"sha256": [_sha256(tmp), *old]}) + "\n")
    except BaseException:
        tmp.unlink(missing_ok=True)  # (a full disk: what was written of it must not stay)
        raise
    failpoint("checkpoint.written")
    os.replace(tmp, path)


def _write(tmp: Path, *, center, workers, latest, attrs) -> None:
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["version"] = VERSION
        f.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for k, v in attrs.items():
            f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
        # Fletcher-32 checksums (HDF5's own filter, checked on every read): a flipped bit in a
        # weight is finite, and would otherwise load and make every worker "diverge"
        f.create_dataset("center", data=center, fletcher32=True)
        f.create_dataset("workers", data=np.array(workers, dtype=WORKER), fletcher32=True)
        group = f.create_group("latest")
        for wid, x in latest.items():
            group.create_dataset(str(wid), data=x, fletcher32=True)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path, *, n_parameters: int, layout: dict, method: str) -> dict:
    """The checkpoint as a dict, or CheckpointError saying what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the run never wrote one (it ran shorter than "
                              f"record.checkpoint_seconds?) or this is not a run directory")
    sums = _known_sums(path)
    if sums is not None and _sha256(path) not in sums:
        raise CheckpointError(f"{path} is damaged (corrupt): it does not match the checksum written with it "
                              f"({sums_path(path).name}); restore it from a backup, or remove both files to "
                              f"resume from the trajectory's last center snapshot")
    try:
        with h5py.File(path, "r", locking=False) as f:
            if f.attrs.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not an hpcopt checkpoint (format attribute "
                                      f"{f.attrs.get('format')!r})")
            if int(f.attrs["version"]) > VERSION:
                raise CheckpointError(f"{path} has checkpoint version {f.attrs['version']}; this hpcopt "
                                      f"reads up to {VERSION}: upgrade hpcopt")
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            out = {"center": f["center"][...], "workers": f["workers"][...],
                   "latest": {int(k): d[...] for k, d in f["latest"].items()}}
    except CheckpointError:
        raise
    except (OSError, KeyError) as e:
        raise CheckpointError(f"{path} is corrupt or unreadable: {e}") from None
    if int(attrs["n_parameters"]) != n_parameters or json.loads(attrs["layout"]) != json.loads(json.dumps(layout)):
        raise CheckpointError(
            f"{path} does not match the model: the checkpoint has {attrs['n_parameters']} parameters "
            f"({attrs.get('model')}), the configured model {n_parameters}; resume with the run's own config")
    if attrs.get("method") != method:
        raise CheckpointError(f"{path} was written by method {attrs.get('method')!r}, the config says {method!r}")
    if out["center"].shape != (n_parameters,) or not np.isfinite(out["center"]).all():
        raise CheckpointError(f"{path} is corrupt: its center is not {n_parameters} finite numbers")
    attrs["trajectory_sizes"] = json.loads(attrs["trajectory_sizes"])
    out["attrs"] = attrs
    return out


def save_worker_state(path, *, step: int, exchange: int, params, trainer_state: dict) -> None:
    """A worker's own state (parameters, step, local optimizer and data order), atomically."""
    write_worker_state(path, worker_state(step=step, exchange=exchange, params=params, trainer_state=trainer_state))


def worker_state(*, step: int, exchange: int, params, trainer_state: dict) -> dict:
    """The state to save, with its own copy of the parameters in host memory (training may go on
    changing them while it is written); trainer_state must be a copy already (state_dict())."""
    return {"step": step, "exchange": exchange, "params": params.detach().to("cpu", copy=True),
            "trainer": trainer_state, "n_parameters": params.numel()}


def write_worker_state(path, state: dict) -> None:
    """Checksum `state` and write it atomically (torch.save straight into the temporary file:
    no serialised copy of a state that can be hundreds of MB)."""
    import torch

    from .rundir import write_atomic

    state["sha256"] = _digest(state)  # torch.load checks no checksum: a flipped bit would load
    write_atomic(path, lambda f: torch.save(state, f))


class WorkerStateSaver:
    """Saves a worker's state for a resume, at most every `every` seconds, in a background thread.
    The caller's thread only copies the state (`save`), so the training (and its GPU) goes on
    while it is checksummed and written; a save waits for the previous one, so files never
    land out of order. Paced by its own cost too: the next save comes no sooner than 49 times
    the last one's duration after it ended, so saving takes at most 2% of the worker's time
    (a 9.2M-parameter state with momentum costs ~0.5 s of CPU: every 10 s, with four workers
    on a core, that was 18% of their compute). A failed write (a full disk) is said once, not fatal."""

    SHARE = 0.02

    def __init__(self, path, every: float, log=print, who: str = "worker"):
        self.path, self.every, self.log, self.who = Path(path), every, log, who
        self.next_at = time.monotonic() + every  # no save before this
        for old in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # a write cut short by an earlier
            old.unlink(missing_ok=True)  # process of this worker (an exit on an error path): never read
        self.thread: threading.Thread | None = None
        self.failed = False

    def due(self) -> bool:
        return time.monotonic() >= self.next_at and not self.busy

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def save(self, *, step: int, exchange: int, params, trainer_state: dict, wait: bool = False) -> None:
        self.wait()
        state = worker_state(step=step, exchange=exchange, params=params, trainer_state=trainer_state)
        t0 = time.monotonic()
        self.next_at = t0 + self.every
        # not a daemon: an interpreter exiting normally finishes the write rather than leave none
        self.thread = threading.Thread(target=self._write, args=(state, t0), name="hpcopt-save-state")
        self.thread.start()
        if wait:
            self.wait()

    def _write(self, state: dict, t0: float) -> None:
        try:
            write_worker_state(self.path, state)
        except Exception as e:  # (a full disk: OSError, or torch's zip writer's RuntimeError)
            if not self.failed:
                self.log(f"{self.who}: cannot save its state ({getattr(e, 'strerror', None) or e}); "
                         f"training goes on without it")
            self.failed = True
        finally:
            end = time.monotonic()
            self.next_at = max(self.next_at, end + (end - t0) * (1 - self.SHARE) / self.SHARE)

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None


def _digest(state: dict) -> str:
    """SHA-256 over every value of a worker state (tensors by their bytes), in a fixed order."""
    import hashlib

    import torch

    h = hashlib.sha256()

    def walk(x) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # (its buffer: no copy)
        elif isinstance(x, dict):
            for k in sorted(x, key=repr):
                if k != "sha256":
                    h.update(repr(k).encode())
                    walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    walk(state)
    return h.hexdigest()


def load_worker_state(path, n_parameters: int, log=print) -> dict | None:
    """A worker's saved state, or None when there is none (or it does not fit this model)."""
    import torch

    try:
        # tensors and plain values, never pickled code; onto the CPU whatever GPU saved them (the
        # resumed worker may have another, or none): the trainer moves them to its device
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        return None
    except Exception as e:  # a corrupt state is not fatal: the worker starts from the center
        log(f"hpcopt: ignoring unreadable worker state {path}: {e}")
        return None
    if "sha256" in state and state["sha256"] != _digest(state):  # (older states have none)
        log(f"hpcopt: ignoring worker state {path}: its checksum does not match (a corrupt file)")
        return None
    if state.get("n_parameters") != n_parameters:
        log(f"hpcopt: ignoring worker state {path}: it has {state.get('n_parameters')} parameters, "
            f"the model {n_parameters}")
        return None
    return state


def from_trajectory(path, *, n_parameters: int, layout: dict, method: str) -> dict:
    """A run killed before its first checkpoint: the same dict as read() gives, from the last
    center snapshot its trajectory file holds (what came after it is lost, and the result says
    so in "note"). Each worker continues from its own saved state if it has one, else from that
    center at its last recorded step."""
    from . import schema

    try:
        with h5py.File(path, "r", locking=False) as f:
            if f.attrs.get("format") != schema.FORMAT:
                raise CheckpointError(f"{path} is not an hpcopt trajectory")
            if f.attrs.get("method") != method or int(f.attrs.get("n_parameters", -1)) != n_parameters:
                raise CheckpointError(f"{path} was written by method {f.attrs.get('method')!r} for "
                                      f"{f.attrs.get('n_parameters')} parameters; the config says {method!r}, "
                                      f"{n_parameters}: resume with the run's own config")
            m = min(f["center/params"].shape[0], f["center/meta"].shape[0])
            finite = [i for i in range(m - 1, -1, -1) if np.isfinite(f["center/params"][i]).all()][:1]
            if not finite:
                raise CheckpointError(f"no checkpoint beside {path}, and the trajectory holds no center snapshot "
                                      f"to resume from: the run was killed before its first flush; start it again")
            last = finite[0]
            meta = f["center/meta"][last]
            exchanges, t = int(meta["exchanges"]), float(meta["time"])
            ex = f["exchanges"][...]
            kept = int(np.searchsorted(ex["time"], t, side="right")) if len(ex) else 0
            ex = ex[:kept]
            rows = {}
            for r in ex:  # each worker's last recorded exchange
                rows[int(r["worker_id"])] = (int(r["worker_id"]), int(r["step"]), int(r["exchange"]), np.nan, np.nan)
            wm = f["workers/meta"][...]
            nw = min(len(wm), f["workers/params"].shape[0])
            nw = int(np.searchsorted(wm["time"][:nw], t, side="right")) if nw else 0
            ev = f["evals"][...]
            sizes = {"center/params": last + 1, "center/meta": last + 1, "workers/params": nw, "workers/meta": nw,
                     "exchanges": kept, "evals": int((ev["exchanges"] <= exchanges).sum()) if len(ev) else 0,
                     "events": f["events"].shape[0]}
            if schema.LAYER_NORMS in f:
                sizes[schema.LAYER_NORMS] = min(kept, f[schema.LAYER_NORMS].shape[0])
            center = f["center/params"][last]
            next_id = max([int(w) for w in rows] + [int(f.attrs.get("n_workers", 0)) - 1]) + 1
            wall = float(f.attrs.get("wall_seconds", t))
            run_id = str(f.attrs.get("run_id", ""))
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"no checkpoint beside {path}, and the trajectory cannot be read ({e})") from None
    return {"center": center, "latest": {},
            "workers": np.array([rows[w] for w in sorted(rows)], dtype=WORKER),
            "attrs": {"method": method, "n_parameters": n_parameters, "layout": json.dumps(layout),
                      "exchanges": exchanges, "next_worker_id": next_id, "time": t, "trajectory_sizes": sizes,
                      "run_id": run_id},
            "note": f"no checkpoint: resuming from the trajectory's last center snapshot (exchange {exchanges}, "
                    f"{t:.1f} s); the {max(0.0, wall - t):.1f} s recorded after it are dropped"}
