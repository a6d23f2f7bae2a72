"""The asynchronous worker: local steps, an exchange with the center every tau steps, and the
elastic part of membership:

- a signal (SIGTERM, SIGINT, SIGUSR1, SIGUSR2: `kill`, Slurm preemption, `--signal`) makes it
  finish its step, make a last exchange and deregister; the others go on;
- a server's STOP notice (the run is ending) does the same;
- a NaN/Inf or exploding training loss is not mixed into the center: the worker asks for the
  center (RESET), restarts from it with a fresh local optimizer state, and the server records
  the event; after train.max_resets resets it gives up and leaves;
- a long stretch without exchanges sends heartbeats, so the servers do not take it for dead;
- every record.checkpoint_seconds it saves its own state to OUT/workers/ (atomically) so a
  resumed run continues it.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass

import torch

from hpcopt.comm import protocol as P
from hpcopt.config import Config
from hpcopt.io.checkpoint import save_worker_state
from hpcopt.io.rundir import RunDir
from hpcopt.launch.signals import SignalFlag, ignore_leave_signals
from hpcopt.models import FlatModel
from hpcopt.roles.local import LocalTrainer


@dataclass
class WorkerSummary:
    worker_id: int
    steps: int  # local steps this run (from its first step)
    samples: int
    exchanges: int  # the worker's exchange counter at the end
    seconds: float
    reason: str  # why it stopped (protocol.REASONS)


def on_device(flat: FlatModel, log, shared: torch.Tensor | None = None) -> tuple[FlatModel, torch.Tensor]:
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


def run_worker(cfg: Config, worker_id: int, flat: FlatModel, data: dict, client, start: float, *,
               run: RunDir | None = None, first_step: int = 0, state: dict | None = None,
               log=print) -> WorkerSummary:
    """Local training with an exchange every tau steps (and one at the end). Starts at
    `first_step` (a join or a resume), from `state` if given. Returns the worker's counts."""
    trainer = LocalTrainer(cfg, worker_id, flat, data)
    # On a GPU, exchanges go through the client's pinned host copy of the parameters
    staged = client.params.data_ptr() != flat.params.data_ptr()

    def through_host(call, *args):
        if staged:
            client.params.copy_(flat.params)
        call(*args)
        if staged:
            flat.params.copy_(client.params)

    total, tau = trainer.total, cfg.easgd.tau
    k = 0
    if state is not None:
        flat.params.copy_(state["params"])
        trainer.load_state_dict(state["trainer"])
        first_step, k = int(state["step"]), int(state["exchange"])
    flags = SignalFlag()
    heartbeat_every = cfg.comm.worker_timeout / 4
    loss_sum, loss_n, lr, grad_norm = 0.0, 0, cfg.train.lr, float("nan")
    reference_loss, resets, reason = None, 0, P.FINISHED
    last_save = time.monotonic()
    t0 = time.perf_counter()

    def header(kind, step, **kw):
        return P.make_header(kind, worker_id, step, k, loss_sum / max(loss_n, 1), step * trainer.batch, lr,
                             time.monotonic() - start, grad_norm, **kw)

    def exchange(step):
        nonlocal loss_sum, loss_n, k, last_save, reference_loss
        k += 1
        if reference_loss is None and loss_n:
            reference_loss = loss_sum / loss_n
        through_host(client.exchange, header(P.EXCHANGE, step))
        loss_sum, loss_n = 0.0, 0
        if run is not None and time.monotonic() - last_save >= cfg.record.checkpoint_seconds:
            save_worker_state(run.worker_state(worker_id), step=step, exchange=k, params=flat.params,
                              trainer_state=trainer.state_dict())
            last_save = time.monotonic()

    step = first_step
    while step < total:
        if step > first_step and (step - first_step) % tau == 0:
            exchange(step)
        if flags or client.poll_notices():
            reason = P.SIGNALLED if flags else P.STOPPED
            break
        lr = trainer.lr(step)
        try:
            loss = trainer.gradient(step)
        except FloatingPointError:
            loss = math.nan
        limit = cfg.train.diverge_factor * reference_loss if reference_loss else math.inf
        if not math.isfinite(loss) or loss > limit:
            resets += 1
            what = f"training loss {loss:.4g}" + (f" > {limit:.4g}" if math.isfinite(loss) else "")
            if resets > cfg.train.max_resets:
                log(f"worker {worker_id}: {what} at step {step}; diverged {resets} times "
                    f"(train.max_resets = {cfg.train.max_resets}), leaving")
                reason = P.GAVE_UP
                break
            log(f"worker {worker_id}: {what} at step {step}: restarting from the center "
                f"(reset {resets} of at most {cfg.train.max_resets})")
            loss_sum, loss_n = loss, 1  # the header carries the bad loss into the event
            through_host(client.fetch, header(P.RESET, step))
            loss_sum, loss_n = 0.0, 0
            trainer.reset_local_state()
            step += 1
            continue
        loss_sum += loss
        loss_n += 1
        if (step + 1) % tau == 0 or step + 1 == total:  # the gradient the next exchange reports
            grad_norm = float(flat.grads.norm())
        trainer.apply(lr)
        client.heartbeat(worker_id, step, heartbeat_every)
        step += 1
    if reason != P.GAVE_UP:
        exchange(step)  # the last exchange: what the worker learnt since the previous one counts
    if run is not None and reason in (P.SIGNALLED, P.STOPPED):
        save_worker_state(run.worker_state(worker_id), step=step, exchange=k, params=flat.params,
                          trainer_state=trainer.state_dict())
    client.done(worker_id, step, reason)
    ignore_leave_signals()
    if flags:
        log(f"worker {worker_id}: left on signal {signal.Signals(flags.received).name} at step {step}")
    return WorkerSummary(worker_id=worker_id, steps=step - first_step, samples=(step - first_step) * trainer.batch,
                         exchanges=k, seconds=time.perf_counter() - t0, reason=P.REASONS[reason])
