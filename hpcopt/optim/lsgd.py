"""LSGD, leader stochastic gradient descent (Teng et al., NeurIPS 2019).

Each worker keeps a moving average of its recent training losses; the leader is the worker
with the lowest. Every tau steps every other worker is pulled toward the leader,

    x_i <- x_i - lambda (x_i - x_leader)

with strength lambda toward the leader of its node (local leader) and, every tau_G steps,
lambda_G toward the global leader:

    x_i <- x_i - lambda (x_i - x_local_leader) - lambda_G (x_i - x_global_leader)

A leader is not pulled toward itself. In the paper only the leaders' parameters travel.
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


def group_leader(losses: dict[int, float], groups: dict[int, object], worker: int) -> int:
    """The local leader of `worker`: the leader among the workers of its group (its node)."""
    mine = groups[worker]
    return leader({w: l for w, l in losses.items() if groups[w] == mine})


def two_level_target(x: torch.Tensor, x_local: torch.Tensor, x_global: torch.Tensor, lam: float,
                     lam_g: float) -> torch.Tensor:
    """The point r with x - lam (x - r) = x - lam (x - x_local) - lam_G (x - x_global): a server
    that replies r to a worker that moves x <- x - lam (x - reply) applies both pulls at once,
    r = x_local - (lam_G / lam) (x - x_global)."""
    return torch.sub(x, x_global).mul_(-lam_g / lam).add_(x_local)


def pull_to_leader_(x: torch.Tensor, x_leader: torch.Tensor, lam: float, *, is_leader: bool) -> torch.Tensor:
    """x <- x - lambda (x - x_leader), in place; the leader stays where it is."""
    if not is_leader:
        x.sub_(x - x_leader, alpha=lam)
    return x
