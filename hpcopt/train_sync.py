"""Synchronous baselines on a fixed worker communicator: DP-SGD, Local SGD, DiLoCo.

    mpirun -n 4 hpcopt train --run.method local-sgd --sync.period 8

Every rank is a worker; there are no servers. A *round* is one synchronization: every step for
DP-SGD (gradient allreduce, what DDP/Horovod do), every H = sync.period steps for Local SGD
and DiLoCo (parameter allreduce). World rank 0 also records the trajectory (the average is the
"center") into the same file format as the asynchronous methods, and evaluates it.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

from hpcopt.comm.wait import wait_all
from hpcopt.config import Config
from hpcopt.io import schema
from hpcopt.models import FlatModel
from hpcopt.optim.sync import DiLoCoOuter, local_sgd_should_average
from hpcopt.worker import LocalTrainer


def allreduce_mean_(comm: MPI.Comm, buf: torch.Tensor, timeout: float, what: str) -> None:
    """In place: buf <- mean of buf over `comm`; collective, with a deadline and no spinning."""
    a = buf.numpy()
    req = comm.Iallreduce(MPI.IN_PLACE, a, op=MPI.SUM)
    wait_all([req], timeout, what)
    a /= comm.size


def train_sync(cfg: Config, world: MPI.Comm, flat: FlatModel, data: dict, *, writer, evaluator,
               start: float, log) -> dict:
    """Collective over `world` (all ranks are workers). `writer`/`evaluator` only on rank 0."""
    method, p, rank = cfg.run.method, world.size, world.rank
    trainer = LocalTrainer(cfg, rank, flat, data)
    total, params = trainer.total, flat.params
    H = 1 if method == "dp-sgd" else cfg.sync.period
    switch = round(cfg.sync.switch_epochs * trainer.steps_per_epoch) if method == "local-sgd" else 0
    outer = DiLoCoOuter(params, lr=cfg.sync.outer_lr, momentum=cfg.sync.outer_momentum) if method == "diloco" else None
    theta = params.clone() if outer else None  # DiLoCo's global parameters
    ring_bytes = int(2 * 2 * (p - 1) / p * params.numel() * 4)  # ring allreduce, sent + received
    recorder = _Recorder(cfg, writer, evaluator, params, start, log, p) if rank == 0 else None
    losses = np.zeros(p, dtype=np.float64)
    loss_sum, loss_n, rounds, t0 = 0.0, 0, 0, time.perf_counter()
    timeout = cfg.comm.timeout

    for step in range(total):
        lr = trainer.lr(step)
        loss_sum += trainer.gradient(step)
        loss_n += 1
        if method == "dp-sgd":
            allreduce_mean_(world, flat.grads, timeout, "the gradient allreduce")
        trainer.apply(lr)
        done = step + 1
        if method == "dp-sgd":
            sync = True
        elif method == "local-sgd":
            sync = local_sgd_should_average(done, H, switch) or done == total
        else:
            sync = done % H == 0 or done == total
        if not sync:
            continue
        rounds += 1
        record_workers = (method != "dp-sgd" and cfg.record.worker_every
                          and rounds % cfg.record.worker_every == 0)
        if record_workers:  # the workers' own parameters, before they are averaged
            gathered = np.empty((p, params.numel()), np.float32) if rank == 0 else None
            req = world.Igather(params.numpy(), gathered, root=0)
            wait_all([req], timeout, "the workers' parameters for the trajectory")
        if method != "dp-sgd":
            allreduce_mean_(world, params, timeout, "the parameter allreduce")
            if outer is not None:
                outer.step(theta, params)  # outer Nesterov step on Delta = theta - mean(x_i)
                params.copy_(theta)
        losses[:] = 0
        req = world.Igather(np.array([loss_sum / loss_n]), losses, root=0)
        wait_all([req], timeout, "the workers' losses")
        loss_sum, loss_n = 0.0, 0
        if recorder is not None:
            recorder.round(rounds, done, trainer.batch, lr, losses, ring_bytes,
                           gathered if record_workers else None, final=done == total)
    summary = {"worker_id": rank, "steps": total, "samples": total * trainer.batch, "exchanges": rounds,
               "seconds": time.perf_counter() - t0}
    if recorder is not None:
        summary.update(recorder.finish())
    return summary


class _Recorder:
    """Rank 0: buffers the rounds and writes them to the trajectory file (opened on COMM_SELF)."""

    def __init__(self, cfg, writer, evaluator, params, start, log, p):
        self.cfg, self.writer, self.evaluator, self.params = cfg, writer, evaluator, params
        self.start, self.log, self.p = start, log, p
        self.center = [params.numpy().copy()]
        self.center_meta = [(0, 0.0)]
        self.workers, self.workers_meta, self.rows = [], [], []
        self.events = [schema.event_row(0.0, "start", detail=f"{p} workers, synchronous {cfg.run.method}")]
        self.events += [schema.event_row(0.0, "join", w, w, "", 0, "initial worker") for w in range(p)]
        self.last_flush = self.last_eval = time.monotonic()
        self.rounds = 0

    def now(self):
        return time.monotonic() - self.start

    def round(self, rounds, step, batch, lr, losses, nbytes, gathered, final):
        t = self.now()
        self.rounds = rounds
        self.rows += [(w, step, rounds, t, losses[w], step * batch, lr, nbytes, float("nan"), -1, -1) for w in range(self.p)]
        if gathered is not None:
            self.workers += list(gathered)
            self.workers_meta += [(w, step, rounds, t) for w in range(self.p)]
        if rounds % self.cfg.record.center_every == 0 or final:
            self.center.append(self.params.numpy().copy())
            self.center_meta.append((rounds, t))
        now = time.monotonic()
        if final or (now - self.last_eval >= self.cfg.record.eval_seconds and not self.evaluator.busy):
            if final:
                self.evaluator.wait()
            self.evaluator.submit(self.params.numpy().copy(), rounds, t)
            self.last_eval = now
            if final:
                self.evaluator.wait()
        for exchanges, te, loss, acc in self.evaluator.new_results():
            self.log(f"[{te:7.1f}s] rounds {exchanges:6d}  workers {self.p}  average test acc "
                     f"{100 * acc:5.2f}%  loss {loss:.4f}")
        if final or now - self.last_flush >= self.cfg.record.flush_seconds:
            if final:
                self.events += [schema.event_row(t, "leave", w, w, "", step, "finished its epochs") for w in range(self.p)]
                self.events.append(schema.event_row(t, "end", detail=f"{rounds} rounds"))
            self.flush(final)

    def flush(self, final):
        self.writer.flush(
            center_rows=self.center, center_meta=np.array(self.center_meta, dtype=schema.CENTER_META),
            worker_rows=self.workers, worker_meta=np.array(self.workers_meta, dtype=schema.WORKER_META),
            tables={"exchanges": self.rows, "evals": self.evaluator.take(), "events": self.events},
            attrs={"exchanges_total": self.rounds * self.p, "wall_seconds": self.now(),
                   "status": "complete" if final else "running"})
        self.center, self.center_meta, self.workers, self.workers_meta = [], [], [], []
        self.rows, self.events = [], []
        self.last_flush = time.monotonic()

    def finish(self) -> dict:
        self.writer.close()
        last = self.evaluator.last
        return {"rounds": self.rounds, "wall_seconds": self.now(),
                "final_center_test_accuracy": last[3] if last else float("nan")}
