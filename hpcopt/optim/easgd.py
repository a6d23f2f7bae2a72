"""Elastic averaging (Zhang, Choromanska & LeCun 2015, Algorithm 1 and 2).

At an exchange between worker i (parameters x_i) and the center x~, with moving rate alpha:

    d    = alpha * (x_i - x~)          the elastic difference
    x_i <- x_i - d                     the worker is pulled toward the center
    x~  <- x~ + d                      the center is pulled toward the worker

The two forces are equal and opposite, so x_i + x~ is conserved by an exchange. The server owns
x~ (a shard of it) and computes d; the worker only subtracts what it gets back.
"""

from __future__ import annotations

import torch


def default_alpha(beta: float, workers: int) -> float:
    """The paper's moving rate alpha = beta / p for p workers."""
    if workers < 1:
        raise ValueError(f"need at least one worker, got {workers}")
    return beta / workers


def center_exchange_(x: torch.Tensor, center: torch.Tensor, alpha: float) -> torch.Tensor:
    """Server side, in place: turn the received worker parameters `x` into d = alpha (x - center)
    and apply center += d. Returns `x`, which now holds d (what goes back to the worker)."""
    x.sub_(center).mul_(alpha)
    center.add_(x)
    return x


def worker_exchange_(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Worker side, in place: x -= d with d the elastic difference the server sent back."""
    return x.sub_(d)
