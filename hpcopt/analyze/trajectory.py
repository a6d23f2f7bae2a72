"""Trajectory measures from the file alone (no model evaluation): distance travelled and net
displacement of the center and of each worker, each worker's distance to the center over time
(the consensus spread), membership over time and per-layer breakdowns. Pure NumPy.
"""

from __future__ import annotations

import numpy as np


def path_length(points: np.ndarray) -> np.ndarray:
    """Cumulative distance travelled along a sequence of points [n, P]: [n], starting at 0."""
    if len(points) < 2:
        return np.zeros(len(points))
    steps = np.linalg.norm(np.diff(points.astype(np.float64), axis=0), axis=1)
    return np.concatenate([[0.0], np.cumsum(steps)])


def displacement(points: np.ndarray) -> float:
    """Distance from the first point to the last."""
    return float(np.linalg.norm(points[-1].astype(np.float64) - points[0])) if len(points) else 0.0


def nearest_rows(times: np.ndarray, at: np.ndarray) -> np.ndarray:
    """For each time in `at`, the index of the nearest entry of the sorted `times`."""
    i = np.clip(np.searchsorted(times, at), 1, max(1, len(times) - 1))
    if len(times) == 1:
        return np.zeros(len(at), dtype=int)
    left = times[i - 1]
    right = times[np.minimum(i, len(times) - 1)]
    return np.where(np.abs(at - left) <= np.abs(right - at), i - 1, i)


def distance_to_center(run) -> dict:
    """Each worker snapshot's distance to the center snapshot nearest in time (center snapshots
    are taken every record.center_every exchanges, so the center may be that many exchanges
    off). Returns {worker_id: (times, distances)}."""
    out = {}
    if len(run.workers_meta) == 0:
        return out
    c_times = run.center_meta["time"]
    rows = nearest_rows(c_times, run.workers_meta["time"])
    d = np.linalg.norm(run.workers.astype(np.float64) - run.center[rows], axis=1)
    for w in sorted({int(w) for w in run.workers_meta["worker_id"]}):
        m = run.workers_meta["worker_id"] == w
        out[w] = (run.workers_meta["time"][m], d[m])
    return out


def consensus_spread(dist: dict) -> tuple[np.ndarray, np.ndarray]:
    """Mean distance of the workers to the center over time: at each worker snapshot time, the
    mean over workers of their latest distance so far (workers not yet seen left out)."""
    events = sorted((t, w, d) for w, (ts, ds) in dist.items() for t, d in zip(ts, ds))
    latest, times, spread = {}, [], []
    for t, w, d in events:
        latest[w] = d
        times.append(t)
        spread.append(np.mean(list(latest.values())))
    return np.array(times), np.array(spread)


def membership(run) -> tuple[np.ndarray, np.ndarray]:
    """Active workers over time, as a step function (times, counts) from join/leave events."""
    times, counts, n = [0.0], [0], 0
    for e in run.events:
        kind = e["kind"].decode() if isinstance(e["kind"], bytes) else str(e["kind"])
        if kind in ("join", "leave"):
            n += 1 if kind == "join" else -1
            times.append(float(e["time"]))
            counts.append(n)
    return np.array(times), np.array(counts)


def per_layer(points: np.ndarray, layout: dict) -> list[dict]:
    """For each parameter tensor along a path [n, P]: its norm at the start and the end, the net
    displacement and the distance travelled."""
    out = []
    pts = points.astype(np.float64)
    for name, shape, off in zip(layout["names"], layout["shapes"], layout["offsets"]):
        n = int(np.prod(shape))
        seg = pts[:, off:off + n]
        out.append({"name": name, "size": n,
                    "norm_start": float(np.linalg.norm(seg[0])), "norm_end": float(np.linalg.norm(seg[-1])),
                    "displacement": float(np.linalg.norm(seg[-1] - seg[0])),
                    "path_length": float(path_length(seg)[-1])})
    return out


def measures(run) -> dict:
    """Every trajectory measure of a run, as plain arrays and numbers."""
    c = run.center
    dist = distance_to_center(run)
    t_spread, spread = consensus_spread(dist)
    workers = {}
    for w in sorted(dist):
        rows = np.flatnonzero(run.workers_meta["worker_id"] == w)
        pts = run.workers[rows]
        workers[w] = {"path_length": float(path_length(pts)[-1]), "displacement": displacement(pts),
                      "snapshots": len(rows), "final_distance_to_center": float(dist[w][1][-1])}
    return {
        "center_time": run.center_meta["time"], "center_exchanges": run.center_meta["exchanges"],
        "center_path_length": path_length(c), "center_displacement": displacement(c),
        "center_distance_from_init": np.linalg.norm(c.astype(np.float64) - c[0], axis=1),
        "workers": workers, "distance_to_center": dist,
        "spread_time": t_spread, "spread": spread,
        "membership": membership(run), "per_layer": per_layer(c, run.layout),
    }


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter windows at the start)."""
    if window <= 1 or len(values) == 0:
        return np.asarray(values, dtype=np.float64)
    c = np.cumsum(np.concatenate([[0.0], np.asarray(values, dtype=np.float64)]))
    n = np.arange(1, len(values) + 1)
    lo = np.maximum(0, n - window)
    return (c[n] - c[lo]) / (n - lo)


def curves(run) -> dict:
    """Loss and accuracy over time: each worker's training loss as reported at its exchanges
    (moving average over ~2% of them) and the center's test evaluations."""
    ex, ev = run.exchanges, run.evals
    train = {}
    for w in sorted({int(w) for w in ex["worker_id"]}) if len(ex) else []:
        mine = ex[ex["worker_id"] == w]
        train[w] = (mine["time"], smooth(mine["train_loss"], max(1, len(mine) // 50)))
    return {"train_loss": train, "eval_time": ev["time"], "eval_exchanges": ev["exchanges"],
            "test_loss": ev["test_loss"], "test_accuracy": ev["test_accuracy"]}
