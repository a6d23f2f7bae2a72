"""`hpcopt join RUN`: this MPI job's ranks become workers of the training running in RUN.

    hpcopt join runs/mine -n 2
    OMPI_MCA_pmix_server_uri=file:runs/mine/ompi-server.uri mpirun -n 2 hpcopt join runs/mine

The handshake (hpcopt.comm.joins): a request in the run directory, the servers' answer, one
MPI connect per server; then the new workers fetch the center and train like any other.
"""

from __future__ import annotations

import os
import time

import torch

from hpcopt.io.rundir import RunDir, read_json
from hpcopt.launch.device import keep_freed_memory
from hpcopt.launch.env import Environment
from hpcopt.models import FlatModel, build_model
from hpcopt.roles.train import UsageError, _chunk, _layer_norms, _load_data, _on_root, _stale_seconds, log_all
from hpcopt.roles.worker import WorkerSummary, prepare, run_worker


def join(run_path: str, *, token: str | None = None, log=print) -> WorkerSummary:
    """Collective over MPI.COMM_WORLD of the joining job."""
    from mpi4py import MPI

    from hpcopt import config as C
    from hpcopt.comm import protocol as P
    from hpcopt.comm.client import CenterClient
    from hpcopt.comm.joins import JoinRefused, answer_challenge, connect, joins_possible, not_running, request_join
    from hpcopt.comm.protocol import shard_bounds
    from hpcopt.launch.env import install_abort_on_error

    world = MPI.COMM_WORLD
    run = RunDir(run_path)
    env = Environment.from_mpi(world)

    def load_cfg():
        why = not_running(run)  # first: a missing or dead run is the problem, not how this job was started
        if why is not None:
            raise UsageError(why)
        if not joins_possible():
            raise UsageError(
                "this job cannot connect to the training: it was started without the run's ompi-server. "
                f"Run `hpcopt join {run.path} -n N`, or set OMPI_MCA_pmix_server_uri=file:{run.server_uri} "
                "for mpirun")
        try:  # the run's own config, unchanged: the servers expect its exchanges (format, chunks)
            return C.load(str(run.config))
        except C.ConfigError as e:
            raise UsageError(f"{run.config}: {e}") from None

    t_start = time.monotonic()
    cfg = _on_root(world, load_cfg)
    keep_freed_memory()  # a step's gradients reuse the last step's memory (device.py)
    torch.set_num_threads(cfg.run.threads)
    data = _load_data(cfg, world, run)
    t_data = time.monotonic()
    flat = FlatModel(build_model(cfg.model.name, cfg.model.kwargs))
    hosts, pids = world.gather(env.host, root=0), world.gather(os.getpid(), root=0)
    # device, data on it and a first pass before asking: once admitted, the servers' clock runs
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    ready = prepare(cfg, 0, flat, data, node_rank=node.rank, log=log_all)
    node.Free()

    secret = {}  # the token, on rank 0 only: it answers the servers' challenges

    def ask():
        secret["token"] = token or run.read_token()
        try:
            return request_join(run, token=secret["token"], hosts=hosts, pids=pids,
                                n_params=flat.numel, timeout=cfg.comm.timeout, stale_seconds=_stale_seconds(cfg))
        except JoinRefused as e:
            raise UsageError(str(e)) from None

    answer = _on_root(world, ask)
    t0 = time.monotonic()  # the servers said yes
    links = []
    for port in answer["ports"]:  # each server challenges the new connection: rank 0 proves the token
        inter = connect(world, port if world.rank == 0 else None, cfg.comm.timeout)
        if world.rank == 0:
            answer_challenge(inter, secret["token"], answer["request"], cfg.comm.timeout)
        links.append((inter, 0))
    bounds = shard_bounds(flat.numel, len(links))
    wid = answer["first_worker_id"] + world.rank
    ready.trainer.assign(wid)
    flat = ready.trainer.flat
    client = CenterClient(links, bounds, ready.mirror.host, chunk=_chunk(cfg), timeout=cfg.comm.timeout,
                          layer_norms=_layer_norms(cfg, flat), leaders=cfg.run.method == "lsgd",
                          compress=cfg.comm.compress, exact_every=cfg.record.worker_every,
                          gone=lambda: run.stale(_stale_seconds(cfg)) if run.lock_file.exists() else None)
    status = _read_json_safe(run.status)
    start = time.monotonic() - float(status.get("elapsed_seconds", 0.0))
    install_abort_on_error(world, whole_job=False)
    client.fetch(P.make_header(P.FETCH, wid, answer["start_step"]))
    ready.mirror.push()
    log(f"joined {run.path} as worker(s) {answer['first_worker_id']}..{answer['first_worker_id'] + world.size - 1} "
        f"with {len(links)} server(s), starting at step {answer['start_step']}: config+data {t_data - t_start:.2f} s, "
        f"handshake {t0 - t_data:.2f} s, connect+fetch {time.monotonic() - t0:.2f} s")
    return run_worker(cfg, wid, ready, client, start, run=run, first_step=answer["start_step"], log=log_all)


def _read_json_safe(path) -> dict:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return {}
