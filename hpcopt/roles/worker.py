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
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch

from hpcopt.comm import protocol as P
from hpcopt.config import Config
from hpcopt.io.checkpoint import WorkerStateSaver
from hpcopt.io.rundir import RunDir
from hpcopt.launch.device import HostMirror
from hpcopt.launch.signals import SignalFlag, ignore_leave_signals
from hpcopt.models import FlatModel
from hpcopt.roles.local import LocalTrainer, StepLosses


@dataclass
class WorkerSummary:
    worker_id: int
    steps: int  # local steps this run (from its first step)
    samples: int
    exchanges: int  # the worker's exchange counter at the end
    seconds: float
    reason: str  # why it stopped (protocol.REASONS)


class DivergenceGuard:
    """Whether a worker is diverging, in a way ordinary noise does not meet.

    The reference is the loss of the run's untrained model (LocalTrainer.initial_loss: the same
    for every worker, joined or resumed), else the worker's first loss. A loss counts as exploding above
    `factor` x reference. NaN/Inf diverges at once; a finite excess only when it lasts `patience`
    steps in a row (single spikes of a run at a constant learning rate do not), or when the mean
    loss since the last exchange exceeds the limit at an exchange (so huge but finite parameters
    are never sent to the center in the meantime)."""

    def __init__(self, factor: float, patience: int = 3, reference: float | None = None):
        self.factor, self.patience, self.reference = factor, patience, reference
        self.streak = 0

    @property
    def limit(self) -> float:
        return self.factor * self.reference if self.reference else math.inf

    def step(self, loss: float) -> str | None:
        """A local step's loss: why the worker diverged, or None."""
        if not math.isfinite(loss):
            return f"training loss {loss:.4g}"
        if self.reference is None:
            self.reference = loss
        self.streak = self.streak + 1 if loss > self.limit else 0
        if self.streak >= self.patience:
            return f"training loss {loss:.4g} > {self.limit:.4g} for {self.streak} steps"
        return None

    def exchange(self, mean_loss: float) -> str | None:
        """Before an exchange, with the mean loss since the last one: why not to send, or None."""
        if math.isfinite(mean_loss) and mean_loss > self.limit:
            return f"mean training loss {mean_loss:.4g} > {self.limit:.4g} since the last exchange"
        return None

    def reset(self) -> None:
        self.streak = 0


def on_device(flat: FlatModel, log, shared: torch.Tensor | None = None,
              node_rank: int | None = None, separate: bool = False) -> tuple[FlatModel, HostMirror]:
    """A worker moves to the GPU of its node-local rank, if it has one (hpcopt.launch.device).
    Returns the model there and the host mirror exchanges use (on the CPU, the parameters
    themselves). `shared`, when given, is the worker's shared-memory window (hpcopt.comm.shared):
    the CPU parameters, or the GPU parameters' host copy, live there. `separate` (comm.overlap):
    exchanges work on a host copy on the CPU too (the window, if any, holds that copy)."""
    from hpcopt.launch.device import select_device

    # nothing may start CUDA before this (a MIG instance is chosen through CUDA_VISIBLE_DEVICES)
    choice = select_device("worker", node_rank=node_rank, log=log, log_cpu=False)
    if choice.device == "cpu":
        if separate:
            return flat, HostMirror(flat.params, host=shared, separate=True)
        if shared is not None:
            flat.place(shared)
        return flat, HostMirror(flat.params)
    torch.cuda.set_device(torch.device(choice.device))  # before anything is allocated there
    moved = FlatModel(flat.module, device=choice.device)
    mirror = HostMirror(moved.params, host=shared)
    if not mirror.pinned:
        log(f"[hpcopt worker] could not page-lock the shared-memory window: exchanges copy synchronously")
    return moved, mirror


@dataclass
class Prepared:
    """A worker ready to train: model and data on its device, a first forward pass done (CUDA
    context, kernels and libraries loaded), before the servers' liveness clock starts."""

    trainer: LocalTrainer
    mirror: HostMirror
    reference: float  # the divergence guard's (LocalTrainer.initial_loss)
    seconds: float


def prepare(cfg: Config, worker_id: int, flat: FlatModel, data: dict, *, shared: torch.Tensor | None = None,
            node_rank: int | None = None, log=print) -> Prepared:
    t0 = time.monotonic()
    if cfg.run.deterministic:  # reproducible kernels on a GPU too (cuBLAS reads this at its start);
        # an op with no deterministic CUDA kernel warns instead of failing the worker
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    flat, mirror = on_device(flat, log, shared, node_rank, separate=cfg.comm.overlap and not cfg.synchronous)
    if cfg.comm.compress != "none":
        from hpcopt.comm import codec

        codec.warm(cfg.comm.compress)
    trainer = LocalTrainer(cfg, worker_id, flat, data)
    reference = trainer.initial_loss()
    if flat.params.is_cuda:
        trainer.warm_up()
        torch.cuda.synchronize()
    seconds = time.monotonic() - t0
    if seconds > cfg.comm.worker_timeout / 2:
        log(f"worker {worker_id}: getting ready on {flat.params.device} took {seconds:.1f} s (device, data, a "
            f"first forward pass); the servers wait for that before their clock (comm.worker_timeout = "
            f"{cfg.comm.worker_timeout:g} s) starts")
    return Prepared(trainer=trainer, mirror=mirror, reference=reference, seconds=seconds)


class Overlap:
    """comm.overlap: an exchange runs in a thread on the mirror's host copy (never on the
    parameters being trained) while the worker keeps stepping; once it completes, the move it
    made of that copy is applied to the parameters -- at the latest at the next exchange, so
    the move is at most one period late (as in Streaming DiLoCo). While an exchange is in
    flight only its thread calls the client (and MPI: thread level "serialized")."""

    def __init__(self, client, mirror: HostMirror):
        self.client, self.mirror = client, mirror
        # LGRAWA: the trainer rewrites its layer norms while an exchange is in flight; the
        # thread sends a copy taken at start() (MPI forbids changing a buffer being sent)
        self.norms = client.layer_norms
        if self.norms is not None:
            client.layer_norms = self.norms.copy()
        # the copy an exchange sent, then the move it made of it (a compressed exchange: the move only)
        self.sent = torch.empty(mirror.host.numel(), dtype=mirror.host.dtype, pin_memory=mirror.tensor.is_cuda)
        self.direct = False  # whether `sent` holds the move already
        # on the CPU a compressed exchange needs neither `sent` nor the host copy: its change is
        # encoded from the parameters in start() (between two steps) and its move applied to
        # them in finish(), 4 passes over the vector fewer (client.encode_ahead)
        self.ahead = False
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.waited = 0.0  # seconds the training waited for exchanges in flight (the link, or the servers)
        self.cpu = 0.0  # CPU seconds the exchanges' threads used (codec, copies, MPI): the training's cores
        self.moved = None  # a CUDA event: the last move's copy to the device has read `sent`

    @property
    def busy(self) -> bool:
        return self.thread is not None

    def start(self, header) -> None:
        # the training's thread only starts the copy of its parameters (on a GPU it does not
        # wait for it); the thread waits for it and keeps what was sent. On the CPU a compressed
        # exchange encodes here instead (a pass it would make anyway, and no copy)
        self.ahead = not self.mirror.tensor.is_cuda and self.client.moves_only(header)
        if self.ahead:
            self.client.encode_ahead(header, self.mirror.tensor.detach().numpy())
            copied = lambda: None  # noqa: E731
        else:
            copied = self.mirror.pull_async()
        if self.norms is not None:
            self.client.layer_norms[:] = self.norms
        self.thread = threading.Thread(target=self._run, args=(header, copied), name="hpcopt-exchange", daemon=True)
        self.thread.start()

    def _run(self, header, copied) -> None:
        cpu = time.thread_time()
        try:
            if self.mirror.tensor.is_cuda:  # a new thread's current device is GPU 0: its events and
                torch.cuda.set_device(self.mirror.tensor.device)  # copies would open a context there
            copied()
            if self.moved is not None:
                self.moved.synchronize()
            if self.ahead:
                self.client.exchange(header, ahead=True)
            elif self.client.moves_only(header):  # compressed: the client writes the move itself
                self.client.exchange(header, moves=self.sent.numpy())  # (every wait in it has comm.timeout)
                self.direct = True
            else:
                self.sent.copy_(self.mirror.host)  # before the exchange rewrites the host copy
                self.client.exchange(header)
                self.direct = False
        except BaseException as e:  # raised where the training is: in finish()
            self.error = e
        finally:
            self.cpu += time.thread_time() - cpu  # (read in finish(), after the join)

    def poll(self) -> None:
        """Apply a completed exchange's move now (less stale than at the next exchange)."""
        if self.thread is not None and not self.thread.is_alive():
            self.finish()

    def finish(self) -> None:
        """Wait for the exchange in flight, if any, and apply its move to the parameters."""
        if self.thread is None:
            return
        if self.thread.is_alive():
            t = time.perf_counter()
            self.thread.join()
            self.waited += time.perf_counter() - t
        self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        if self.ahead:
            self.client.apply_ahead(self.mirror.tensor.detach().numpy())
            return
        # what the exchange did to the copy it sent (a compressed one wrote it into `sent`)
        move = self.sent if self.direct else self.sent.sub_(self.mirror.host)
        self.mirror.tensor.sub_(move.to(self.mirror.tensor.device, non_blocking=True))
        if self.mirror.tensor.is_cuda:  # the next exchange rewrites `sent` only once that copy has read it
            self.moved = torch.cuda.Event()
            self.moved.record(torch.cuda.current_stream(self.mirror.tensor.device))


def run_worker(cfg: Config, worker_id: int, ready: Prepared, client, start: float, *,
               run: RunDir | None = None, first_step: int = 0, state: dict | None = None,
               log=print) -> WorkerSummary:
    """Local training with an exchange every tau steps (and one at the end). Starts at
    `first_step` (a join or a resume), from `state` if given. Returns the worker's counts."""
    trainer, mirror = ready.trainer, ready.mirror
    flat = trainer.flat

    def through_host(call, *args, send: bool = True):
        """An exchange (or, send=False, a fetch) through the host copy the client works on."""
        if send:
            mirror.pull()
        else:  # the host copy is about to be received into: the last push must have read it
            mirror.settle()
        call(*args)
        mirror.push()

    total, tau = trainer.total, cfg.easgd.tau
    k = 0
    if state is not None:
        flat.params.copy_(state["params"].to(flat.params.device))
        note = trainer.load_state_dict(state["trainer"])
        if note:
            log(f"worker {worker_id}: {note}")
        first_step, k = int(state["step"]), int(state["exchange"])
    flags = SignalFlag()
    heartbeat_every = cfg.comm.worker_timeout / 4
    loss_sum, loss_n, lr, grad_norm = 0.0, 0, cfg.train.lr, float("nan")
    guard = DivergenceGuard(cfg.train.diverge_factor,
                            reference=ready.reference if math.isfinite(ready.reference) else None)
    resets, reason = 0, P.FINISHED
    saver = None if run is None else WorkerStateSaver(run.worker_state(worker_id), cfg.record.checkpoint_seconds, log,
                                                      f"worker {worker_id}")
    t0, cpu0 = time.perf_counter(), time.process_time()

    def header(kind, step, **kw):
        # no batches since the last message: no loss to report (NaN), never a perfect 0.0
        return P.make_header(kind, worker_id, step, k, loss_sum / loss_n if loss_n else math.nan, step * trainer.batch, lr,
                             time.monotonic() - start, grad_norm, **kw)

    overlap = Overlap(client, mirror) if cfg.comm.overlap else None

    def exchange(step, last: bool = False):
        """(With overlap the previous exchange's move is applied already: see the loop.)"""
        nonlocal loss_sum, loss_n, k
        save = saver is not None and saver.due()
        if save and overlap is not None:  # before the next exchange leaves: a state with every
            save_state(step)  # move it has counted (after start() the one in flight would be missing)
        k += 1
        if overlap is not None and not last:
            overlap.start(header(P.EXCHANGE, step))
        else:
            through_host(client.exchange, header(P.EXCHANGE, step))
        loss_sum, loss_n = 0.0, 0
        if save and overlap is None:
            save_state(step)

    def save_state(step, wait=False):
        """The worker's own state, for a resume (losing it costs the resumed worker its local
        state only: it restarts from the center); copied here, written in the background."""
        saver.save(step=step, exchange=k, params=flat.params, trainer_state=trainer.state_dict(), wait=wait)

    def finite() -> bool:
        """The parameters the next exchange sends: a step with a finite loss can still produce
        NaN/Inf parameters (a NaN gradient), and those must never reach the center."""
        return math.isfinite(float(flat.params.sum()))  # NaN/Inf when an element is (or all are huge)

    def reset(what: str, step: int, bad_loss: float) -> bool:
        """Restart from the center (RESET) after a divergence; False once it happened too often."""
        nonlocal resets, loss_sum, loss_n, grad_norm
        resets += 1
        if resets > cfg.train.max_resets:
            log(f"worker {worker_id}: {what} at step {step}; diverged {resets} times "
                f"(train.max_resets = {cfg.train.max_resets}), leaving")
            return False
        log(f"worker {worker_id}: {what} at step {step}: restarting from the center "
            f"(reset {resets} of at most {cfg.train.max_resets})")
        losses.clear()  # a loss taken from the parameters the center is about to overwrite
        # and no gradient norm from them either: the step read late may have computed the norms
        # the next exchange reports (NaN: the server keeps the worker's previous weight)
        grad_norm = math.nan
        flat.layer_grad_norms[:] = math.nan
        loss_sum, loss_n = bad_loss, 1  # the header carries the bad loss into the event
        if overlap is not None:
            overlap.finish()
        through_host(client.fetch, header(P.RESET, step), send=False)  # the center overwrites them
        loss_sum, loss_n = 0.0, 0
        trainer.reset_local_state()
        guard.reset()
        return True

    def count(read: tuple[int, float] | None) -> tuple[str, int, float] | None:
        """A step's loss, read (StepLosses): counted, or (why, step, loss) if the worker diverged."""
        nonlocal loss_sum, loss_n
        if read is None:
            return None
        at, value = read
        why = guard.step(value)
        if why is not None:
            return why, at, value
        loss_sum += value
        loss_n += 1
        return None

    def why_not_exchange(step) -> tuple[str, int, float] | None:
        """Before an exchange: the last step's loss read, then what it would send checked."""
        bad = count(losses.take())
        if bad is None:
            mean = loss_sum / loss_n if loss_n else math.nan
            why = "non-finite parameters" if not finite() else guard.exchange(mean)
            bad = None if why is None else (why, step, mean)
        return bad

    losses = StepLosses(flat.params.device)
    step = first_step
    restarted = None  # the step at which the loop last restarted from the center
    while step < total:
        # (right after a restart the parameters are the center's: nothing to exchange yet)
        if step > first_step and (step - first_step) % tau == 0 and restarted != step:
            if overlap is not None:
                overlap.finish()  # the previous move first: what is checked is what the next one sends
            bad = why_not_exchange(step)
            if bad is None:
                exchange(step)
            elif not reset(*bad):
                reason = P.GAVE_UP
                break
        if overlap is not None:
            overlap.poll()
        talk = overlap is None or not overlap.busy  # (else only the exchange's thread talks to the servers)
        # (a STOP the exchange's thread took is in client.stop_requested: with slow links an
        # exchange is always in flight, and the worker must still see it)
        if flags or client.stop_requested or (talk and client.poll_notices()):
            reason = P.SIGNALLED if flags else P.STOPPED
            break
        lr = trainer.lr(step)
        loss = trainer.gradient(step)
        if (step + 1) % tau == 0 or step + 1 == total:  # the gradient the next exchange reports
            grad_norm = float(flat.grads.norm())
        trainer.apply(lr)
        if talk:
            client.heartbeat(worker_id, step, heartbeat_every)
        # the previous step's loss, now that this one is queued (on a GPU it is there by now);
        # a divergence seen there restarts from the center, overwriting this step's parameters
        bad = count(losses.push(step, loss))
        step += 1
        if bad is not None:
            if not reset(*bad):
                reason = P.GAVE_UP
                break
            restarted = step
    if overlap is not None:
        overlap.finish()
    if reason != P.GAVE_UP and restarted != step:
        bad = why_not_exchange(step)
        if bad is None:
            exchange(step, last=True)  # the last exchange: what the worker learnt since the previous one counts
        elif not reset(*bad):
            reason = P.GAVE_UP
    if saver is not None:
        if reason in (P.SIGNALLED, P.STOPPED):
            save_state(step, wait=True)
        saver.wait()
    client.done(worker_id, step, reason)
    ignore_leave_signals()
    if overlap is not None:
        spent = time.perf_counter() - t0
        log(f"worker {worker_id}: waited {overlap.waited:.1f} s of {spent:.1f} s for overlapped exchanges to complete; "
            f"their thread used {overlap.cpu:.1f} s of CPU, the whole process {time.process_time() - cpu0:.1f} s")
    if flags:
        log(f"worker {worker_id}: left on signal {signal.Signals(flags.received).name} at step {step}")
    return WorkerSummary(worker_id=worker_id, steps=step - first_step, samples=(step - first_step) * trainer.batch,
                         exchanges=k, seconds=time.perf_counter() - t0, reason=P.REASONS[reason])
