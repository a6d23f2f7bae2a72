"""`hpcopt status RUN`: the live state of a run, from OUT/status.json (rewritten atomically by
server 0 at every flush)."""

from __future__ import annotations

import datetime
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
    status["age_seconds"] = round(time.time() - float(status.get("updated", 0)), 1)
    if status.get("state") == "running" and status["age_seconds"] > STALE_SECONDS:
        status["state"] = "unresponsive"
    return status


def format_status(s: dict) -> str:
    acc = s.get("center_test_accuracy")
    updated = datetime.datetime.fromtimestamp(s.get("updated", 0)).strftime("%Y-%m-%d %H:%M:%S")
    lines = [
        f"state        {s.get('state')}   (updated {updated}, {s['age_seconds']:.0f} s ago"
        + ("; the servers stopped updating it: crashed or hung?)" if s.get("state") == "unresponsive" else ")"),
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
