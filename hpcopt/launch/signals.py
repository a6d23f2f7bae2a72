"""Leave signals: SIGTERM, SIGINT, SIGUSR1, SIGUSR2 (`kill`, Ctrl-C, Slurm preemption,
`--signal`) end a rank's work gracefully instead of killing it."""

from __future__ import annotations

import os
import signal

LEAVE_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


_early: list[int] = []  # the first leave signal caught by catch_early()


def catch_early(signals=LEAVE_SIGNALS) -> None:
    """From a process's first line on, remember a leave signal instead of dying of it: SIGUSR1's
    and SIGTERM's default action is to kill, so a preemption while a rank still imports torch or
    starts MPI (seconds) read as a failed start. The SignalFlag made later takes it over, and
    the rank leaves gracefully at its first check."""
    def handler(signum, frame):
        if not _early:
            _early.append(signum)

    for s in signals:
        signal.signal(s, handler)


def early_signal() -> int | None:
    return _early[0] if _early else None


def release_early() -> None:
    """For a process with no graceful stop (the synchronous baselines): the leave signals get
    their default action back, and one caught while it started is delivered again, as if
    catch_early() had never run."""
    for s in LEAVE_SIGNALS:
        signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
    if _early:
        os.kill(os.getpid(), _early[0])


class SignalFlag:
    """Remembers the first leave signal (one catch_early() caught before counts); the training
    loop checks it between steps."""

    def __init__(self, signals=LEAVE_SIGNALS):
        self.received: int | None = early_signal()
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
