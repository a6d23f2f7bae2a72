"""Loss-landscape slices: directions, grid coordinates and interpolation barriers. Pure math on
flat vectors; evaluating the points (and spreading them over ranks) is `grid.py`'s job.

Filter normalisation (Li et al. 2018, section 4): a random Gaussian direction d is rescaled
filter by filter so that each filter of d has the norm of the same filter of the model:
d_f <- d_f / ||d_f|| * ||theta_f||. A "filter" is one slice along the first axis of a weight
with two or more dimensions (an output channel of a convolution, an output unit's row of a
linear layer). Parameters with one dimension -- biases and the scales/shifts of norm layers --
get a zero direction, as in Li et al.'s `ignore='biasbn'` (their plots' default); with
`one_d="filter"` they are instead normalised as one filter each.
"""

from __future__ import annotations

import numpy as np
import torch


def filter_normalized(theta: np.ndarray, layout: dict, seed: int, one_d: str = "zero") -> np.ndarray:
    """A random direction with the filter norms of theta (see the module docstring)."""
    if one_d not in ("zero", "filter"):
        raise ValueError(f"one_d must be 'zero' or 'filter', got {one_d!r}")
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(len(theta), generator=gen, dtype=torch.float64).numpy()
    th = np.asarray(theta, dtype=np.float64)
    for shape, off in zip(layout["shapes"], layout["offsets"]):
        n = int(np.prod(shape))
        if len(shape) <= 1:
            if one_d == "zero":
                d[off:off + n] = 0.0
                continue
            rows = 1
        else:
            rows = shape[0]
        dv = d[off:off + n].reshape(rows, -1)
        tv = th[off:off + n].reshape(rows, -1)
        dn = np.linalg.norm(dv, axis=1, keepdims=True)
        dv *= np.linalg.norm(tv, axis=1, keepdims=True) / np.where(dn > 0, dn, 1.0)
        d[off:off + n] = dv.reshape(-1)
    return d


def plane_through(a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Directions through saved models: origin a, d1 = b - a (and d2 = c - a), so a, b, c sit
    at (0, 0), (1, 0), (0, 1) of the slice."""
    a = np.asarray(a, dtype=np.float64)
    dirs = [np.asarray(b, dtype=np.float64) - a]
    if c is not None:
        dirs.append(np.asarray(c, dtype=np.float64) - a)
    return a, np.stack(dirs)


def axis(lo: float, hi: float, n: int) -> np.ndarray:
    if n < 1:
        raise ValueError(f"a grid axis needs at least 1 point, got {n}")
    return np.linspace(lo, hi, n) if n > 1 else np.array([lo], dtype=np.float64)


def grid_point(origin: np.ndarray, directions: np.ndarray, xs: np.ndarray, ys: np.ndarray | None,
               index: int) -> np.ndarray:
    """The parameters at flat grid index `index` (row-major over [len(ys), len(xs)]: index =
    iy * len(xs) + ix), origin + x d1 (+ y d2), as float32."""
    nx = len(xs)
    ix, iy = index % nx, index // nx
    p = np.asarray(origin, dtype=np.float64) + xs[ix] * directions[0]
    if ys is not None:
        p = p + ys[iy] * directions[1]
    return p.astype(np.float32)


def barrier(ts: np.ndarray, losses: np.ndarray) -> dict:
    """Barrier height along a linear interpolation theta(t) = (1 - t) a + t b (Frankle et al.
    2020): max_t [L(t) - ((1 - t) L(a) + t L(b))], with L(a), L(b) the losses at t = 0 and 1
    (the end points must be in ts); also the plain max_t L(t) - max(L(a), L(b))."""
    ts, losses = np.asarray(ts, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    i0, i1 = int(np.argmin(np.abs(ts))), int(np.argmin(np.abs(ts - 1)))
    if abs(ts[i0]) > 1e-9 or abs(ts[i1] - 1) > 1e-9:
        raise ValueError("an interpolation needs t = 0 and t = 1 among its points")
    inside = (ts >= 0) & (ts <= 1)
    line = (1 - ts) * losses[i0] + ts * losses[i1]
    gap = losses - line
    j = int(np.flatnonzero(inside)[np.argmax(gap[inside])])
    return {"barrier": float(gap[j]), "t_max": float(ts[j]),
            "barrier_over_endpoints": float(losses[inside].max() - max(losses[i0], losses[i1]))}
