"""Elastic averaging (Zhang, Choromanska & LeCun 2015, Algorithm 1 and 2).

At an exchange between worker i (parameters x_i) and the center x~, with moving rate alpha:

    d    = alpha * (x_i - x~)          the elastic difference
    x_i <- x_i - d                     the worker is pulled toward the center
    x~  <- x~ + d                      the center is pulled toward the worker

The two forces are equal and opposite, so x_i + x~ is conserved by an exchange. The server owns
x~ (a shard of it), computes r = x_i - x~ and moves the center by alpha r; the worker moves by
-alpha r when r comes back (sending r rather than d saves the server a pass over memory).
"""

from __future__ import annotations

import torch


def default_alpha(beta: float, workers: int) -> float:
    """The paper's moving rate alpha = beta / p for p workers."""
    if workers < 1:
        raise ValueError(f"need at least one worker, got {workers}")
    return beta / workers


def center_exchange_(x: torch.Tensor, center: torch.Tensor, alpha: float) -> torch.Tensor:
    """Server side, in place: turn the received worker parameters `x` into the unscaled
    difference r = x - center and apply center += alpha r. Returns `x`, which now holds r (what
    goes back to the worker). Two passes over memory; the worker does the scaling."""
    x.sub_(center)
    center.add_(x, alpha=alpha)
    return x


def worker_exchange_(x: torch.Tensor, r: torch.Tensor, alpha: float) -> torch.Tensor:
    """Worker side, in place: x -= alpha r with r = x - center the difference the server sent
    back, so x moves by exactly the opposite of the center."""
    return x.sub_(r, alpha=alpha)
