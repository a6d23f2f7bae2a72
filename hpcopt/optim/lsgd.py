"""LSGD, leader stochastic gradient descent (Teng et al., NeurIPS 2019).

Each worker keeps a moving average of its recent training losses; the leader is the worker
with the lowest. Every tau steps every other worker is pulled toward the leader,

    x_i <- x_i - lambda (x_i - x_leader)

with strength lambda toward the leader of its node (local leader) and, every tau_G steps,
lambda_G toward the global leader:

    x_i <- x_i - lambda (x_i - x_local_leader) - lambda_G (x_i - x_global_leader)

A leader is not pulled toward itself. Only the leaders' parameters travel (see hpcopt.comm.server).
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


def pull_target(pulls: list[tuple[float, torch.Tensor]]) -> tuple[torch.Tensor | None, float]:
    """Pulls x <- x + sum_j r_j (t_j - x) as one move x <- x + rate (m - x): returns (m, rate) with
    rate = sum_j r_j and m = sum_j r_j t_j / rate ((None, 0) without pulls). Two-level LSGD:
    [(lambda, x_local_leader), (lambda_G, x_global_leader)]. One target is returned as it is."""
    rate = float(sum(r for r, _ in pulls))
    if not pulls:
        return None, 0.0
    if len(pulls) == 1:
        return pulls[0][1], rate
    m = pulls[0][1] * (pulls[0][0] / rate)
    for r, t in pulls[1:]:
        m.add_(t, alpha=r / rate)
    return m, rate


def pull_(x: torch.Tensor, target: torch.Tensor, rate: float) -> torch.Tensor:
    """x <- x - rate (x - target), in place (the worker's move toward its leader's parameters)."""
    return x.lerp_(target, rate)
