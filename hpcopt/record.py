"""Trajectories of trainings hpcopt did not run: `hpcopt.Recorder` inside any PyTorch loop (one
process, or every rank of torch DDP), and the run files behind it, which `hpcopt import` writes too
(hpcopt.importer).

    rec = hpcopt.Recorder("runs/mine", model, every=50, model_factory="cnn1d", data="mnist1d")
    for x, y in loader:                                   # your loop, your optimizer
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        rec.step(loss=loss, batch=len(x), lr=opt.param_groups[0]["lr"])
    rec.evaluate(acc=0.95, loss=0.17)                     # whenever you evaluate
    rec.close()                                           # or: with hpcopt.Recorder(...) as rec:

    hpcopt analyze runs/mine --compare runs/eamsgd        # then as for any hpcopt run

The file is the trajectory hpcopt's own runs write (docs/trajectory-schema.md): the model's flat
trainable parameters are the center, at step 0 and every `every` steps and at the end; each
`step` is an /exchanges row of its rank (worker id = rank); `evaluate` an /evals row. The config
it records names the model and data factories (`module:function`, or the built-ins), which is how
`hpcopt analyze` rebuilds the model and the data, as for its own runs. Buffers (BatchNorm's
running statistics) and frozen parameters are not in the trajectory: OUT/center.pt, the model's
full state_dict at close, keeps them for the final center (hpcopt.load_model, hpcopt export);
elsewhere they are as the factory builds them (a RecorderWarning says so when recording starts).

Under torch DDP (torch.distributed initialised) every rank makes the same calls; rank 0 alone
writes the file, with plain h5py (no MPI: a torchrun job has none), and the other ranks hand it
their rows at every center snapshot through torch.distributed (`gather_object`), so `__init__`,
the `every`-th `step` and `close` are collective over the group. Rank 0's parameters are the
center (DDP keeps the ranks' parameters equal); with `workers=True` each rank's parameters also
go to /workers at every center snapshot (for loops whose ranks differ, such as local SGD).

Rank 0 writes what it has buffered and flushes the file every `flush_seconds`, at a step: a
process killed at any moment leaves a readable file that lacks at most that interval (nothing
touches the file between two flushes). An existing OUT/trajectory.h5 is refused unless
`overwrite=True` (a recording does not resume: start a new run directory), and the run directory's
lock keeps a second recording, an import or an `hpcopt train` out while this one lives. A Recorder
collected without close() (a notebook cell raised, the object dropped) closes its file as it is
(status running) and releases the lock.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
import weakref

import numpy as np
import torch

from hpcopt.data import NO_DATA
from hpcopt.io import schema
from hpcopt.io.rundir import RunDir, RunLocked, write_atomic
from hpcopt.io.trajectory import TrajectoryWriter, run_attributes
from hpcopt.models.flat import parameter_layout


class RecorderError(ValueError):
    """The run cannot be recorded as asked; the message says why."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameters are recorded: DDP's and torch.compile's wrappers are looked
    through, so the names are the ones the model's factory gives (conv1.weight, not
    module.conv1.weight)."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile
        if inner is None and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            inner = model.module
        if inner is None:
            return model
        model = inner


def flat_parameters(module: torch.nn.Module) -> np.ndarray:
    """`module`'s trainable parameters end to end (parameter_layout's order): a new float32 host
    array."""
    with torch.no_grad():
        return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32)
                          for p in module.parameters() if p.requires_grad]).numpy()


def recorded_config(out, *, model_factory: str, model_kwargs: dict | None, data: str | None, data_seed: int,
                    seed: int, every: int):
    """The hpcopt.config.Config a recorded run stores: what analysis reads ([run] seed, [model],
    [data]); [run] method is dp-sgd (one process or DDP is data-parallel SGD), the rest defaults."""
    from hpcopt import config as C

    try:
        return C.from_dict({"run": {"method": "dp-sgd", "out": str(out), "seed": seed},
                            "model": {"name": model_factory, "kwargs": dict(model_kwargs or {})},
                            "data": {"name": data or NO_DATA, "seed": data_seed},
                            "record": {"center_every": every, "worker_every": 0}}, origin="the recording")
    except C.ConfigError as e:
        raise RecorderError(str(e)) from None


def check_factory(cfg, layout: dict) -> None:
    """The model cfg's factory builds must have the recorded parameters (names and shapes), or
    analysis could not rebuild it. Built on the meta device (no memory) where the factory allows."""
    from hpcopt.export import _names
    from hpcopt.models import build_model

    name, kwargs = cfg.model.name, cfg.model.kwargs
    try:
        try:
            with torch.device("meta"):
                built = build_model(name, kwargs)
        except ValueError:
            raise
        except Exception:  # e.g. a factory that loads weights: build it for real
            built = build_model(name, kwargs)
    except ValueError as e:
        raise RecorderError(str(e)) from None
    except Exception as e:  # the user's factory failed: its error, in one line
        raise RecorderError(f"model factory {name!r} failed to build the model: {type(e).__name__}: {e}") from None
    got = parameter_layout(built)
    pairs = [list(zip(d["names"], d["shapes"])) for d in (got, layout)]
    if pairs[0] != pairs[1]:
        raise RecorderError(f"model factory {name!r} builds the parameters {_names(pairs[0])}, but the model "
                            f"being recorded has {_names(pairs[1])}: hpcopt analyze could not rebuild it; "
                            f"name the factory (and its kwargs) that builds this model")


class RunFile:
    """One process writing a run directory's trajectory with plain h5py (no MPI), with the checks
    `hpcopt train` makes: an existing trajectory is refused unless `overwrite`, the run's lock keeps
    a second writer or a training out, OUT/config.toml holds the config.

    `staged` (hpcopt import): the trajectory is written beside the run's (OUT/.trajectory.h5.new)
    and only `commit` replaces the previous run with it, so nothing of an existing run is deleted
    before the new one is complete; `discard` leaves the previous run as it was."""

    def __init__(self, out, layout: dict, cfg, *, method: str, source: str, hosts: dict, overwrite: bool,
                 staged: bool = False):
        self.run = run = RunDir(out)
        if run.trajectory.exists() and not overwrite:
            raise RecorderError(f"{run.trajectory} already exists; choose another run directory, or overwrite "
                                f"it (overwrite=True; hpcopt import --force)")
        self.created_dir = not run.path.exists()
        self.cfg, self.staged = cfg, staged
        self.path = run.path / ".trajectory.h5.new" if staged else run.trajectory
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            run.lock(60.0)  # before anything is deleted: a live run is never overwritten
        except RunLocked as e:
            raise RecorderError(str(e)) from None
        except OSError as e:
            raise RecorderError(f"cannot create the run directory {run.path}: {e.strerror}") from None
        try:
            if not staged:
                toml = cfg.to_toml()  # before anything is deleted: a config that cannot be written loses nothing
                run.clear_previous()  # as hpcopt train does: the previous run's files, analysis, events
                write_atomic(run.config, toml)
            n = sum(int(np.prod(s)) for s in layout["shapes"])
            attrs = run_attributes(cfg, n_parameters=n, hosts=hosts, bounds=[(0, n)], n_servers=0,
                                   n_workers=len(hosts), alpha=1.0, tau=1)
            attrs.update(method=method, source=source)
            self.writer = TrajectoryWriter(str(self.path), None, n_params=n, lo=0, hi=n, shard_width=n,
                                           attrs=attrs, model_attrs={"name": cfg.model.name,
                                                                     "kwargs": cfg.model.kwargs, **layout})
        except OSError as e:
            if staged:
                self.path.unlink(missing_ok=True)
            run.unlock()
            raise RecorderError(f"cannot write {self.path}: {e}") from None
        self.rows = 0  # /exchanges rows written

    def write(self, *, center=(), workers=(), exchanges=(), evals=(), events=(), wall_seconds: float,
              status: str = "running") -> None:
        """Append snapshots (`center`: (step, time, vector); `workers`: (WORKER_META tuple, vector)),
        table rows and attributes, and flush the file."""
        try:
            self.writer.flush(
                center_rows=[v for _, _, v in center],
                center_meta=np.array([(s, t) for s, t, _ in center], dtype=schema.CENTER_META),
                worker_rows=[v for _, v in workers], worker_meta=np.array([m for m, _ in workers],
                                                                          dtype=schema.WORKER_META),
                tables={"exchanges": list(exchanges), "evals": list(evals), "events": list(events)},
                attrs={"exchanges_total": self.rows + len(exchanges), "wall_seconds": wall_seconds,
                       "status": status})
        except (OSError, RuntimeError) as e:  # h5py says "file write failed" for ENOSPC and EIO
            raise RecorderError(f"cannot write {self.path}: {e}") from None
        self.rows += len(exchanges)
        self.run.touch_lock()

    def commit(self, center_state: dict | None = None) -> None:
        """Staged: the new run replaces the previous one (its files, analysis and events go), with
        `center_state` as OUT/center.pt; then the lock is released."""
        from hpcopt.export import save_state_dict

        self.writer.close()
        try:
            self.run.clear_previous(trajectory=False)
            write_atomic(self.run.config, self.cfg.to_toml())
            os.replace(self.path, self.run.trajectory)
            if center_state is not None:
                save_state_dict(center_state, self.run.center_model)
        except OSError as e:
            raise RecorderError(f"cannot write the run {self.run.path}: {e}") from None
        finally:
            self.path.unlink(missing_ok=True)
            self.run.unlock()

    def close(self) -> None:
        self.writer.close()
        self.run.unlock()

    def discard(self) -> None:
        """Close and remove what this writer made (an import that failed half way); a staged
        writer's previous run stays as it was."""
        self.writer.close()
        for made in (self.path,) if self.staged else (self.run.trajectory, self.run.config):
            made.unlink(missing_ok=True)
        self.run.unlock()
        if self.created_dir:
            try:
                self.run.path.rmdir()
            except OSError:
                pass


def _abandoned(file: RunFile) -> None:
    """A Recorder collected (or the interpreter ending) without close(): its file is closed as it
    is (status running, up to its last flush) and its lock released, so the directory can be
    recorded again in this process."""
    try:
        file.close()
    except Exception:  # a finalizer has nobody to tell
        pass


def _distributed(group) -> tuple[int, int]:
    """(rank, size) in torch.distributed's `group` when it is initialised, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _samples(batch) -> int:
    if batch is None:
        return 0
    if isinstance(batch, (int, np.integer)):
        return int(batch)
    return int(batch.shape[0]) if hasattr(batch, "shape") else len(batch)


def _number(x) -> float:
    return float("nan") if x is None else float(x)  # a tensor anywhere: float() syncs once here


def _one_number(call: str, name: str, x):
    """`x` (loss or lr of step(), acc or loss of evaluate()) checked now: None, a number or a
    one-element tensor (kept on its device: no sync here), else a RecorderError saying so."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise RecorderError(f"{call}({name}=...) must be one number, got a tensor of shape {tuple(x.shape)}"
                                + (" (reduce it first, e.g. .mean())" if x.numel() > 1 else ""))
        if x.is_complex():
            raise RecorderError(f"{call}({name}=...) must be a real number, got a complex tensor")
        return x.detach()
    if isinstance(x, np.ndarray):
        if x.size != 1:
            raise RecorderError(f"{call}({name}=...) must be one number, got an array of shape {x.shape}")
        x = x.reshape(()).item()
    if isinstance(x, (str, bytes, bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise RecorderError(f"{call}({name}=...) must be a number or a one-element tensor, got "
                            f"{type(x).__name__} {x!r:.60}")
    return float(x)


def _default_factory(model: torch.nn.Module, layout: dict, cfg) -> None:
    """No model_factory given: the model's class (`module:Class`) is what analysis will build,
    with no arguments, in another process. Refused now, with what to do, when it cannot."""
    cls = type(model)
    where = cls.__module__
    if where in ("__main__", "__mp_main__") or "<locals>" in cls.__qualname__:
        place = "inside a function" if "<locals>" in cls.__qualname__ else "in __main__ (your script or notebook)"
        raise RecorderError(
            f"no model_factory given, and the model's class {cls.__qualname__} is defined {place}, which "
            f"hpcopt analyze, hpcopt.load_model and hpcopt export cannot import: put the class (or a function "
            f"that builds the model) in a module and pass model_factory=\"module:function\" (and model_kwargs=)")
    try:
        check_factory(cfg, layout)
    except RecorderError as e:
        raise RecorderError(
            f"no model_factory given, and its default, the model's class {cfg.model.name} built without "
            f"arguments, does not rebuild this model ({e}); pass model_factory=\"module:function\" naming a "
            f"function that builds it (and model_kwargs= its arguments)") from None


def _untracked(model: torch.nn.Module) -> list[str]:
    """The state_dict entries that are not trainable parameters: buffers (BatchNorm's running
    statistics) and frozen parameters, which a trajectory does not record."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return [k for k in model.state_dict() if k not in trainable]


def untracked_note(model: torch.nn.Module, final: str) -> str | None:
    """What a recording or an import says about a model with state outside its trajectory."""
    names = _untracked(model)
    if not names:
        return None
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (f"the model has {len(names)} buffer(s) or frozen parameter(s) ({shown}) that a trajectory does not "
            f"record (it holds the trainable parameters): {final}, which hpcopt.load_model and hpcopt export of the "
            f"final center use; every other snapshot, and hpcopt analyze, takes them as the model factory builds "
            f"them under the run's seed")


class RecorderWarning(UserWarning):
    """The recording works, but part of the model's state is not in the trajectory."""


class Recorder:
    """Records a PyTorch training into a run directory; see the module docstring.

    out: the run directory (OUT/trajectory.h5, OUT/config.toml; OUT/center.pt at close).
    model: the module being trained (a DDP or torch.compile wrapper is looked through).
    every: steps between two center snapshots (also when the ranks of a DDP job meet).
    model_factory, model_kwargs: how analysis rebuilds the model: a built-in ("cnn1d", "mlp") or
        "module:function" (importable where you analyse); checked against `model` now. Unset:
        the model's class, "module:Class", built without arguments; a RecorderError now when
        that cannot rebuild this model elsewhere (a class of __main__ or inside a function, or
        one that builds other parameters).
    data, data_seed: the data analysis measures the loss on: "mnist1d", an HDF5 file, or
        "module:function" returning x_train, y_train, x_test, y_test (as for hpcopt train).
    seed: your run's seed (analysis seeds torch with it before building the model).
    method: the label in reports and `hpcopt inspect`.
    workers: also record each rank's parameters as its worker snapshot at every center snapshot.
    flush_seconds: rank 0 writes and flushes the file this often (a killed process loses at most
        this interval).
    overwrite: replace an existing run in `out` instead of refusing it.
    group: the torch.distributed process group (None: the default group, when initialised).
    """

    def __init__(self, out, model: torch.nn.Module, *, every: int = 50, model_factory: str | None = None,
                 model_kwargs: dict | None = None, data: str | None = None, data_seed: int = 42, seed: int = 0,
                 method: str = "pytorch", workers: bool = False, flush_seconds: float = 2.0,
                 overwrite: bool = False, group=None):
        if isinstance(every, (bool, np.bool_)) or not isinstance(every, (int, np.integer)) or every < 1:
            raise RecorderError(f"every must be a whole number of steps >= 1, got {every!r}")
        if not flush_seconds > 0:
            raise RecorderError(f"flush_seconds must be > 0, got {flush_seconds!r}")
        self.model = unwrap(model)
        every = int(every)
        self.every, self.flush_seconds, self.with_workers, self.group = every, flush_seconds, workers, group
        self.rank, self.size = _distributed(group)
        self.steps, self.samples, self.closed = 0, 0, False
        self.last_snapshot = -1  # rank 0: the step of the last center snapshot
        self.snapshots = 0  # this rank's worker snapshots (their `exchange` counter)
        self.path = RunDir(out).trajectory
        self.start = self.last_flush = time.monotonic()
        self.pending: list[tuple] = []  # this rank: its steps and worker snapshots since the last gather
        self.center: list[tuple] = []   # rank 0: what the next flush writes
        self.workers: list[tuple] = []
        self.exchanges: list[tuple] = []
        self.evals: list[tuple] = []
        self.events: list[np.ndarray] = []
        self.file: RunFile | None = None
        self._finalizer = None
        hosts = self._gather(socket.gethostname()) if self.size > 1 else [socket.gethostname()]
        error = None
        if self.rank == 0:
            try:
                self._open(out, hosts, model_factory=model_factory, model_kwargs=model_kwargs, data=data,
                           data_seed=data_seed, seed=seed, method=method, overwrite=overwrite)
            except RecorderError as e:
                error = str(e)
        if self.size > 1:  # every rank raises the same error, so none waits for the others later
            error = self._bcast(error)
        if error:
            raise RecorderError(error)

    def _open(self, out, hosts: list[str], *, model_factory, model_kwargs, data, data_seed, seed, method,
              overwrite) -> None:
        """Rank 0: check the factory, create the run, record the start and the initial point."""
        layout = parameter_layout(self.model)
        if not layout["names"]:
            raise RecorderError("the model has no trainable parameters")
        cls = type(self.model)
        cfg = recorded_config(out, model_factory=model_factory or f"{cls.__module__}:{cls.__qualname__}",
                              model_kwargs=model_kwargs, data=data, data_seed=data_seed, seed=seed,
                              every=self.every)
        if model_factory is not None:
            check_factory(cfg, layout)
        else:
            _default_factory(self.model, layout, cfg)
        self.file = RunFile(out, layout, cfg, method=method, source="hpcopt.Recorder",
                            hosts=dict(enumerate(hosts)), overwrite=overwrite)
        # never closed (a notebook's cell raised, the object was dropped): the file and lock go with it
        self._finalizer = weakref.finalize(self, _abandoned, self.file)
        note = untracked_note(self.model, "OUT/center.pt holds them as they are at close()")
        if note:
            warnings.warn(note, RecorderWarning, stacklevel=3)  # at the user's Recorder(...)
        self._event("start", detail=f"{self.size} process(es) recorded by hpcopt.Recorder")
        for r, host in enumerate(hosts):
            self._event("join", r, r, host, 0, "initial worker")
        self._center()
        try:
            self._flush()
        except RecorderError:
            self._finalizer.detach()
            self.file.close()  # and its lock: this process may try again
            raise

    def now(self) -> float:
        return time.monotonic() - self.start

    # ------------------------------------------------------------------ the user's calls
    def step(self, loss=None, batch=None, lr=None) -> None:
        """After a training step: its loss (a number or a tensor), the minibatch (its size, or the
        batch itself: its first dimension counts) and the learning rate. Every rank of a DDP job
        calls it once per step; the `every`-th call is collective (a center snapshot)."""
        if self.closed:
            raise RecorderError("step() after close()")
        loss = _one_number("step", "loss", loss)  # a tensor stays on its device until the next snapshot
        lr = _one_number("step", "lr", lr)
        self.steps += 1
        self.samples += _samples(batch)
        self.pending.append((self.steps, self.now(), loss, self.samples, lr))
        if self.steps % self.every == 0:
            self._snapshot()
        if self.rank == 0 and time.monotonic() - self.last_flush >= self.flush_seconds:
            if self.size == 1:
                self._take([self._pending()])
            self._flush()

    def evaluate(self, acc=None, loss=None) -> None:
        """A test evaluation of the model now (accuracy in 0..1 and/or mean loss; numbers or
        tensors): an /evals row at the current step. Rank 0's calls are recorded, others' ignored."""
        if self.closed:
            raise RecorderError("evaluate() after close()")
        if acc is None and loss is None:
            raise RecorderError("evaluate() needs acc=, loss= or both")
        acc, loss = _one_number("evaluate", "acc", acc), _one_number("evaluate", "loss", loss)
        if self.rank == 0:
            self.evals.append((self.steps, self.now(), _number(loss), _number(acc)))

    def close(self) -> None:
        """The end of the training: the last center, every rank's rows, status complete,
        OUT/center.pt (the model's state_dict). Collective under DDP. A second call does nothing."""
        if self.closed:
            return
        if self.steps % self.every:
            self._snapshot()
        self._end("complete", "finished")

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            self.close()
        elif not self.closed:  # this rank alone: no collective (the others may not get here)
            if self.rank == 0:  # what it has; other ranks' rows since the last snapshot are lost
                self._center()
                self._take([self._pending()])
            self._end("stopped", f"the training raised {kind.__name__}: {error}")

    # ------------------------------------------------------------------ inside
    def _snapshot(self) -> None:
        """The center (rank 0), this rank's worker snapshot when asked, and, under DDP, every
        rank's rows to rank 0 (collective)."""
        if self.rank == 0:
            self._center()
        if self.with_workers:
            self.snapshots += 1
            meta = (self.rank, self.steps, self.snapshots, self.now())
            self.pending.append(("worker", meta, flat_parameters(self.model)))
        mine = self._pending()
        self._take(self._gather(mine) if self.size > 1 else [mine])

    def _center(self) -> None:
        """Rank 0: the model's parameters as the center at this step (once per step)."""
        if self.last_snapshot != self.steps:
            self.center.append((self.steps, self.now(), flat_parameters(self.model)))
            self.last_snapshot = self.steps

    def _pending(self) -> list:
        """This rank's buffered rows as plain numbers (losses and learning rates leave the device
        here, once per snapshot, not at every step)."""
        out = []
        for item in self.pending:
            if item[0] == "worker":
                out.append(item)
            else:
                step, t, loss, samples, lr = item
                out.append((step, t, _number(loss), samples, _number(lr)))
        self.pending = []
        return out

    def _take(self, per_rank: list | None) -> None:
        """Rank 0: every rank's rows (index = rank) into what the next flush writes."""
        for rank, items in enumerate(per_rank or []):
            for item in items:
                if item[0] == "worker":
                    self.workers.append(item[1:])
                else:
                    step, t, loss, samples, lr = item
                    self.exchanges.append((rank, step, step, t, loss, samples, lr, 0, np.nan, -1, -1))

    def _event(self, kind: str, wid: int = -1, rank: int = -1, host: str = "", step: int = -1,
               detail: str = "") -> None:
        self.events.append(schema.event_row(self.now(), kind, wid, rank, host, step, detail))

    def _flush(self, status: str = "running") -> None:
        """Rank 0: write everything buffered and flush the file."""
        self.file.write(center=self.center, workers=self.workers, exchanges=self.exchanges, evals=self.evals,
                        events=self.events, wall_seconds=self.now(), status=status)
        self.center, self.workers, self.exchanges, self.evals, self.events = [], [], [], [], []
        self.last_flush = time.monotonic()

    def _end(self, status: str, why: str) -> None:
        self.closed = True
        if self.rank != 0:
            return
        try:
            for r in range(self.size):
                self._event("leave", r, r, "", self.steps, why)
            self._event("end", detail=f"{self.steps} steps")
            self._flush(status)
        finally:
            self._finalizer.detach()  # closed here: a later collection must not touch a new run's lock
            self.file.close()
        if status == "complete":
            from hpcopt.export import save_state_dict, state_dict_of

            try:
                save_state_dict(state_dict_of(self.model), self.file.run.center_model)
            except OSError as e:
                raise RecorderError(f"cannot write {self.file.run.center_model}: {e}") from None

    def _gather(self, obj) -> list | None:
        """Collective over the group: every rank's `obj` on rank 0 (None elsewhere)."""
        import torch.distributed as dist

        root = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        out = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=root, group=self.group)
        return out

    def _bcast(self, obj):
        import torch.distributed as dist

        root = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        box = [obj]
        dist.broadcast_object_list(box, src=root, group=self.group)
        return box[0]
