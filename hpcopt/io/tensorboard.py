"""Live metrics as TensorBoard event files (record.tensorboard, `hpcopt analyze --tensorboard`).

    mpirun -n 5 hpcopt train --config configs/mnist1d_easgd.toml --out runs/demo --tensorboard
    tensorboard --logdir runs/demo/tensorboard

The writer is torch's SummaryWriter, which needs the optional `tensorboard` package
(`pip install 'hpcopt[tensorboard]'`). It runs in a thread of its own: the training only puts
numbers on a queue, so a slow or hung file system never holds an exchange up, and a failure to
write costs one log line and the rest of the run's events, never the run.
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import tempfile
import threading
import time
from pathlib import Path

INSTALL = "pip install 'hpcopt[tensorboard]'"
TRAIN_SUFFIX = ".hpcopt-train"  # file name suffixes: what a new training or analysis replaces
ANALYZE_SUFFIX = ".hpcopt-analyze"


class TensorBoardMissing(ValueError):
    """TensorBoard events were asked for, but the tensorboard package cannot be imported."""


def require() -> None:
    """Fail early (before anything is trained or computed) when the writer cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise TensorBoardMissing(f"TensorBoard event files need the tensorboard package, which cannot be "
                                 f"imported ({e}); install it with: {INSTALL}") from None


def run_name(out) -> str:
    """A run's subdirectory in a shared record.tensorboard_dir: the run directory's name and a
    hash of its full path (two runs named alike in different places stay apart), e.g. demo-1f0c2a9b."""
    path = Path(out).resolve()
    return f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def log_dir(cfg) -> Path:
    """Where a training's event files go: OUT/tensorboard, or with record.tensorboard_dir = DIR
    the run's own subdirectory DIR/<run_name(OUT)>. Either holds this run's events alone, so a new
    training (`--force`) deletes the previous one's there and a resume's purge hides only its own:
    runs that share DIR never touch each other's files, and TensorBoard (--logdir DIR) shows
    them side by side."""
    if cfg.record.tensorboard_dir:
        return Path(cfg.record.tensorboard_dir) / run_name(cfg.run.out)
    return Path(cfg.run.out) / "tensorboard"


def for_run(cfg, *, resumed: int = 0, log=print) -> EventLog | None:
    """Server 0's (rank 0's of a synchronous run) event log with record.tensorboard, else None."""
    if not cfg.record.tensorboard:
        return None
    try:
        where = log_dir(cfg)
        view = cfg.record.tensorboard_dir or where  # a shared directory: every run in it side by side
        events = EventLog(where, purge_step=resumed or None, log=log)
    except Exception as e:  # noqa: BLE001 — a view: it never ends the run
        log(f"hpcopt: no TensorBoard events ({type(e).__name__}: {e}); the run goes on")
        return None
    log(f"tensorboard: live metrics in {where} (see them with: tensorboard --logdir {view})")
    return events


def check_dir(path) -> None:
    """Before any work (`hpcopt analyze --tensorboard DIR`): DIR must exist or be creatable, and
    take a new file; else a ValueError saying why."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot write TensorBoard event files to {path}: it is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".hpcopt-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = f" ({e.filename})" if e.filename and not Path(e.filename).is_relative_to(path) else ""
        raise ValueError(f"cannot write TensorBoard event files to {path}: {e.strerror or e}{where}") from None


def clear(log_dir: str | Path, suffix: str) -> None:
    """Delete the event files an earlier training (or analysis) of this kind left in log_dir, so
    TensorBoard does not draw two runs over the same steps; other files stay."""
    for f in Path(log_dir).glob(f"events.out.tfevents.*{suffix}"):
        try:
            f.unlink()
        except OSError:
            pass


class EventLog:
    """Scalars (and text) to event files in `log_dir`, written by a background thread.
    `purge_step`: a resumed run hides the events its previous launch wrote from that step on
    (they were after the checkpoint it continues from). `goes_on`: what the one log line of a
    failure says carries on (the run, the analysis).

    Each tag gets each step once: a tag's latest value is written when a later step of it comes
    (or at close), and a value at the same step replaces it (a flush that found no new exchange,
    the final flush, the final evaluation of an unchanged center), so TensorBoard never draws two
    points over one step. A value at an earlier step than the tag's latest is left out."""

    def __init__(self, log_dir: str | Path, *, suffix: str = TRAIN_SUFFIX, purge_step: int | None = None, log=print,
                 goes_on: str = "the run goes on"):
        self.log_dir, self.log, self.goes_on = str(log_dir), log, goes_on
        self.failed = False
        self._error: str | None = None  # said by the caller's thread (prints from two threads interleave)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(suffix, purge_step), name="hpcopt-tensorboard",
                                        daemon=True)  # a hung write must not keep the process alive
        self._thread.start()

    def scalars(self, step: int, values: dict[str, float], walltime: float | None = None) -> None:
        """Queue one value per tag at `step` (non-finite values are left out); never blocks."""
        if not self._failed():
            self._queue.put(("scalars", int(step), dict(values), time.time() if walltime is None else walltime))

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if not self._failed():
            self._queue.put(("text", int(step), {tag: text}, time.time()))

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued and close the file; waits at most `timeout` seconds for a file
        system that does not answer (the thread is a daemon: it cannot keep the process)."""
        self._queue.put(None)
        self._thread.join(timeout)
        self._failed()

    def _failed(self) -> bool:
        """Whether the writer gave up; the first call after it did logs why (once)."""
        if self.failed and self._error is not None:
            self.log(self._error)
            self._error = None
        return self.failed

    def _run(self, suffix: str, purge_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(self.log_dir, purge_step=purge_step, filename_suffix=suffix, flush_secs=5)
            latest: dict[str, tuple[int, float, float]] = {}  # tag -> (step, value, walltime) not yet written
            while (item := self._queue.get()) is not None:
                kind, step, values, walltime = item
                for tag, v in values.items():
                    if kind == "text":
                        writer.add_text(tag, v, step, walltime=walltime)
                    elif v is not None and math.isfinite(v):
                        held = latest.get(tag)
                        if held is not None and step < held[0]:
                            continue  # behind the tag's latest step: it would draw back over it
                        if held is not None and step > held[0]:
                            writer.add_scalar(tag, held[1], held[0], walltime=held[2])
                        latest[tag] = (step, float(v), walltime)  # (the same step: this value replaces it)
                if self._queue.empty():  # a live view: on disk at each flush of the run, not in 2 minutes
                    writer.flush()
            for tag, (step, v, walltime) in latest.items():
                writer.add_scalar(tag, v, step, walltime=walltime)
            writer.close()
        except Exception as e:  # noqa: BLE001 — any failure only ends the events, never the run
            self._error = (f"hpcopt: TensorBoard events are no longer written to {self.log_dir} "
                           f"({type(e).__name__}: {e}); {self.goes_on}")
            self.failed = True
