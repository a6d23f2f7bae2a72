"""Live metrics as TensorBoard event files (record.tensorboard, `hpcopt analyze --tensorboard`).

    mpirun -n 5 hpcopt train --config configs/mnist1d_easgd.toml --out runs/demo --tensorboard
    tensorboard --logdir runs/demo/tensorboard

The writer is torch's SummaryWriter, which needs the optional `tensorboard` package
(`pip install 'hpcopt[tensorboard]'`). It runs in a thread of its own: the training only puts
numbers on a queue, so a slow or hung file system never holds an exchange up, and a failure to
write costs one log line and the rest of the run's events, never the run.
"""

from __future__ import annotations

import math
import queue
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


def log_dir(cfg) -> Path:
    """Where a training's event files go: record.tensorboard_dir, else OUT/tensorboard."""
    return Path(cfg.record.tensorboard_dir) if cfg.record.tensorboard_dir else Path(cfg.run.out) / "tensorboard"


def for_run(cfg, *, resumed: int = 0, log=print) -> EventLog | None:
    """Server 0's (rank 0's of a synchronous run) event log with record.tensorboard, else None."""
    if not cfg.record.tensorboard:
        return None
    where = log_dir(cfg)
    log(f"tensorboard: live metrics in {where} (see them with: tensorboard --logdir {where})")
    return EventLog(where, purge_step=resumed or None, log=log)


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
    (they were after the checkpoint it continues from)."""

    def __init__(self, log_dir: str | Path, *, suffix: str = TRAIN_SUFFIX, purge_step: int | None = None, log=print):
        self.log_dir, self.log = str(log_dir), log
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
            while (item := self._queue.get()) is not None:
                kind, step, values, walltime = item
                for tag, v in values.items():
                    if kind == "text":
                        writer.add_text(tag, v, step, walltime=walltime)
                    elif v is not None and math.isfinite(v):
                        writer.add_scalar(tag, float(v), step, walltime=walltime)
                if self._queue.empty():  # a live view: on disk at each flush of the run, not in 2 minutes
                    writer.flush()
            writer.close()
        except Exception as e:  # noqa: BLE001 — any failure only ends the events, never the run
            self._error = (f"hpcopt: TensorBoard events are no longer written to {self.log_dir} "
                           f"({type(e).__name__}: {e}); the run goes on")
            self.failed = True
