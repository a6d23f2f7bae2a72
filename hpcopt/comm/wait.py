"""Waiting on other ranks: politely (no spinning core) and never without a deadline.

Open MPI 4.1's blocking calls spin a whole core; with more ranks than cores that steals compute
from the workers. And a blocking receive from a dead peer hangs forever. So every wait here
tests its requests, sleeps with a growing back-off (50 us to 1 ms) between tests, and gives up
at a deadline with an error that names the peer.
"""

from __future__ import annotations

import time

from mpi4py import MPI


class PeerTimeout(RuntimeError):
    """Another rank did not answer within the deadline."""


class Backoff:
    """Sleep a little longer each idle round, reset on progress."""

    def __init__(self, low: float = 5e-5, high: float = 1e-3):
        self.low, self.high, self.delay = low, high, low

    def idle(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, self.high)

    def reset(self) -> None:
        self.delay = self.low


def wait_all(requests: list, timeout: float, what: str) -> None:
    """Wait until all requests complete, or raise PeerTimeout after `timeout` seconds
    (cancelling what is still pending, so the buffers may be reused or dropped)."""
    if MPI.Request.Testall(requests):
        return
    deadline = time.monotonic() + timeout
    backoff = Backoff()
    while not MPI.Request.Testall(requests):
        if time.monotonic() > deadline:
            for r in requests:
                if r != MPI.REQUEST_NULL:
                    try:
                        r.Cancel()
                    except MPI.Exception:
                        pass
            raise PeerTimeout(f"no answer within {timeout:g} s while waiting for {what}")
        backoff.idle()
