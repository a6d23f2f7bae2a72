"""`hpcopt train`: asynchronous EASGD / EAMSGD under MPI.

    mpirun -n 5 hpcopt train --config configs/mnist1d_easgd.toml --out runs/mine

World ranks 0..S-1 are servers (each owns one contiguous shard of the center), the rest are
workers. Every worker trains on its own and, every tau local steps, exchanges with the center
(Zhang et al. 2015, Algorithm 1; Nesterov local steps make it EAMSGD, Algorithm 2). The servers
record the trajectory to OUT/trajectory.h5; server 0 evaluates the center on the test set.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from hpcopt import __version__
from hpcopt.config import Config
from hpcopt.data import load_data
from hpcopt.evaluate import Evaluator
from hpcopt.io.trajectory import TrajectoryWriter
from hpcopt.launch.env import Environment
from hpcopt.models import FlatModel, build_model
from hpcopt.optim.easgd import default_alpha
from hpcopt.rundir import RunDir, write_atomic


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
    run.path.mkdir(parents=True, exist_ok=True)
    for stale in (run.trajectory, run.checkpoint, run.status, run.join_info):
        if stale.exists():
            stale.unlink()
    for d in (run.workers, run.joins):
        if d.exists():
            for f in d.iterdir():
                f.unlink()
    run.workers.mkdir(exist_ok=True)
    run.joins.mkdir(exist_ok=True)
    write_atomic(run.config, cfg.to_toml())
    run.new_token()
    return str(run.trajectory)


def _load_data(cfg: Config, world) -> dict:
    if cfg.data.name.endswith((".h5", ".hdf5", ".hdf")):
        try:  # a user file: every rank reads it on its own
            return load_data(cfg.data.name, cfg.data.seed)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return _on_root(world, lambda: load_data(cfg.data.name, cfg.data.seed))


def _share_data(run: RunDir, cfg: Config, data: dict) -> None:
    """Rank 0: keep the generated data set in the run directory (OUT/data.npz), so joining and
    resumed workers read exactly the same data instead of generating it again. A user's HDF5
    file is read from where it is."""
    if cfg.data.name.endswith((".h5", ".hdf5", ".hdf")):
        return
    import io

    buf = io.BytesIO()
    np.savez(buf, **{k: data[k] for k in ("x_train", "y_train", "x_test", "y_test")})
    write_atomic(run.path / "data.npz", buf.getvalue())


def _shared_data(run: RunDir, cfg: Config, world) -> dict:
    path = run.path / "data.npz"
    if not path.exists():
        return _load_data(cfg, world)

    def read():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}

    return _on_root(world, read)


def train(cfg: Config, *, force: bool = False, resume: bool = False, log=print) -> dict:
    """Run a training; collective over MPI.COMM_WORLD. With `resume`, continue the run in
    cfg.run.out from its checkpoint (any number of workers). Returns a summary: the run's on the
    rank that records it (server 0, or rank 0 for synchronous methods), the worker's own counts
    on a worker, None on other servers."""
    from mpi4py import MPI

    from hpcopt.comm.protocol import shard_bounds

    world = MPI.COMM_WORLD
    env = Environment.from_mpi(world)
    S = 0 if cfg.synchronous else cfg.run.servers
    if world.size < S + 1:
        raise UsageError(f"{world.size} rank(s) cannot hold {S} server(s) and at least one worker; "
                         f"run e.g. `mpirun -n {S + 4} hpcopt train ...` (S servers + 4 workers)")
    if resume and cfg.synchronous:
        raise UsageError(f"--resume works for the asynchronous methods; {cfg.run.method} is synchronous")
    torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    is_server = world.rank < S
    role = world.Split(0 if is_server else 1, world.rank)
    run = RunDir(cfg.run.out)

    if resume:
        path = str(run.trajectory)
        _on_root(world, lambda: _check_resumable(run))
    else:
        path = _on_root(world, lambda: _prepare_run_dir(cfg, force))
    data = _load_data(cfg, world)
    if world.rank == 0 and not resume:
        _share_data(run, cfg, data)
    try:
        model = build_model(cfg.model.name, cfg.model.kwargs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    flat = FlatModel(model)
    world.Bcast(flat.params.numpy(), root=0)  # one initial point for center and workers
    n_params = flat.numel
    ckpt = None
    if resume:
        from hpcopt.io import checkpoint

        ckpt = _on_root(world, lambda: checkpoint.read(run.checkpoint, n_parameters=n_params,
                                                       layout=flat.layout(), method=cfg.run.method))
        flat.params.copy_(torch.from_numpy(ckpt["center"]))
    try:
        bounds = shard_bounds(n_params, max(S, 1))
    except ValueError as e:
        raise UsageError(str(e)) from None
    from hpcopt.comm.shared import NodeShare, share_node

    # workers on a server's node keep their parameters in shared memory (collective; not LSGD)
    share = NodeShare() if cfg.synchronous else share_node(
        world, S, n_params, enabled=cfg.comm.shared_memory and cfg.run.method != "lsgd")
    worker_ranks = list(range(S, world.size))
    ids = _worker_ids(ckpt, len(worker_ranks))
    workers = dict(zip(worker_ranks, ids))  # world rank -> worker id
    if cfg.synchronous:
        alpha, tau = 1.0, 1 if cfg.run.method == "dp-sgd" else cfg.sync.period
    elif cfg.run.method == "lsgd":
        alpha, tau = cfg.lsgd.lam, cfg.easgd.tau
        if cfg.lsgd.tau_g % tau:
            raise UsageError(f"lsgd.tau_g = {cfg.lsgd.tau_g} must be a multiple of easgd.tau = {tau} "
                             f"(the global pull happens at an exchange)")
    else:
        alpha, tau = cfg.easgd.alpha or default_alpha(cfg.easgd.beta, len(workers)), cfg.easgd.tau
    hosts = dict(enumerate(world.allgather(env.host)))
    pids = world.allgather(os.getpid())
    if world.rank == 0:
        what = f"resuming {path} at exchange {ckpt['attrs']['exchanges']}" if resume else f"out={path}"
        log(f"hpcopt {__version__}: {cfg.run.method} with {S} server(s) + {len(workers)} worker(s), "
            f"{n_params:,} parameters, tau={tau}, alpha={alpha:.4g}, {what}")
    recording = world.rank == 0 if cfg.synchronous else is_server
    writer = evaluator = None
    if recording:
        lo, hi = bounds[role.rank]
        attrs = _attrs(cfg, flat, hosts, bounds, S, len(workers), alpha, tau)
        model_attrs = {"name": cfg.model.name, "kwargs": cfg.model.kwargs, **flat.layout()}
        if resume:  # the creation-time attributes stay; these describe the latest launch
            attrs = {k: attrs[k] for k in ("hosts", "server_ranks", "n_servers", "n_workers", "alpha",
                                           "shard_bounds", "hpcopt_version")}
        try:
            writer = TrajectoryWriter(path, MPI.COMM_SELF if cfg.synchronous else role, n_params=n_params,
                                      lo=lo, hi=hi, shard_width=bounds[0][1] - bounds[0][0], attrs=attrs,
                                      model_attrs=model_attrs,
                                      resume=ckpt["attrs"]["trajectory_sizes"] if resume else None)
        except (ValueError, OSError) as e:
            raise RuntimeError(f"cannot {'reopen' if resume else 'create'} {path}: {e}") from None
        if world.rank == 0:
            evaluator = Evaluator(FlatModel(build_model(cfg.model.name, cfg.model.kwargs)),
                                  data["x_test"], data["y_test"])

    from hpcopt.comm.wait import wait_all

    # everyone starts the clock together; a rank that never arrives is an error, not a hang
    wait_all([world.Ibarrier()], cfg.comm.timeout, "every rank to finish setting up")
    start = time.monotonic() - (float(ckpt["attrs"]["time"]) if resume else 0.0)
    if cfg.synchronous:
        from hpcopt.train_sync import train_sync

        summary = train_sync(cfg, world, flat, data, writer=writer, evaluator=evaluator, start=start, log=log)
        if world.rank == 0:
            summary["path"] = path
        return summary
    if is_server:
        return _serve(cfg, world, role, flat, bounds, workers, alpha, hosts, writer, evaluator, path, start,
                      log, run, ckpt, pids, share)
    from hpcopt.async_worker import load_worker_state, run_worker
    from hpcopt.comm.client import CenterClient

    from hpcopt.launch.env import install_abort_on_error

    install_abort_on_error(world, whole_job=False)  # from now on a failing worker is a crash, not the end
    wid = workers[world.rank]
    flat, host = _on_device(flat, log_all, share.params)
    client = CenterClient([(world, s) for s in range(S)], bounds, host,
                          chunk=_chunk(cfg), timeout=cfg.comm.timeout, layer_norms=_layer_norms(cfg, flat),
                          leaders=cfg.run.method == "lsgd", shared=share.servers, sync=share.sync)
    state, first = None, 0
    if resume:
        state = load_worker_state(run.worker_state(wid), flat)
        saved = [int(r["step"]) for r in ckpt["workers"]]
        first = int(sorted(saved)[len(saved) // 2]) if saved else 0
        if state is None:
            log_all(f"worker {wid}: no saved state; starting from the center at step {first}")
    return run_worker(cfg, wid, flat, data, client, start, run=run, first_step=first, state=state,
                      log=log_all)


def _on_device(flat: FlatModel, log, shared: torch.Tensor | None = None) -> tuple[FlatModel, torch.Tensor]:
    """A worker moves to the GPU of its node-local rank, if it has one (hpcopt.launch.device).
    Returns the model there and the CPU buffer exchanges use: the parameters themselves on the
    CPU, else a host copy (MPI never sees a GPU pointer; CUDA-aware MPI is detected and reported,
    but exchanges are staged through the host either way). `shared`, when given, is the worker's
    shared-memory window (hpcopt.comm.shared): the CPU parameters, or the host copy, live there."""
    from hpcopt.launch.device import select_device

    choice = select_device("worker", log=log if torch.cuda.is_available() else None)
    if choice.device == "cpu":
        if shared is not None:
            flat.place(shared)
        return flat, flat.params
    moved = FlatModel(flat.module, device=choice.device)
    torch.cuda.set_device(torch.device(choice.device))
    host = shared if shared is not None else torch.empty(moved.numel, dtype=torch.float32, pin_memory=True)
    host.copy_(moved.params)
    return moved, host


def log_all(*args) -> None:
    print(*args, flush=True)


def _check_resumable(run: RunDir) -> None:
    if not run.path.is_dir():
        raise UsageError(f"--resume {run.path}: no such run directory")
    if not run.trajectory.exists():
        raise UsageError(f"--resume {run.path}: it has no trajectory.h5")


def _worker_ids(ckpt, n: int) -> list[int]:
    """Worker ids for n workers: on a resume, the checkpoint's active workers first (they
    continue from their saved state), then new ids."""
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


def _attrs(cfg, flat, hosts, bounds, n_servers, n_workers, alpha, tau) -> dict:
    import h5py
    from mpi4py import MPI

    return {
        "method": cfg.run.method, "config": cfg.to_toml(), "hpcopt_version": __version__,
        "torch_version": str(torch.__version__), "h5py_version": h5py.version.version,
        "hdf5_version": h5py.version.hdf5_version,
        "mpi_library": MPI.Get_library_version().replace("\x00", "").strip(),
        "hosts": json.dumps(hosts), "server_ranks": json.dumps(list(range(n_servers))),
        "n_servers": n_servers, "n_workers": n_workers, "n_parameters": flat.numel,
        "alpha": alpha, "beta": cfg.easgd.beta, "tau": tau, "seed": cfg.run.seed,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shard_bounds": json.dumps(bounds),
    }


def _serve(cfg, world, role, flat, bounds, workers, alpha, hosts, writer, evaluator, path, start, log,
           run, ckpt, pids, share):
    from hpcopt.async_worker import SignalFlag, ignore_leave_signals
    from hpcopt.comm.server import CenterServer
    from hpcopt.elastic import Membership

    lo, hi = bounds[role.rank]
    resumed = int(ckpt["attrs"]["exchanges"]) if ckpt is not None else 0
    membership = Membership(run, role, method=cfg.run.method, model=cfg.model.name, layout=flat.layout(),
                            n_params=flat.numel, server_hosts=[hosts[s] for s in range(role.size)],
                            timeout=cfg.comm.timeout, log=log, resumed_from=resumed)
    from hpcopt.optim.grawa import layer_bounds

    # "grawa" is the paper's model-level algorithm: asynchronously, that is MGRAWA
    rule = {"grawa": "mgrawa", "mgrawa": "mgrawa", "lgrawa": "lgrawa", "lsgd": "lsgd"}.get(cfg.run.method, "easgd")
    server = CenterServer(
        world=world, servers=role, workers={w: (r, hosts[r], pids[r]) for r, w in workers.items()}, bounds=bounds,
        center=flat.params.numpy()[lo:hi].copy(), alpha=alpha, chunk=_chunk(cfg), timeout=cfg.comm.timeout,
        worker_timeout=cfg.comm.worker_timeout, center_every=cfg.record.center_every,
        worker_every=cfg.record.worker_every, flush_seconds=cfg.record.flush_seconds,
        eval_seconds=cfg.record.eval_seconds, checkpoint_seconds=cfg.record.checkpoint_seconds,
        writer=writer, evaluator=evaluator, deterministic=cfg.run.deterministic, start=start, log=log,
        rule=rule, loss_decay=cfg.lsgd.loss_decay, membership=membership, exchanges=resumed,
        next_worker_id=max(int(ckpt["attrs"]["next_worker_id"]), max(workers.values()) + 1) if ckpt else None,
        layers=layer_bounds(flat.layout()), lam_g=cfg.lsgd.lam_g, group_size=cfg.lsgd.group_size,
        global_every=cfg.lsgd.tau_g // cfg.easgd.tau, shared=share.workers, sync=share.sync)
    if ckpt is not None:
        _restore(server, ckpt, lo, hi)
        server.event("resume", detail=f"from the checkpoint at exchange {resumed}, {len(workers)} workers")
    else:
        server.event("start", detail=f"{len(workers)} workers, {len(bounds)} servers")
    for rank, wid in sorted(workers.items()):
        server.event("join", wid, 0, "resumed worker" if ckpt is not None else "initial worker")
    if role.rank == 0:
        local, n = len(share.workers), len(workers)
        log(("exchanges: " + (f"all {n} worker(s)" if local == n else f"{local} of {n} worker(s)")
             + " in place through shared memory" + ("" if local == n else ", the others over messages"))
            if local else "exchanges: over messages" + ("" if cfg.comm.shared_memory else " (comm.shared_memory = false)")
            + (f" (no shared memory: {share.why_not})" if share.why_not else ""))
        log(f"joins: {'open: hpcopt join ' + str(run.path) if membership.enabled else 'disabled (no ompi-server; start with hpcopt train -n N to allow them)'}")
    server.stop_flag = SignalFlag()
    try:
        summary = server.serve()
    finally:
        membership.close()
        ignore_leave_signals()
    summary["abandoned_accepts"] = membership.abandoned
    if role.rank != 0:
        return None
    summary["path"] = path
    summary["final_center_test_accuracy"] = evaluator.last[3] if evaluator.last else float("nan")
    return summary


def _restore(server, ckpt, lo: int, hi: int) -> None:
    """A resumed server takes the checkpoint's per-worker state (MGRAWA/LSGD) for the workers
    that continue."""
    for row in ckpt["workers"]:
        wid = int(row["worker_id"])
        if wid not in server.peers:
            continue
        server.peers[wid].step = int(row["step"])
        if np.isfinite(row["loss_avg"]):
            server.loss_avg[wid] = float(row["loss_avg"])
        if np.isfinite(row["grad_norm"]) and server.rule == "mgrawa":
            server.grad_norms[wid] = float(row["grad_norm"])
        if wid in ckpt["latest"] and wid in server.latest:
            server.latest[wid].copy_(torch.from_numpy(ckpt["latest"][wid][lo:hi]))
        elif wid in ckpt["latest"] and server.rule == "lsgd":  # the leaders' parameters it held
            server.latest[wid] = torch.from_numpy(ckpt["latest"][wid][lo:hi].copy())


def join(run_path: str, *, token: str | None = None, overrides: dict | None = None, log=print) -> dict:
    """`hpcopt join RUN`: this MPI job's ranks become workers of the running training in RUN.
    Collective over MPI.COMM_WORLD of the joining job."""
    from mpi4py import MPI

    from hpcopt import config as C
    from hpcopt.async_worker import run_worker
    from hpcopt.comm.client import CenterClient
    from hpcopt.comm import protocol as P
    from hpcopt.elastic import JoinRefused, connect, joins_possible, request_join

    world = MPI.COMM_WORLD
    run = RunDir(run_path)
    env = Environment.from_mpi(world)

    def load_cfg():
        if not run.config.exists():
            raise UsageError(f"{run.path} is not a run directory (no config.toml)")
        if not joins_possible():
            raise UsageError(
                "this job cannot connect to the training: it was started without the run's ompi-server. "
                f"Run `hpcopt join {run.path} -n N`, or set OMPI_MCA_pmix_server_uri=file:{run.server_uri} "
                "for mpirun")
        try:
            return C.load(str(run.config), overrides or {})
        except C.ConfigError as e:
            raise UsageError(f"{run.config}: {e}") from None

    t_start = time.monotonic()
    cfg = _on_root(world, load_cfg)
    torch.set_num_threads(cfg.run.threads)
    data = _shared_data(run, cfg, world)
    t_data = time.monotonic()
    flat = FlatModel(build_model(cfg.model.name, cfg.model.kwargs))
    hosts, pids = world.gather(env.host, root=0), world.gather(os.getpid(), root=0)

    def ask():
        try:
            return request_join(run, token=token or run.read_token(), hosts=hosts, pids=pids,
                                n_params=flat.numel, timeout=cfg.comm.timeout)
        except JoinRefused as e:
            raise UsageError(str(e)) from None

    answer = _on_root(world, ask)
    t0 = time.monotonic()  # the servers said yes
    links = []
    for port in answer["ports"]:
        links.append((connect(world, port if world.rank == 0 else None, cfg.comm.timeout), 0))
    from hpcopt.comm.protocol import shard_bounds

    bounds = shard_bounds(flat.numel, len(links))
    wid = answer["first_worker_id"] + world.rank
    S = len(links)
    flat, host = _on_device(flat, log_all)
    client = CenterClient(links, bounds, host, chunk=_chunk(cfg), timeout=cfg.comm.timeout,
                          layer_norms=_layer_norms(cfg, flat), leaders=cfg.run.method == "lsgd")
    status = read_json_safe(run.status)
    start = time.monotonic() - float(status.get("elapsed_seconds", 0.0))
    from hpcopt.launch.env import install_abort_on_error

    install_abort_on_error(world, whole_job=False)
    client.fetch(P.make_header(P.FETCH, wid, answer["start_step"]))
    flat.params.copy_(client.params)
    log(f"joined {run.path} as worker(s) {answer['first_worker_id']}..{answer['first_worker_id'] + world.size - 1} "
        f"with {S} server(s), starting at step {answer['start_step']}: config+data {t_data - t_start:.2f} s, "
        f"handshake {t0 - t_data:.2f} s, connect+fetch {time.monotonic() - t0:.2f} s")
    return run_worker(cfg, wid, flat, data, client, start, run=run, first_step=answer["start_step"], log=log_all)


def read_json_safe(path) -> dict:
    from hpcopt.rundir import read_json

    try:
        return read_json(path)
    except (OSError, ValueError):
        return {}
