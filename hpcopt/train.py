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
import time
from pathlib import Path

import torch

from hpcopt import __version__
from hpcopt.config import Config
from hpcopt.data import load_data
from hpcopt.evaluate import Evaluator
from hpcopt.io.trajectory import TrajectoryWriter
from hpcopt.launch.env import Environment
from hpcopt.models import FlatModel, build_model
from hpcopt.optim.easgd import default_alpha
from hpcopt.worker import LocalTrainer


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
    out = Path(cfg.run.out)
    path = out / "trajectory.h5"
    if path.exists() and not force:
        raise UsageError(f"{path} already exists; choose another --out, or pass --force to overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(cfg.to_toml())
    if path.exists():
        path.unlink()
    return str(path)


def _load_data(cfg: Config, world) -> dict:
    if cfg.data.name.endswith((".h5", ".hdf5", ".hdf")):
        try:  # a user file: every rank reads it on its own
            return load_data(cfg.data.name, cfg.data.seed)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return _on_root(world, lambda: load_data(cfg.data.name, cfg.data.seed))


def train(cfg: Config, *, force: bool = False, log=print) -> dict:
    """Run a training; collective over MPI.COMM_WORLD. Returns a summary: the run's on the rank
    that records it (server 0, or rank 0 for synchronous methods), the worker's own counts on a
    worker, None on other servers."""
    from mpi4py import MPI

    from hpcopt.comm.client import CenterClient
    from hpcopt.comm.protocol import shard_bounds

    world = MPI.COMM_WORLD
    env = Environment.from_mpi(world)
    S = 0 if cfg.synchronous else cfg.run.servers
    if world.size < S + 1:
        raise UsageError(f"{world.size} rank(s) cannot hold {S} server(s) and at least one worker; "
                         f"run e.g. `mpirun -n {S + 4} hpcopt train ...` (S servers + 4 workers)")
    torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    is_server = world.rank < S
    role = world.Split(0 if is_server else 1, world.rank)

    path = _on_root(world, lambda: _prepare_run_dir(cfg, force))
    data = _load_data(cfg, world)
    try:
        model = build_model(cfg.model.name, cfg.model.kwargs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    flat = FlatModel(model)
    world.Bcast(flat.params.numpy(), root=0)  # one initial point for center and workers
    n_params = flat.numel
    try:
        bounds = shard_bounds(n_params, max(S, 1))
    except ValueError as e:
        raise UsageError(str(e)) from None
    workers = {r: r - S for r in range(S, world.size)}
    if cfg.synchronous:
        alpha, tau = 1.0, 1 if cfg.run.method == "dp-sgd" else cfg.sync.period
    elif cfg.run.method == "lsgd":
        alpha, tau = cfg.lsgd.lam, cfg.easgd.tau
    else:
        alpha, tau = cfg.easgd.alpha or default_alpha(cfg.easgd.beta, len(workers)), cfg.easgd.tau
    hosts = dict(enumerate(world.allgather(env.host)))
    if world.rank == 0:
        log(f"hpcopt {__version__}: {cfg.run.method} with {S} server(s) + {len(workers)} worker(s), "
            f"{n_params:,} parameters, tau={tau}, alpha={alpha:.4g}, out={path}")
    recording = world.rank == 0 if cfg.synchronous else is_server
    writer = evaluator = None
    if recording:
        lo, hi = bounds[role.rank]
        attrs = _attrs(cfg, flat, hosts, bounds, S, len(workers), alpha, tau)
        model_attrs = {"name": cfg.model.name, "kwargs": cfg.model.kwargs, **flat.layout()}
        writer = TrajectoryWriter(path, MPI.COMM_SELF if cfg.synchronous else role, n_params=n_params,
                                  lo=lo, hi=hi, shard_width=bounds[0][1] - bounds[0][0], attrs=attrs,
                                  model_attrs=model_attrs)
        if world.rank == 0:
            evaluator = Evaluator(FlatModel(build_model(cfg.model.name, cfg.model.kwargs)),
                                  data["x_test"], data["y_test"])

    from hpcopt.comm.wait import wait_all

    # everyone starts the clock together; a rank that never arrives is an error, not a hang
    wait_all([world.Ibarrier()], cfg.comm.timeout, "every rank to finish setting up")
    start = time.monotonic()
    if cfg.synchronous:
        from hpcopt.train_sync import train_sync

        summary = train_sync(cfg, world, flat, data, writer=writer, evaluator=evaluator, start=start, log=log)
        if world.rank == 0:
            summary["path"] = path
        return summary
    if is_server:
        return _serve(cfg, world, role, flat, bounds, workers, alpha, hosts, writer, evaluator, path, start, log)
    client = CenterClient(world, list(range(S)), bounds, flat.params, alpha=alpha,
                          chunk=_chunk(cfg), timeout=cfg.comm.timeout)
    return run_worker(cfg, workers[world.rank], flat, data, client, start)


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


def _serve(cfg, world, role, flat, bounds, workers, alpha, hosts, writer, evaluator, path, start, log):
    from hpcopt.comm.server import CenterServer

    lo, hi = bounds[role.rank]
    server = CenterServer(
        world=world, servers=role, workers=workers, bounds=bounds,
        center=flat.params.numpy()[lo:hi].copy(), alpha=alpha, chunk=_chunk(cfg), timeout=cfg.comm.timeout,
        center_every=cfg.record.center_every, worker_every=cfg.record.worker_every,
        flush_seconds=cfg.record.flush_seconds, eval_seconds=cfg.record.eval_seconds,
        writer=writer, evaluator=evaluator, deterministic=cfg.run.deterministic, start=start,
        hosts=hosts, log=log, rule=cfg.run.method if cfg.run.method in ("mgrawa", "lsgd") else "easgd",
        loss_decay=cfg.lsgd.loss_decay)
    server.event("start", detail=f"{len(workers)} workers, {len(bounds)} servers")
    for rank in sorted(workers):
        server.event("join", rank, 0, "initial worker")
    summary = server.serve()
    if role.rank != 0:
        return None
    summary["path"] = path
    summary["final_center_test_accuracy"] = evaluator.last[3] if evaluator.last else float("nan")
    return summary


def run_worker(cfg: Config, worker_id: int, flat: FlatModel, data: dict, client, start: float) -> dict:
    """A worker's local training with an exchange every tau steps (and one at the end).
    Returns the worker's counts: steps, samples, seconds."""
    from hpcopt.comm import protocol as P

    trainer = LocalTrainer(cfg, worker_id, flat, data)
    total, tau = trainer.total, cfg.easgd.tau
    loss_sum, loss_n, k, lr, grad_norm = 0.0, 0, 0, cfg.train.lr, float("nan")
    t0 = time.perf_counter()

    def exchange(step):
        nonlocal loss_sum, loss_n, k
        k += 1
        header = P.make_header(P.EXCHANGE, worker_id, step, k, loss_sum / max(loss_n, 1),
                               step * trainer.batch, lr, time.monotonic() - start, grad_norm)
        client.exchange(header)
        loss_sum, loss_n = 0.0, 0

    for step in range(total):
        if step and step % tau == 0:
            exchange(step)
        lr = trainer.lr(step)
        loss_sum += trainer.gradient(step)
        loss_n += 1
        if (step + 1) % tau == 0 or step + 1 == total:  # the gradient the next exchange reports
            grad_norm = float(flat.grads.norm())
        trainer.apply(lr)
    exchange(total)
    client.done(worker_id, total)
    return {"worker_id": worker_id, "steps": total, "samples": total * trainer.batch, "exchanges": k,
            "seconds": time.perf_counter() - t0}
