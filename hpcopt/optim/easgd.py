"""Elastic averaging (Zhang, Choromanska & LeCun 2015, Algorithm 1 and 2).

At an exchange between worker i (parameters x_i) and the center x~, with moving rate alpha:

    x_i <- x_i - alpha (x_i - x~)      the worker is pulled toward the center
    x~  <- x~ + alpha (x_i - x~)       the center is pulled toward the worker

with both right-hand sides taken before the exchange. The two forces are equal and opposite, so
x_i + x~ is conserved. The server does both moves on its shard (`elastic_exchange_`) and sends
the worker its new parameters, which the worker receives straight into its parameter buffer: an
exchange costs the worker no arithmetic, and the server two passes over data that is still in
cache from the receive.
"""

from __future__ import annotations

import torch


def default_alpha(beta: float, workers: int) -> float:
    """The paper's moving rate alpha = beta / p for p workers."""
    if workers < 1:
        raise ValueError(f"need at least one worker, got {workers}")
    return beta / workers


def elastic_exchange_(center: torch.Tensor, x: torch.Tensor, alpha: float) -> None:
    """Both moves in place: center <- center + alpha (x - center), x <- x - alpha (x - center).

    For alpha <= 1/2: two lerps, no temporary. After the first, center' - x = (1 - alpha)(c - x),
    so x + alpha/(1 - alpha) (center' - x) = x + alpha (c - x), with a factor <= 1 (no rounding
    error amplified). A larger alpha would amplify it (alpha/(1 - alpha) > 1, infinite at 1):
    there the difference is kept in a temporary instead."""
    if alpha <= 0.5:
        center.lerp_(x, alpha)
        x.lerp_(center, alpha / (1 - alpha))
    else:
        d = torch.sub(x, center)
        center.add_(d, alpha=alpha)
        x.sub_(d, alpha=alpha)
