"""The synchronous ranks: DP-SGD, Local SGD and DiLoCo on a fixed worker communicator.

    mpirun -n 4 hpcopt train --run.method local-sgd --sync.period 8

Every rank is a worker; there are no servers. A *round* is one synchronization: every step for
DP-SGD (gradient allreduce, what DDP/Horovod do), every H = sync.period steps for Local SGD
and DiLoCo (parameter allreduce). World rank 0 also records the trajectory (the average is the
"center") into the same file format as the asynchronous methods, and evaluates it.

With comm.compress, Local SGD's and DiLoCo's averages travel compressed, as the asynchronous
exchanges do (a fair comparison): every rank holds the same reference (the parameters all ranks
restarted from after the last round), sends its change since it in the codec's format, with
error feedback, through an allgather, and every rank adds the mean of the decoded changes to the
reference in the same order, so all get the same average. DP-SGD's gradients go plain.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from mpi4py import MPI

from hpcopt.comm import codec
from hpcopt.comm.wait import wait_all
from hpcopt.config import Config
from hpcopt.io.recorder import Recorder
from hpcopt.launch.device import HostMirror
from hpcopt.optim.sync import DiLoCoOuter, local_sgd_should_average
from hpcopt.roles.worker import Prepared, WorkerSummary


def allreduce_mean_(comm: MPI.Comm, buf: HostMirror, timeout: float, what: str) -> None:
    """In place: buf <- mean of buf over `comm`; collective, with a deadline and no spinning.
    On a GPU the values go through buf's pinned host copy."""
    a = buf.pull().numpy()
    req = comm.Iallreduce(MPI.IN_PLACE, a, op=MPI.SUM)
    wait_all([req], timeout, what)
    a /= comm.size
    buf.push()


class CompressedAverage:
    """The mean over `comm` of the ranks' parameters, with each rank's change since the common
    reference in the codec's format (error feedback keeps what rounding withheld for the next
    round). Collective; every rank gets the same bits."""

    def __init__(self, comm: MPI.Comm, fmt: str, start: np.ndarray):
        self.comm, self.fmt = comm, fmt
        self.ref = start.copy()
        self.err = np.zeros_like(self.ref)
        self.mine = np.empty(codec.payload_size(fmt, start.size), dtype=np.uint8)
        self.all = np.empty((comm.size, self.mine.size), dtype=np.uint8)

    @property
    def bytes_per_round(self) -> int:
        """Sent + received per rank by a ring allgather of the payloads."""
        return 2 * (self.comm.size - 1) * self.mine.size

    def mean_(self, buf: HostMirror, timeout: float, what: str) -> None:
        x = buf.pull().numpy()
        codec.encode_change(self.fmt, x, self.ref, self.mine, err=self.err)  # (x - ref + err; err keeps the rest)
        req = self.comm.Iallgather(self.mine, self.all)
        wait_all([req], timeout, what)
        total = np.zeros_like(x)
        for payload in self.all:  # rank order on every rank: the same sum
            codec.apply(self.fmt, payload, x.size, plus=(total,))
        np.add(self.ref, total / np.float32(self.comm.size), out=x)
        buf.push()

    def restarted(self, buf: HostMirror) -> None:
        """After the round: what every rank continues from is the next reference."""
        self.ref[:] = buf.pull().numpy()


def train_sync(cfg: Config, world: MPI.Comm, ready: Prepared, *, recorder: Recorder | None,
               log) -> tuple[WorkerSummary, int]:
    """Collective over `world` (all ranks are workers, each on its device: `ready`); `recorder` on
    rank 0 only (a Recorder on MPI.COMM_SELF). Returns this rank's summary and the number of rounds."""
    method, p, rank = cfg.run.method, world.size, world.rank
    trainer, host_params = ready.trainer, ready.mirror
    flat = trainer.flat
    host_grads = HostMirror(flat.grads) if method == "dp-sgd" else None
    total, params = trainer.total, flat.params
    H = 1 if method == "dp-sgd" else cfg.sync.period
    switch = round(cfg.sync.switch_epochs * trainer.steps_per_epoch) if method == "local-sgd" else 0
    outer = DiLoCoOuter(params, lr=cfg.sync.outer_lr, momentum=cfg.sync.outer_momentum) if method == "diloco" else None
    theta = params.clone() if outer else None  # DiLoCo's global parameters
    ring_bytes = int(2 * 2 * (p - 1) / p * params.numel() * 4)  # ring allreduce, sent + received
    compressed = None
    if cfg.comm.compress != "none" and method != "dp-sgd":
        compressed = CompressedAverage(world, cfg.comm.compress, host_params.pull().numpy())
        ring_bytes = compressed.bytes_per_round
    rec = recorder
    if rec is not None:
        rec.event("start", detail=f"{p} workers, synchronous {method}")
        for w in range(p):
            rec.event("join", w, w, "", 0, "initial worker")
    losses = np.zeros(p, dtype=np.float64)
    # the round's losses summed on the device, read once a round (not a host wait every step);
    # in float64, so the sum is the same as Python's sum of the float values
    loss_sum = torch.zeros((), dtype=torch.float64, device=params.device)
    loss_n, rounds, t0 = 0, 0, time.perf_counter()
    timeout = cfg.comm.timeout

    for step in range(total):
        lr = trainer.lr(step)
        loss_sum += trainer.gradient(step)
        loss_n += 1
        if method == "dp-sgd":
            allreduce_mean_(world, host_grads, timeout, "the gradient allreduce")
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
        record_workers = method != "dp-sgd" and (rec.wants_worker(rounds) if rec else
                                                 cfg.record.worker_every and rounds % cfg.record.worker_every == 0)
        if record_workers:  # the workers' own parameters, before they are averaged
            gathered = np.empty((p, params.numel()), np.float32) if rank == 0 else None
            req = world.Igather(host_params.pull().numpy(), gathered, root=0)
            wait_all([req], timeout, "the workers' parameters for the trajectory")
        if method != "dp-sgd":
            if compressed is not None:
                compressed.mean_(host_params, timeout, "the compressed parameter average")
            else:
                allreduce_mean_(world, host_params, timeout, "the parameter allreduce")
            if outer is not None:
                outer.step(theta, params)  # outer Nesterov step on Delta = theta - mean(x_i)
                params.copy_(theta)
            if compressed is not None:
                compressed.restarted(host_params)
        mean = float(loss_sum) / loss_n
        if not math.isfinite(mean):
            raise FloatingPointError(f"worker {rank}: training loss {mean} in the {loss_n} steps before step "
                                     f"{done}; lower train.lr (now {cfg.train.lr})")
        losses[:] = 0
        req = world.Igather(np.array([mean]), losses, root=0)
        wait_all([req], timeout, "the workers' losses")
        loss_sum.zero_()
        loss_n = 0
        if rec is not None:
            _record_round(rec, rounds, done, trainer.batch, lr, losses, ring_bytes,
                          gathered if record_workers else None, host_params.pull().numpy(), final=done == total)
    summary = WorkerSummary(worker_id=rank, steps=total, samples=total * trainer.batch, exchanges=rounds,
                            seconds=time.perf_counter() - t0, reason="finished its epochs")
    return summary, rounds


def _record_round(rec: Recorder, rounds, step, batch, lr, losses, nbytes, gathered, center, final) -> None:
    """Rank 0: a round's rows (one per worker), snapshots, evaluation and, when due, a flush."""
    t, p = rec.now(), len(losses)
    for w in range(p):
        rec.row((w, step, rounds, t, losses[w], step * batch, lr, nbytes, float("nan"), -1, -1))
    if gathered is not None:
        for w in range(p):
            rec.worker((w, rounds), (w, step, rounds, t), gathered[w])
    rec.counted(rounds, center)
    if final or rec.eval_due(rounds):
        rec.evaluate(center.copy(), rounds, final)
    rec.report(workers=p)
    if final or rec.flush_due():
        if final:
            for w in range(p):
                rec.event("leave", w, w, "", step, "finished its epochs")
        rec.flush(final=final, evaluate=False, exchanges=rounds, exchanges_total=rounds * p, center=center,
                  active=0 if final else p)  # at the end every worker has left
        if final:
            rec.close()
