"""`hpcopt train`: set a run up on every rank, then hand each rank to its role.

    mpirun -n 5 hpcopt train --config configs/mnist1d_easgd.toml --out runs/mine

Asynchronous methods: world ranks 0..S-1 are servers (each owns one contiguous shard of the
center; hpcopt.roles.server), the rest are workers (hpcopt.roles.worker). Every worker trains on
its own and, every tau local steps, exchanges with the center (Zhang et al. 2015, Algorithm 1;
Nesterov local steps make it EAMSGD, Algorithm 2). Synchronous methods: every rank is a worker
(hpcopt.roles.sync). The servers (or rank 0) record the trajectory to OUT/trajectory.h5.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from hpcopt import __version__
from hpcopt.config import Config
from hpcopt.data import load_data
from hpcopt.io.trajectory import TrajectoryWriter, run_attributes
from hpcopt.failpoints import failpoint
from hpcopt.launch.device import keep_freed_memory
from hpcopt.launch.env import Environment, record_essential, record_set_up
from hpcopt.models import FlatModel, build_model
from hpcopt.io.rundir import RunDir, write_atomic
from hpcopt.io import tensorboard as tb
from hpcopt.models.evaluate import Evaluator
from hpcopt.optim.easgd import default_alpha
from hpcopt.roles.worker import WorkerSummary


class UsageError(RuntimeError):
    """A problem with what the user asked for, found identically on every rank."""


def _on_root(world, fn):
    """Run fn on rank 0 only; every rank gets its result, or the same UsageError."""
    result, error = None, None
    if world.rank == 0:
        try:
            result = fn()
        except (ValueError, OSError, UsageError) as e:
            error = str(e)
    result, error = world.bcast((result, error), root=0)
    if error:
        raise UsageError(error)
    return result


def _prepare_run_dir(cfg: Config, force: bool) -> str:
    run = RunDir(cfg.run.out)
    if run.trajectory.exists() and not force:
        raise UsageError(f"{run.trajectory} already exists; choose another --out, pass --force to overwrite "
                         f"it, or --resume {run.path} to continue it")
    try:
        run.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the run directory {run.path}: {e.strerror}") from None
    toml = cfg.to_toml()  # before anything is deleted: a config that cannot be written loses nothing
    note = run.lock(_stale_seconds(cfg))  # before anything is deleted: a live run is never overwritten
    if note:
        print(f"hpcopt: {note}", flush=True)
    run.clear_previous(tb.log_dir(cfg))  # its files, analysis, and events that would overlap this run's
    run.workers.mkdir(exist_ok=True)
    run.joins.mkdir(exist_ok=True)
    write_atomic(run.config, toml)
    run.new_token()
    return str(run.trajectory)


def _load_data(cfg: Config, world, run: RunDir | None = None) -> dict:
    """The config's data set; for a run that has begun (a resume, a join), the copy it keeps
    (OUT/data.npz, written at its start) when it has one, so every worker of the run, resumed
    or joined, trains on the very same data."""
    if run is not None and (run.path / "data.npz").exists():
        def read():
            with np.load(run.path / "data.npz") as f:
                return {k: f[k] for k in f.files}

        return _on_root(world, read)
    if _is_data_file(cfg.data.name):
        try:  # a user file: every rank reads it on its own
            data, error = load_data(cfg.data.name, cfg.data.seed), None
        except ValueError as e:
            data, error = None, str(e)
        if world.allreduce(error is not None):  # (one rank's failure is every rank's: no hang)
            raise UsageError(error or f"data file {cfg.data.name} could not be read on another rank")
        if run is not None:
            _on_root(world, lambda: _check_data_file(run, cfg.data.name, data))
        return data
    return _on_root(world, lambda: load_data(cfg.data.name, cfg.data.seed))


def _is_data_file(name: str) -> bool:
    return name.endswith((".h5", ".hdf5", ".hdf"))


def _check_data_file(run: RunDir, name: str, data: dict) -> None:
    """A user's data file must be the one the run began with (OUT/data.json keeps its digest):
    rewritten in place, with fewer rows, it crashed every resumed worker; with the same rows in
    another order, the run would go on with other data, silently."""
    import json

    from hpcopt.data import fingerprint

    try:
        kept = json.loads((run.path / "data.json").read_text())
    except (OSError, ValueError):
        return  # a run from before data.json: nothing to compare with
    if kept.get("sha256") != fingerprint(data):
        raise UsageError(f"data file {name} has changed since the run began (its content differs from the one "
                         f"recorded in {run.path / 'data.json'}); the run's workers index its rows: restore the file, "
                         f"or start a new run")


def _note_moved_data(run: RunDir, name: str) -> None:
    """A resume with the run's data file under a new name (moved; its digest was checked):
    data.json says where it is now, as config.toml does."""
    import json

    try:
        kept = json.loads((run.path / "data.json").read_text())
    except (OSError, ValueError):
        return
    if kept.get("file") != name:
        write_atomic(run.path / "data.json", json.dumps({**kept, "file": name}) + "\n")


def _share_data(run: RunDir, cfg: Config, data: dict) -> None:
    """Rank 0: keep the generated data set in the run directory (OUT/data.npz), so joining and
    resumed workers read exactly the same data instead of generating it again. A user's HDF5
    file is read from where it is: its digest goes to OUT/data.json, checked by resumes and joins."""
    if _is_data_file(cfg.data.name):
        import json

        from hpcopt.data import fingerprint

        write_atomic(run.path / "data.json", json.dumps({"file": cfg.data.name, "sha256": fingerprint(data)}) + "\n")
        (run.path / "data.npz").unlink(missing_ok=True)  # an earlier run's (--force): resumes would read it
        return
    (run.path / "data.json").unlink(missing_ok=True)
    import io

    buf = io.BytesIO()
    np.savez(buf, **{k: data[k] for k in ("x_train", "y_train", "x_test", "y_test")})
    write_atomic(run.path / "data.npz", buf.getvalue())


@dataclass
class RunSummary:
    """What the rank that records a run (server 0, or rank 0 of a synchronous run) reports."""
    path: str
    synchronous: bool
    exchanges: int  # exchanges served, or synchronous rounds
    wall_seconds: float
    final_accuracy: float  # of the center (or the average), at the end
    all_diverged: bool = False  # every worker left after diverging too often
    all_crashed: bool = False  # every worker crashed
    cpu_seconds: float | None = None  # server 0's own CPU time
    polls: int | None = None


@dataclass
class TrainResult:
    """train()'s answer on every rank: `run` where the run is recorded, `worker` on a worker."""
    run: RunSummary | None = None
    worker: WorkerSummary | None = None


@dataclass
class Setup:
    """Everything a role needs, the same on every rank (bar `role`, the rank's side of the split)."""
    cfg: Config
    world: object  # MPI.COMM_WORLD
    role: object  # the servers' communicator on a server, the workers' on a worker
    run: RunDir
    path: str  # the trajectory file
    data: dict
    flat: FlatModel
    bounds: list[tuple[int, int]]  # the servers' shards
    workers: dict[int, int]  # world rank -> worker id
    alpha: float
    tau: int
    run_id: str  # the trajectory's and its checkpoints' (hpcopt.io.trajectory.run_attributes)
    hosts: dict[int, str]  # world rank -> host
    pids: list[int]
    ckpt: dict | None  # the checkpoint a resumed run continues from
    share: object  # hpcopt.comm.shared.NodeShare
    start: float = 0.0  # the run's clock: time.monotonic() at its second 0
    log: object = print
    ready: object = None  # a worker (any rank of a synchronous run): hpcopt.roles.worker.Prepared


def train(cfg: Config, *, force: bool = False, resume: bool = False, log=print) -> TrainResult:
    """Run a training; collective over MPI.COMM_WORLD. With `resume`, continue the run in
    cfg.run.out from its checkpoint (any number of workers)."""
    from mpi4py import MPI

    from hpcopt.comm.protocol import shard_bounds
    from hpcopt.comm.shared import NodeShare, share_node
    from hpcopt.comm.wait import wait_all

    world = MPI.COMM_WORLD
    env = Environment.from_mpi(world)
    S = 0 if cfg.synchronous else cfg.run.servers
    if world.size < S + 1:
        raise UsageError(f"{world.size} rank(s) cannot hold {S} server(s) and at least one worker; "
                         f"run e.g. `mpirun -n {S + 4} hpcopt train ...` (S servers + 4 workers)")
    if _is_data_file(cfg.data.name):  # one name for the file from any folder a resume is started in
        cfg.data.name = os.path.abspath(cfg.data.name)
    if resume:
        _on_root(world, lambda: _check_not_recorded(RunDir(cfg.run.out)))
    if resume and cfg.synchronous:
        raise UsageError(f"--resume works for the asynchronous methods; {cfg.run.method} is synchronous")
    keep_freed_memory()  # a step's gradients reuse the last step's memory (device.py)
    torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    is_server = world.rank < S
    role = world.Split(0 if is_server else 1, world.rank)
    failpoint(f"train.setup.rank{world.rank}")  # (a test kills one rank inside the collective setup)
    run = RunDir(cfg.run.out)

    if resume:
        path = str(run.trajectory)
        _on_root(world, lambda: _check_resumable(run, cfg))
    else:
        path = _on_root(world, lambda: _prepare_run_dir(cfg, force))
    data = _load_data(cfg, world, run if resume else None)
    if world.rank == 0 and not resume:
        _share_data(run, cfg, data)
    try:
        model = build_model(cfg.model.name, cfg.model.kwargs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    _on_root(world, lambda: _check_labels(cfg, model, data))
    flat = FlatModel(model)
    world.Bcast(flat.params.numpy(), root=0)  # one initial point for center and workers
    n_params = flat.numel
    ckpt = None
    if resume:
        from hpcopt.io import checkpoint

        def read_checkpoint():
            if not run.checkpoint.exists():  # killed before its first checkpoint
                return checkpoint.from_trajectory(run.trajectory, n_parameters=n_params, layout=flat.layout(),
                                                  method=cfg.run.method)
            ckpt = checkpoint.read(run.checkpoint, n_parameters=n_params, layout=flat.layout(),
                                   method=cfg.run.method)
            _check_same_run(run, ckpt)
            return ckpt

        ckpt = _on_root(world, read_checkpoint)
        if world.rank == 0 and ckpt.get("note"):
            log(f"hpcopt: {ckpt['note']}")
        flat.params.copy_(torch.from_numpy(ckpt["center"]))
    try:
        bounds = shard_bounds(n_params, max(S, 1))
    except ValueError as e:
        raise UsageError(str(e)) from None
    # workers on a server's node keep their parameters in shared memory (collective; not LSGD)
    share = NodeShare() if cfg.synchronous else share_node(
        world, S, n_params, enabled=cfg.comm.shared_memory and cfg.run.method != "lsgd")
    worker_ranks = list(range(S, world.size))
    workers = dict(zip(worker_ranks, _worker_ids(ckpt, len(worker_ranks))))  # world rank -> worker id
    if cfg.synchronous:
        from hpcopt.launch.signals import release_early

        release_early()  # no graceful stop there: a stop signal ends the job, as it always did
        alpha, tau = 1.0, 1 if cfg.run.method == "dp-sgd" else cfg.sync.period
    elif cfg.run.method == "lsgd":
        alpha, tau = cfg.lsgd.lam, cfg.easgd.tau
        if cfg.lsgd.tau_g % tau:
            raise UsageError(f"lsgd.tau_g = {cfg.lsgd.tau_g} must be a multiple of easgd.tau = {tau} "
                             f"(the global pull happens at an exchange)")
    else:
        alpha, tau = cfg.easgd.alpha or default_alpha(cfg.easgd.beta, len(workers)), cfg.easgd.tau
    if resume and world.rank == 0:  # (once every check passed: a refused resume changes nothing)
        write_atomic(run.config, cfg.to_toml())  # the config as resumed (overrides included): joiners read it
        _note_moved_data(run, cfg.data.name)
        run.new_token()
    hosts = dict(enumerate(world.allgather(env.host)))
    pids = world.allgather(os.getpid())
    # one id for every rank (attributes are written collectively); a resume keeps its run's
    run_id = world.bcast((ckpt["attrs"].get("run_id") if ckpt else None) or uuid.uuid4().hex, root=0)
    if world.rank == 0:
        what = f"resuming {path} at exchange {ckpt['attrs']['exchanges']}" if resume else f"out={path}"
        log(f"hpcopt {__version__}: {cfg.run.method} with {S} server(s) + {len(workers)} worker(s), "
            f"{n_params:,} parameters, tau={tau}, alpha={alpha:.4g}, {what}")
    s = Setup(cfg=cfg, world=world, role=role, run=run, path=path, data=data, flat=flat, bounds=bounds,
              workers=workers, alpha=alpha, tau=tau, run_id=run_id, hosts=hosts, pids=pids, ckpt=ckpt, share=share,
              log=log)
    recording = world.rank == 0 if cfg.synchronous else is_server
    writer = evaluator = None
    if recording:
        writer = _open_trajectory(s, MPI.COMM_SELF if cfg.synchronous else role)
        if world.rank == 0:
            evaluator = Evaluator(FlatModel(build_model(cfg.model.name, cfg.model.kwargs)),
                                  data["x_test"], data["y_test"])

    if not is_server:  # on its device, data there, a first forward done: before the clock starts
        from hpcopt.roles.worker import prepare

        node = world.Split_type(MPI.COMM_TYPE_SHARED)  # node-local rank, for launchers that set none
        node_rank = node.rank
        node.Free()
        s.ready = prepare(cfg, world.rank if cfg.synchronous else workers[world.rank], flat, data,
                          shared=share.params, node_rank=node_rank, log=log_all)
    else:
        world.Split_type(MPI.COMM_TYPE_SHARED).Free()  # collective over world
        if cfg.comm.compress != "none":  # the codec's compiled loops, loaded before the clock starts
            from hpcopt.comm import codec

            codec.warm(cfg.comm.compress)
    # everyone starts the clock together; a rank that never arrives is an error, not a hang
    wait_all([world.Ibarrier()], cfg.comm.timeout, "every rank to finish setting up")
    if not is_server and not cfg.synchronous:
        record_set_up()  # an asynchronous worker: the run can lose it from now on
    if world.rank == 0:  # every rank was essential to the setup's collectives; from now on only the
        # ones the run cannot lose (`hpcopt train -n` ends the job when one of them dies)
        record_essential({r: (pids[r], hosts[r], f"rank {r}" if cfg.synchronous else f"server {r}")
                          for r in (range(world.size) if cfg.synchronous else range(S))},
                         resumable=not cfg.synchronous)
    s.start = time.monotonic() - (float(ckpt["attrs"]["time"]) if resume else 0.0)
    try:
        return _run_role(s, is_server, writer, evaluator)
    finally:
        if world.rank == 0:
            run.unlock()


def _run_role(s: Setup, is_server: bool, writer, evaluator) -> TrainResult:
    cfg, role, path = s.cfg, s.role, s.path
    if cfg.synchronous:
        return _train_sync(s, writer, evaluator)
    if is_server:
        from hpcopt.roles.server import serve

        summary = serve(s, writer, evaluator)
        if role.rank != 0:
            return TrainResult()
        return TrainResult(run=RunSummary(
            path=path, synchronous=False, exchanges=summary.exchanges, wall_seconds=summary.wall_seconds,
            final_accuracy=evaluator.last[3] if evaluator.last else float("nan"),
            all_diverged=summary.all_diverged, all_crashed=summary.all_crashed, cpu_seconds=summary.cpu_seconds,
            polls=summary.polls))
    return TrainResult(worker=_work(s))


def _open_trajectory(s: Setup, comm) -> TrajectoryWriter:
    """Collective over the recording ranks: create the trajectory file, or reopen it on a resume."""
    cfg, flat, bounds = s.cfg, s.flat, s.bounds
    lo, hi = bounds[comm.rank]
    S = 0 if cfg.synchronous else cfg.run.servers
    attrs = _attrs(cfg, flat, s.hosts, bounds, S, len(s.workers), s.alpha, s.tau, s.run_id)
    model_attrs = {"name": cfg.model.name, "kwargs": cfg.model.kwargs, **flat.layout()}
    kw = dict(n_params=flat.numel, lo=lo, hi=hi, shard_width=bounds[0][1] - bounds[0][0], model_attrs=model_attrs)
    if s.ckpt is None:
        try:
            return TrajectoryWriter(s.path, comm, attrs=attrs, **kw)
        except (ValueError, OSError) as e:
            raise RuntimeError(f"cannot create {s.path}: {e}") from None
    # a resume: the creation-time attributes stay; these describe the latest launch
    launch = {k: attrs[k] for k in ("hosts", "server_ranks", "n_servers", "n_workers", "alpha",
                                    "shard_bounds", "hpcopt_version")}
    try:
        return TrajectoryWriter(s.path, comm, attrs=launch, resume=s.ckpt["attrs"]["trajectory_sizes"], **kw)
    except (ValueError, OSError) as e:  # e.g. killed inside a flush: the file is damaged, the checkpoint is not
        error = str(e)
    # every recording rank failed the same way (one file): set it aside, start a new one from the checkpoint
    aside = comm.bcast(_set_aside(s.path) if comm.rank == 0 else None, root=0)
    if s.world.rank == 0:
        why = f"cannot be reopened ({error}); it is kept as {aside}" if aside else "is not there"
        s.log(f"hpcopt: {s.path} {why}, and a new trajectory file goes on from the checkpoint at exchange "
              f"{s.ckpt['attrs']['exchanges']}")
    if aside:
        attrs["continues"] = os.path.basename(aside)
    try:
        writer = TrajectoryWriter(s.path, comm, attrs=attrs, **kw)
    except (ValueError, OSError) as e:
        raise RuntimeError(f"cannot create {s.path}: {e}") from None
    # it starts with the checkpoint's center, written now: the checkpoint is rewritten next to
    # count this file's rows (it counted those of the file set aside), and a resume cuts back to them
    from hpcopt.io import schema

    writer.flush(center_rows=[np.ascontiguousarray(s.ckpt["center"][lo:hi])], worker_rows=[], worker_meta=None,
                 center_meta=np.array([(s.ckpt["attrs"]["exchanges"], s.ckpt["attrs"]["time"])],
                                      dtype=schema.CENTER_META), tables=None, attrs=None)
    if comm.rank == 0:
        from hpcopt.io import checkpoint

        attrs = {k: v for k, v in s.ckpt["attrs"].items() if k not in ("format", "version", "created")}
        try:
            checkpoint.write(s.run.checkpoint, center=s.ckpt["center"], workers=list(s.ckpt["workers"]),
                             latest=s.ckpt["latest"], attrs={**attrs, "trajectory_sizes": writer.sizes()})
        except OSError as e:  # the old checkpoint names the old file: a resume sets this one aside too
            s.log(f"hpcopt: could not rewrite {s.run.checkpoint} for the new trajectory file ({e})")
    return writer


def _set_aside(path: str) -> str | None:
    """Keep a trajectory that cannot go on beside the run; None when there is none (deleted, or a
    kill between setting one aside and making the next)."""
    aside = f"{path[:-3]}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.h5"  # (two in one second)
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return None
    return aside


def _train_sync(s: Setup, writer, evaluator) -> TrainResult:
    from mpi4py import MPI

    from hpcopt.io.recorder import Recorder
    from hpcopt.roles.sync import train_sync

    recorder = None
    if writer is not None:
        n = s.flat.numel
        recorder = Recorder(MPI.COMM_SELF, writer, s.cfg.record, bounds=[(0, n)], start=s.start,
                            evaluator=evaluator, log=s.log, center=s.flat.params.numpy(), unit="rounds",
                            label="average", lock=s.run, tensorboard=tb.for_run(s.cfg, log=s.log))
    worker, rounds = train_sync(s.cfg, s.world, s.ready, recorder=recorder, log=s.log)
    run = None
    if recorder is not None:
        write_center(s, s.ready.mirror.pull().numpy())  # the average of the last round, as recorded
        run = RunSummary(path=s.path, synchronous=True, exchanges=rounds, wall_seconds=recorder.now(),
                         final_accuracy=recorder.last_accuracy)
    return TrainResult(run=run, worker=worker)


def write_center(s: Setup, center: np.ndarray) -> None:
    """Server 0 (rank 0 of a synchronous run), after the final flush: OUT/center.pt, the final
    center as a state_dict of the run's model (hpcopt.export), written atomically."""
    from hpcopt.export import save_center
    from hpcopt.io.recorder import RecordingError

    try:
        save_center(s.run.center_model, s.cfg, s.flat.layout(), center)
    except OSError as e:
        raise RecordingError(f"cannot write {s.run.center_model}: {e}") from None


def _work(s: Setup) -> WorkerSummary:
    """A worker of an asynchronous run: to its device, connected to the servers, then training."""
    from hpcopt.comm.client import CenterClient
    from hpcopt.io.checkpoint import load_worker_state
    from hpcopt.launch.env import install_abort_on_error
    from hpcopt.roles.worker import run_worker

    cfg, world = s.cfg, s.world
    install_abort_on_error(world, whole_job=False)  # from now on a failing worker is a crash, not the end
    wid = s.workers[world.rank]
    flat = s.ready.trainer.flat
    client = CenterClient([(world, r) for r in range(cfg.run.servers)], s.bounds, s.ready.mirror.host,
                          chunk=_chunk(cfg), timeout=cfg.comm.timeout, layer_norms=_layer_norms(cfg, flat),
                          leaders=cfg.run.method == "lsgd", shared=s.share.servers, sync=s.share.sync,
                          compress=cfg.comm.compress, exact_every=cfg.record.worker_every)
    state, first = None, 0
    if s.ckpt is None:  # every worker starts from the broadcast initial point, the servers' center
        client.at_center()
    else:
        state = load_worker_state(s.run.worker_state(wid), flat.numel, log=log_all)
        saved = [int(r["step"]) for r in s.ckpt["workers"]]
        first = int(sorted(saved)[len(saved) // 2]) if saved else 0
        if state is None:
            log_all(f"worker {wid}: no saved state; starting from the center at step {first}")
    return run_worker(cfg, wid, s.ready, client, s.start, run=s.run, first_step=first, state=state, log=log_all)


def log_all(*args) -> None:
    print(*args, flush=True)


def _check_labels(cfg: Config, model, data: dict) -> None:
    """A model that cannot take the data, or labels it cannot predict, would crash every worker
    with a raw torch error: say so before training (models with their own loss(x, y) define their
    targets themselves)."""
    x, y = torch.from_numpy(data["x_train"][:2]), torch.from_numpy(data["y_train"][:2])
    model.eval()  # no batch statistics updated, no dropout drawn: the model stays as built
    try:
        with torch.no_grad():
            if hasattr(model, "loss"):
                model.loss(x, y)
                return
            classes = model(x).shape[-1]
    except Exception as e:  # a user's model and data: any error is theirs to see, in one line
        raise UsageError(f"model {cfg.model.name} cannot take data {cfg.data.name} (inputs of shape "
                         f"{tuple(x.shape[1:])}): {type(e).__name__}: {e}") from None
    finally:
        model.train()
    for split in ("train", "test"):
        y = data[f"y_{split}"]
        if len(y) and (y.min() < 0 or y.max() >= classes):
            raise UsageError(f"data {cfg.data.name}: y_{split} has labels {int(y.min())}..{int(y.max())}, but "
                             f"model {cfg.model.name} predicts {classes} classes (0..{classes - 1})")


def _stale_seconds(cfg: Config) -> float:
    """A run's lock nobody refreshed for this long belongs to a dead training (it is refreshed at
    every flush)."""
    return max(60.0, 5 * cfg.record.flush_seconds)


def _check_resumable(run: RunDir, cfg: Config) -> None:
    if not run.path.is_dir():
        raise UsageError(f"--resume {run.path}: no such run directory")
    if not run.trajectory.exists() and not run.checkpoint.exists():
        raise UsageError(f"--resume {run.path}: it has no trajectory.h5 and no checkpoint.h5 to go on from")
    _check_same_data(run, cfg)
    note = run.lock(_stale_seconds(cfg))
    if note:
        print(f"hpcopt: {note}", flush=True)
    _check_complete(run)


def _check_same_data(run: RunDir, cfg: Config) -> None:
    """A resume goes on with the run's own data and model: a changed data set crashed resumed
    workers (their saved data order indexes the old one) and split the run, joiners reading the
    old data.npz; the workers' states and the center belong to the run's model."""
    from hpcopt import config as C

    try:
        own = C.load(str(run.config), {})
    except (C.ConfigError, OSError):
        return  # (the config the resume runs with was read from it: a race, not a user's change)
    for key in ("data.name", "data.seed", "model.name", "model.kwargs"):
        section, field = key.split(".")
        theirs, ours = getattr(getattr(own, section), field), getattr(getattr(cfg, section), field)
        if key == "data.name" and _is_data_file(theirs):  # (runs from before file names were made absolute)
            theirs = os.path.abspath(theirs)
            if _is_data_file(ours) and (run.path / "data.json").exists():
                continue  # a file moved or renamed: its digest (data.json) says whether it is the same data
        if theirs != ours:
            raise UsageError(f"--resume {run.path}: the run trains with {key} = {theirs!r}; a resume cannot change "
                             f"it (to {ours!r}): start a new run for that")


def _check_same_run(run: RunDir, ckpt: dict) -> None:
    """A trajectory.h5 or checkpoint.h5 copied in from another run would otherwise be spliced
    together without a word (the sizes may well fit). Files from before run ids pass."""
    import h5py

    theirs = str(ckpt["attrs"].get("run_id", ""))
    try:
        with h5py.File(run.trajectory, "r", locking=False) as f:
            ours = str(f.attrs.get("run_id", ""))
    except OSError:
        return  # damaged: it is set aside and a new file goes on from the checkpoint
    if theirs and ours and theirs != ours:
        raise UsageError(f"--resume {run.path}: trajectory.h5 belongs to run {ours}, checkpoint.h5 to run "
                         f"{theirs}; one of them was copied in from another run. Put back the run's own file "
                         f"(or start a new run)")


def _check_not_recorded(run: RunDir) -> None:
    """A run hpcopt.Recorder recorded or hpcopt import wrote has no checkpoint to continue from."""
    import h5py

    try:
        with h5py.File(run.trajectory, "r", locking=False) as f:
            source = f.attrs.get("source")
    except OSError:
        return  # missing or damaged: _check_resumable says so
    if source in ("hpcopt.Recorder", "hpcopt import"):
        how = "recorded by hpcopt.Recorder" if source == "hpcopt.Recorder" else "imported by hpcopt import"
        raise UsageError(f"--resume {run.path}: the run was {how}, not trained by hpcopt train; it cannot be "
                         f"resumed (train it further with your own loop, recording a new run)")


def _check_complete(run: RunDir) -> None:
    import h5py

    try:
        with h5py.File(run.trajectory, "r", locking=False) as f:
            status = f.attrs.get("status")
    except OSError:
        return  # damaged: the checkpoint decides
    if status == "complete":
        raise UsageError(f"--resume {run.path}: the run is complete (every worker finished its epochs), "
                         f"there is nothing to continue; start a new run to train further")


def _worker_ids(ckpt, n: int) -> list[int]:
    """Worker ids for n workers: on a resume, the checkpoint's workers first (they continue from
    their saved state: those active at the checkpoint, those that left on a signal or crashed,
    and those an earlier resume with fewer workers did not start), then new ids."""
    if ckpt is None:
        return list(range(n))
    old = sorted(int(w) for w in ckpt["workers"]["worker_id"])
    fresh = int(ckpt["attrs"]["next_worker_id"])
    return (old + list(range(fresh, fresh + n)))[:n]


def _layer_norms(cfg: Config, flat: FlatModel):
    """LGRAWA: the per-layer gradient norms every exchange ships (LocalTrainer fills them)."""
    return flat.layer_grad_norms if cfg.run.method == "lgrawa" else None


def _chunk(cfg: Config) -> int:
    return max(1, int(cfg.comm.chunk_mb * 1e6 / 4))


def _attrs(cfg, flat, hosts, bounds, n_servers, n_workers, alpha, tau, run_id) -> dict:
    from mpi4py import MPI

    return run_attributes(cfg, n_parameters=flat.numel, hosts=hosts, bounds=bounds, n_servers=n_servers,
                          n_workers=n_workers, alpha=alpha, tau=tau, run_id=run_id,
                          mpi_library=MPI.Get_library_version().replace("\x00", "").strip())
