"""The server role: a rank that owns a shard of the center. Builds the center rule, the recorder
and the joins for it, restores a resumed run's state, and serves until every worker has left."""

from __future__ import annotations

import numpy as np
import torch

from hpcopt.comm.joins import Joins
from hpcopt.comm.server import CenterServer, ServeSummary
from hpcopt.io import tensorboard as tb
from hpcopt.io.recorder import Recorder, RunInfo
from hpcopt.launch.signals import SignalFlag, ignore_leave_signals
from hpcopt.optim.center import make_rule
from hpcopt.optim.grawa import layer_bounds


def serve(s, writer, evaluator) -> ServeSummary:
    """Collective over the server ranks. `s` is the run's Setup (hpcopt.roles.train)."""
    cfg, role, flat, ckpt = s.cfg, s.role, s.flat, s.ckpt
    lo, hi = s.bounds[role.rank]
    resumed = int(ckpt["attrs"]["exchanges"]) if ckpt is not None else 0
    joins = Joins(s.run, role, n_params=flat.numel, timeout=cfg.comm.timeout, log=s.log)
    layers = layer_bounds(flat.layout())
    rule = make_rule(cfg.run.method, torch.from_numpy(flat.params.numpy()[lo:hi].copy()), alpha=s.alpha,
                     layers=layers, lo=lo, loss_decay=cfg.lsgd.loss_decay, lam_g=cfg.lsgd.lam_g,
                     global_every=cfg.lsgd.tau_g // cfg.easgd.tau)
    info = RunInfo(method=cfg.run.method, model=cfg.model.name, layout=flat.layout(), n_params=flat.numel,
                   server_hosts=[s.hosts[r] for r in range(role.size)], joins_enabled=joins.enabled,
                   resumed_from=resumed)
    tensorboard = tb.for_run(cfg, resumed=resumed, log=s.log) if role.rank == 0 else None
    recorder = Recorder(role, writer, cfg.record, bounds=s.bounds, start=s.start, evaluator=evaluator, log=s.log,
                        exchanges=resumed, center=None if ckpt is not None else rule.center.numpy(), run=s.run,
                        info=info, tensorboard=tensorboard)  # (a resumed file has its starting center already)
    server = CenterServer(
        world=s.world, servers=role, workers={w: (r, s.hosts[r], s.pids[r]) for r, w in s.workers.items()},
        bounds=s.bounds, rule=rule, recorder=recorder, comm=cfg.comm, start=s.start,
        deterministic=cfg.run.deterministic, log=s.log, exchanges=resumed,
        next_worker_id=max(int(ckpt["attrs"]["next_worker_id"]), max(s.workers.values()) + 1) if ckpt else None,
        n_layers=len(layers) if rule.name == "lgrawa" else 0, group_size=cfg.lsgd.group_size,
        shared=s.share.workers, sync=s.share.sync, joins=joins, at_center=ckpt is None)
    if ckpt is not None:
        _restore(server, ckpt, lo, hi)
        server.event("resume", detail=f"from the checkpoint at exchange {resumed}, {len(s.workers)} workers")
    else:
        server.event("start", detail=f"{len(s.workers)} workers, {len(s.bounds)} servers")
    for rank, wid in sorted(s.workers.items()):
        server.event("join", wid, 0, "resumed worker" if ckpt is not None else "initial worker")
    if role.rank == 0:
        _say_how(s, joins)
    server.stop_flag = SignalFlag()
    try:
        summary = server.serve()
    finally:
        joins.close()
        ignore_leave_signals()
    if role.rank == 0 and server.departed:
        owed = sorted(server.departed)
        s.log(f"hpcopt: the run is stopped, not complete: worker(s) {', '.join(map(str, owed))} did not finish "
              f"their epochs (left, crashed, or not started in this launch); `hpcopt train -n N --resume "
              f"{s.run.path}` continues them from their saved state")
    # after the final flush: server 0 leaves the final center as OUT/center.pt
    center = recorder.gather(rule.center.numpy())  # collective over the servers
    if role.rank == 0:
        from hpcopt.roles.train import write_center

        write_center(s, center)
    return summary


def _say_how(s, joins) -> None:
    """Server 0: how exchanges travel and whether joins are open."""
    local, n = len(s.share.workers), len(s.workers)
    if local:
        s.log("exchanges: " + (f"all {n} worker(s)" if local == n else f"{local} of {n} worker(s)")
              + " in place through shared memory" + ("" if local == n else ", the others over messages")
              + (f" (comm.compress = {s.cfg.comm.compress} applies to messages only)"
                 if s.cfg.comm.compress != "none" else ""))
    else:
        s.log("exchanges: over messages" + ("" if s.cfg.comm.shared_memory else " (comm.shared_memory = false)")
              + (f" (no shared memory: {s.share.why_not})" if s.share.why_not else ""))
    s.log(f"joins: {'open: hpcopt join ' + str(s.run.path) if joins.enabled else 'disabled (no ompi-server; start with hpcopt train -n N to allow them)'}")


def _restore(server: CenterServer, ckpt: dict, lo: int, hi: int) -> None:
    """A resumed server takes the checkpoint's per-worker state (the center rule's) for the
    workers that continue. The checkpoint's workers not started in this launch (a resume with
    fewer workers) keep their rows, as departed workers: every later checkpoint has them, the run
    is not complete without them, and a later resume with more workers continues them."""
    for row in ckpt["workers"]:
        wid = int(row["worker_id"])
        if wid not in server.peers:
            server.departed[wid] = (wid, int(row["step"]), int(row["exchanges"]), float(row["loss_avg"]),
                                    float(row["grad_norm"]))
            continue
        server.peers[wid].step = int(row["step"])
        server.peers[wid].exchanges = int(row["exchanges"])  # counted over the run, not this launch
        latest = ckpt["latest"].get(wid)
        server.rule.restore(wid, loss_avg=float(row["loss_avg"]), grad_norm=float(row["grad_norm"]),
                            params=None if latest is None else torch.from_numpy(np.ascontiguousarray(latest[lo:hi])))
