"""The back-off between tests of a pending wait (hpcopt.comm.wait), on a simulated clock: how long
it sleeps, how often it tests, and how late it can notice that the wait is over."""

import pytest

from hpcopt.comm import wait


class Clock:
    """time.monotonic / time.sleep / os.sched_yield as seen by wait.py, without waiting."""

    def __init__(self, monkeypatch):
        self.t, self.sleeps, self.yields = 0.0, [], 0
        monkeypatch.setattr(wait.time, "monotonic", lambda: self.t)
        monkeypatch.setattr(wait.time, "sleep", self.sleep)
        monkeypatch.setattr(wait.os, "sched_yield", self.yield_)

    def sleep(self, s):
        self.sleeps.append((self.t, s))
        self.t += s

    def yield_(self):
        self.yields += 1
        self.t += 1e-6


def wait_until(backoff, clock, done_at):
    """Test, back off, test... until the clock passes done_at; returns (sleeps, noticed at).
    (Each sleep is a wake-up; the first millisecond only yields the core.)"""
    while clock.t < done_at:
        backoff.idle()
    return len(clock.sleeps), clock.t


def test_a_fixed_cap_never_sleeps_longer_than_it(monkeypatch):
    clock = Clock(monkeypatch)
    b = wait.Backoff(cap=wait.BUSY_CAP)
    wakes, seen = wait_until(b, clock, 0.1)
    assert max(s for _, s in clock.sleeps) == pytest.approx(wait.BUSY_CAP)
    assert seen - 0.1 <= wait.BUSY_CAP
    assert wakes > 0.09 / wait.BUSY_CAP  # a 100 ms wait at 200 us: hundreds of wake-ups


@pytest.mark.parametrize("length", [0.005, 0.09, 1.0, 30.0])
def test_a_relative_cap_tests_rarely_and_notices_at_most_its_share_late(monkeypatch, length):
    clock = Clock(monkeypatch)
    b = wait.Backoff(cap=wait.BUSY_CAP, relative=wait.WAIT_SHARE)
    wakes, seen = wait_until(b, clock, length)
    for at, s in clock.sleeps:  # no sleep is longer than the share of the wait so far (or the cap)
        assert s <= max(wait.BUSY_CAP, wait.WAIT_SHARE * at, 2 * wait.Backoff().low) + 1e-12
        assert s <= wait.MAX_SLEEP
    late = seen - length
    assert late <= max(wait.BUSY_CAP, wait.WAIT_SHARE * length, 2e-5) + 1e-9
    assert late <= wait.MAX_SLEEP + 1e-9
    fixed = Clock(monkeypatch)
    fixed_wakes, _ = wait_until(wait.Backoff(cap=wait.BUSY_CAP), fixed, length)
    if length >= 0.09:  # a worker queued behind many others: an order of magnitude fewer wake-ups
        assert wakes * 10 < fixed_wakes
    else:  # a short wait is tested as often as before
        assert wakes >= fixed_wakes / 2


def test_progress_starts_the_share_again(monkeypatch):
    """After progress (reset) a long earlier wait no longer lengthens the sleeps."""
    clock = Clock(monkeypatch)
    b = wait.Backoff(cap=wait.BUSY_CAP, relative=wait.WAIT_SHARE)
    wait_until(b, clock, 2.0)
    assert max(s for _, s in clock.sleeps) > 0.1 * wait.WAIT_SHARE  # it had grown
    b.reset()
    clock.sleeps.clear()
    start = clock.t
    wait_until(b, clock, start + 0.0015)  # (1 ms of yields, then sleeps)
    assert max(s for _, s in clock.sleeps) <= wait.BUSY_CAP + 1e-12
