"""Waiting on other ranks: politely (no spinning core) and never without a deadline. Training and
analysis alike wait here.

Open MPI 4.1's blocking calls spin a whole core; with more ranks than cores that steals compute
from the workers. And a blocking receive from a dead peer hangs forever. So every wait here
tests its requests, sleeps with a growing back-off between tests, and gives up at a deadline
with an error that names the peer. While a transfer is in flight the back-off stays short
(BUSY_CAP), so a reply is noticed soon after it lands; an idle server sleeps longer (IDLE_CAP).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time

BUSY_CAP = 2e-4
IDLE_CAP = 1e-3
MAX_SLEEP = 0.05  # the longest sleep of a relative back-off (a wait's deadline is checked between)
WAIT_SHARE = 0.125  # a worker waiting on its servers notices the answer at most this share of its wait late


def tighten_timer_slack() -> None:
    """Let short sleeps be short: Linux rounds sleeps up by the timer slack (50 us by default),
    which would dominate a 20 us back-off. Best effort; a no-op elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK = 29, in nanoseconds
    except (OSError, AttributeError, TypeError):
        pass


tighten_timer_slack()


class PeerTimeout(RuntimeError):
    """Another rank did not answer within the deadline."""


class Backoff:
    """Between two tests: for the first `spin` seconds after progress only yield the core (a
    message that lands soon is seen at once, and a runnable process on the same core still gets
    the core), then sleep a little longer each round (doubling from `low` up to a cap).

    `relative` (a fraction) lets the cap grow with the wait: a rank that has waited t seconds
    since its last progress sleeps up to max(cap, relative * t), never more than MAX_SLEEP. A
    worker queued behind 63 others for 90 ms then tests about 30 times instead of 450, and
    the 64 wake-ups every 200 us no longer take the cores the server needs to answer them; it
    notices its answer at most `relative` of its wait late."""

    def __init__(self, low: float = 2e-5, cap: float = IDLE_CAP, spin: float = 1e-3, relative: float = 0.0):
        self.low, self.cap, self.spin, self.relative = low, cap, spin, relative
        self.reset()

    def idle(self, cap: float | None = None) -> None:
        now = time.monotonic()
        if self.spin_until is None:
            self.since, self.spin_until = now, now + self.spin
        if now < self.spin_until:
            os.sched_yield()
            return
        time.sleep(self.delay)
        cap = self.cap if cap is None else cap
        if self.relative:
            cap = max(cap, min(self.relative * (now - self.since), MAX_SLEEP))
        self.delay = min(self.delay * 2, cap)

    def reset(self) -> None:
        self.delay, self.spin_until, self.since = self.low, None, 0.0


def cancel(requests) -> bool:
    """Cancel requests that will never complete (a peer is gone); never waits or raises.
    Returns False (so it can sit in a filter)."""
    from mpi4py import MPI

    for req in requests:
        try:
            if req is not None and req != MPI.REQUEST_NULL:
                req.Cancel()
        except MPI.Exception:
            pass
    return False


def wait_all(requests: list, timeout: float, what: str, cap: float = BUSY_CAP, relative: float = 0.0,
             check=None) -> None:
    """Wait until all requests complete, or raise PeerTimeout after `timeout` seconds
    (cancelling what is still pending, so the buffers may be reused or dropped)."""
    from mpi4py import MPI

    if MPI.Request.Testall(requests):
        return
    deadline = time.monotonic() + timeout
    backoff = Backoff(cap=cap, relative=relative)
    while not MPI.Request.Testall(requests):
        if time.monotonic() > deadline:
            cancel(requests)
            raise PeerTimeout(f"no answer within {timeout:g} s while waiting for {what}")
        if check is not None:  # (may raise: the peer is known dead)
            check()
        backoff.idle()


def wait_for(test, timeout: float, what: str, cap: float = BUSY_CAP) -> None:
    """Wait until test() is true (e.g. a message can be probed), or raise PeerTimeout."""
    deadline = time.monotonic() + timeout
    backoff = Backoff(cap=cap)
    while not test():
        if time.monotonic() > deadline:
            raise PeerTimeout(f"no answer within {timeout:g} s while waiting for {what}")
        backoff.idle()
