"""`hpcopt status RUN`: the live state of a run, from OUT/status.json (rewritten atomically by
server 0 at every flush)."""

from __future__ import annotations

import datetime
import math
import time
from pathlib import Path

from hpcopt.io.rundir import RunDir, read_json

STALE_SECONDS = 30.0


def read_status(run_dir) -> dict:
    run = RunDir(run_dir)
    if not Path(run_dir).is_dir():
        raise ValueError(f"{run_dir}: no such run directory")
    if not run.status.exists():
        raise ValueError(f"{run.status} does not exist: the run has not written its status yet, or was "
                         f"started by a version or method without one (synchronous methods have none)")
    try:
        status = read_json(run.status)
    except ValueError as e:
        raise ValueError(f"{run.status} is not valid JSON: {e}") from None
    except OSError as e:
        raise ValueError(f"cannot read {run.status}: {e.strerror or e}") from None
    problem = _malformed(status)
    if problem:
        raise ValueError(f"malformed status.json ({run.status}): {problem}")
    status["age_seconds"] = round(time.time() - float(status.get("updated", 0)), 1)
    if status.get("state") in ("running", "stopping") and _writer_gone(status):
        status["state"] = "killed"  # server 0 died before it could say how the run ended
    elif status.get("state") == "running" and status["age_seconds"] > STALE_SECONDS:
        status["state"] = "unresponsive"
    return status


def _writer_gone(status: dict) -> bool:
    """Whether server 0, which writes status.json, is known dead: it is on this host and its pid
    is gone (elsewhere only the age of the file can tell, after STALE_SECONDS)."""
    import os
    import socket

    pid = status.get("pid")
    if status.get("host") != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
        return False
    except ProcessLookupError:
        return True
    except OSError:
        return False


_NUMBERS = ("updated", "elapsed_seconds", "exchanges_per_second")
_WORKER_NUMBERS = ("joined_at", "silent_seconds")
_WORKER_KEYS = ("id", "host", "rank", "step", "exchanges")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _malformed(s) -> str | None:
    """What makes a (hand-edited, damaged) status.json unusable, or None: its shape is what
    server 0 writes (a JSON object; times and rates finite numbers; workers a list of objects)."""
    if not isinstance(s, dict):
        return f"expected a JSON object, got {type(s).__name__}"
    for key in _NUMBERS:
        if key in s and not _number(s[key]):
            return f"{key!r} must be a finite number, got {s[key]!r}"[:200]
    if not 0 <= s.get("updated", 0) < 253402300800:  # a time datetime can show (before the year 10000)
        return f"'updated' is not a time, got {s['updated']!r}"
    acc = s.get("center_test_accuracy")  # NaN when the model measures no accuracy (a loss only)
    if acc is not None and not (isinstance(acc, (int, float)) and not isinstance(acc, bool)):
        return f"'center_test_accuracy' must be a number, got {acc!r}"[:200]
    for key in ("state", "method"):
        if key in s and s[key] is not None and not isinstance(s[key], str):
            return f"{key!r} must be a string, got {s[key]!r}"[:200]
    if not isinstance(s.get("servers", []), list) or not all(isinstance(h, str) for h in s.get("servers", [])):
        return f"'servers' must be a list of host names, got {s.get('servers')!r}"[:200]
    workers = s.get("workers", [])
    if not isinstance(workers, list):
        return f"'workers' must be a list, got {workers!r}"[:200]
    for w in workers:
        if not isinstance(w, dict) or any(k not in w for k in _WORKER_KEYS + _WORKER_NUMBERS):
            return f"each worker must be an object with {', '.join(_WORKER_KEYS + _WORKER_NUMBERS)}, got {w!r}"[:200]
        if not all(_number(w[k]) for k in _WORKER_NUMBERS) or not all(
                isinstance(w[k], (int, float, str)) for k in _WORKER_KEYS):
            return f"a worker's fields have the wrong types: {w!r}"[:200]
    return None


def format_status(s: dict) -> str:
    acc = s.get("center_test_accuracy")
    updated = datetime.datetime.fromtimestamp(s.get("updated", 0)).strftime("%Y-%m-%d %H:%M:%S")
    lines = [
        f"state        {s.get('state')}   (updated {updated}, {s['age_seconds']:.0f} s ago"
        + ("; the servers stopped updating it: crashed or hung?)" if s.get("state") == "unresponsive" else
           f"; its server 0, pid {s.get('pid')}, is gone: `hpcopt train -n N --resume RUN` goes on)"
           if s.get("state") == "killed" else ")"),
        f"method       {s.get('method')}   servers on {', '.join(s.get('servers', []))}   "
        f"joins {'open' if s.get('joins_enabled') else 'disabled'}",
        f"elapsed      {s.get('elapsed_seconds', 0):.1f} s   exchanges {s.get('exchanges')} "
        f"({s.get('exchanges_per_second', 0):.1f}/s)",
        f"center       test accuracy {'-' if acc is None else f'{100 * acc:.2f}%'}"
        + (f" at exchange {s['evaluated_at_exchange']}" if s.get("evaluated_at_exchange") is not None else ""),
        f"workers      {len(s.get('workers', []))}",
    ]
    if s.get("workers"):
        lines.append(f"  {'id':>5} {'host':<20} {'rank':>5} {'step':>8} {'exchanges':>10} {'joined at':>10} {'silent':>7}")
        for w in s["workers"]:
            lines.append(f"  {w['id']:>5} {w['host']:<20} {w['rank']:>5} {w['step']:>8} {w['exchanges']:>10} "
                         f"{w['joined_at']:>9.1f}s {w['silent_seconds']:>6.1f}s")
    return "\n".join(lines)
