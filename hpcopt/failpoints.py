"""Failpoints: named places where a test kills this process, to prove that a crash there loses
nothing (as FoundationDB's simulation and TiKV's fail-rs do). Off unless HPCOPT_FAILPOINTS names
them, so a run pays one dictionary lookup per point passed.

    HPCOPT_FAILPOINTS="trajectory.flush.params@3"   # SIGKILL at the third pass of that point
    HPCOPT_FAILPOINTS="a@1,b@2"                     # several points
    HPCOPT_FAILPOINTS="trajectory.flush.params@3:stop"  # SIGSTOP instead: a hung, not a dead, process

The kill is SIGKILL, as from the kernel's OOM killer, `kill -9` or Slurm after KillWait: no
handler, no `finally`, no flush. A point given an `error` raises it instead (a failure the code
must survive, e.g. a MemoryError on a path that only serves a view).
"""

from __future__ import annotations

import os
import signal
import sys


def _parse(spec: str) -> dict[str, tuple[int, int]]:
    points = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, _, rest = item.partition("@")
        nth, _, action = rest.partition(":")
        if not (nth or "1").isdigit() or action not in ("", "stop"):  # a typo must not break every command
            print(f"hpcopt: ignoring HPCOPT_FAILPOINTS entry {item!r} (expected name@n or name@n:stop)",
                  file=sys.stderr)
            continue
        points[name] = (int(nth or 1), signal.SIGSTOP if action == "stop" else signal.SIGKILL)
    return points


_ARMED = _parse(os.environ.get("HPCOPT_FAILPOINTS", ""))
_PASSED: dict[str, int] = {}


def failpoint(name: str, error: BaseException | None = None) -> None:
    """Die here (SIGKILL; or stop, SIGSTOP), or raise `error` when given, if HPCOPT_FAILPOINTS
    arms `name` and this is its armed pass."""
    if name not in _ARMED:
        return
    _PASSED[name] = _PASSED.get(name, 0) + 1
    nth, how = _ARMED[name]
    if _PASSED[name] == nth:
        if error is not None:
            raise error
        os.kill(os.getpid(), how)
