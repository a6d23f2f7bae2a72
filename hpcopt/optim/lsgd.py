"""LSGD, leader stochastic gradient descent (Teng et al., NeurIPS 2019).

Each worker keeps a moving average of its recent training losses; the leader is the worker
with the lowest. Every tau steps every other worker is pulled toward the leader,

    x_i <- x_i - lambda (x_i - x_leader)

with strength lambda toward the leader of its node (local leader) and, every tau_G steps,
lambda_G toward the global leader. The leader itself is not pulled. Only the leader's
parameters travel.
"""

from __future__ import annotations

import torch


def loss_average(previous: float | None, loss: float, decay: float = 0.9) -> float:
    """Exponential moving average of a worker's training loss (the first loss starts it)."""
    if previous is None:
        return float(loss)
    return decay * previous + (1.0 - decay) * float(loss)


def leader(losses: dict[int, float]) -> int:
    """The worker id with the lowest (finite) average loss; ties go to the lowest id."""
    finite = {w: l for w, l in losses.items() if l == l and abs(l) != float("inf")}
    if not finite:
        raise ValueError(f"no worker has a finite loss average: {losses}")
    return min(finite, key=lambda w: (finite[w], w))


def pull_to_leader_(x: torch.Tensor, x_leader: torch.Tensor, lam: float, *, is_leader: bool) -> torch.Tensor:
    """x <- x - lambda (x - x_leader), in place; the leader stays where it is."""
    if not is_leader:
        x.sub_(x - x_leader, alpha=lam)
    return x
