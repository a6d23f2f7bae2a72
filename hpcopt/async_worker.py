"""A worker of the asynchronous methods: local steps, an exchange with the center every tau
steps, and the elastic part of membership:

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

import io
import math
import signal
import time

import torch

from hpcopt.comm import protocol as P
from hpcopt.config import Config
from hpcopt.models import FlatModel
from hpcopt.rundir import RunDir, write_atomic
from hpcopt.worker import LocalTrainer

LEAVE_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class SignalFlag:
    """Remembers the first leave signal; the training loop checks it between steps."""

    def __init__(self, signals=LEAVE_SIGNALS):
        self.received: int | None = None
        for s in signals:
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        if self.received is None:
            self.received = signum

    def __bool__(self) -> bool:
        return self.received is not None


def ignore_leave_signals() -> None:
    """Once a rank's work is done it waits in MPI_Finalize for every other rank of its job (a
    PMIx fence). Python resets its own handlers to the default action when it finalizes, and the
    default for SIGUSR1/2, SIGINT and SIGTERM is to die: a graceful stop forwarded to the whole job
    would then kill the ranks that left early in the middle of the fence, and the others would
    wait for them forever. Ignored signals stay ignored through finalization."""
    for s in LEAVE_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def save_worker_state(path, trainer: LocalTrainer, flat: FlatModel, step: int, k: int) -> None:
    buf = io.BytesIO()
    torch.save({"step": step, "exchange": k, "params": flat.params.clone(),
                "trainer": trainer.state_dict(), "n_parameters": flat.numel}, buf)
    write_atomic(path, buf.getvalue())


def load_worker_state(path, flat: FlatModel) -> dict | None:
    """A worker's saved state, or None when there is none (or it does not fit this model)."""
    try:
        state = torch.load(path, weights_only=False)
    except FileNotFoundError:
        return None
    except Exception as e:  # a corrupt state is not fatal: the worker starts from the center
        print(f"hpcopt: ignoring unreadable worker state {path}: {e}", flush=True)
        return None
    if state.get("n_parameters") != flat.numel:
        print(f"hpcopt: ignoring worker state {path}: it has {state.get('n_parameters')} parameters, "
              f"the model {flat.numel}", flush=True)
        return None
    return state


def run_worker(cfg: Config, worker_id: int, flat: FlatModel, data: dict, client, start: float, *,
               run: RunDir | None = None, first_step: int = 0, state: dict | None = None,
               log=print) -> dict:
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
            save_worker_state(run.worker_state(worker_id), trainer, flat, step, k)
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
        save_worker_state(run.worker_state(worker_id), trainer, flat, step, k)
    client.done(worker_id, step, reason)
    ignore_leave_signals()
    if flags:
        log(f"worker {worker_id}: left on signal {signal.Signals(flags.received).name} at step {step}")
    return {"worker_id": worker_id, "steps": step - first_step, "samples": (step - first_step) * trainer.batch,
            "exchanges": k, "seconds": time.perf_counter() - t0, "reason": P.REASONS[reason]}
