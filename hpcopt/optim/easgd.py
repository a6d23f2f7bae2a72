"""Elastic averaging (Zhang, Choromanska & LeCun 2015, Algorithm 1 and 2).

At an exchange between worker i (parameters x_i) and the center x~, with moving rate alpha:

    x_i <- x_i - alpha (x_i - x~)      the worker is pulled toward the center
    x~  <- x~ + alpha (x_i - x~)       the center is pulled toward the worker

with both right-hand sides taken before the exchange. The two forces are equal and opposite, so
x_i + x~ is conserved. The server sends the worker the center as it was (x~ before its update),
so each side computes its own move in one fused pass (a lerp).
"""

from __future__ import annotations

import torch


def default_alpha(beta: float, workers: int) -> float:
    """The paper's moving rate alpha = beta / p for p workers."""
    if workers < 1:
        raise ValueError(f"need at least one worker, got {workers}")
    return beta / workers


def center_exchange_(center: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Server side, in place: center <- center + alpha (x - center), x the worker's parameters."""
    return center.lerp_(x, alpha)


def worker_exchange_(x: torch.Tensor, center: torch.Tensor, alpha: float) -> torch.Tensor:
    """Worker side, in place: x <- x - alpha (x - center), with `center` as it was before the
    server moved it (what the server sends back)."""
    return x.lerp_(center, alpha)
