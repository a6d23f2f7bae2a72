"""Synchronous baselines' update rules (the averaging itself is an allreduce in the transport).

* DP-SGD: the averaged gradient feeds the local step every step (what DDP/Horovod do).
* Local SGD (Lin et al. 2020): every H local steps the workers' parameters are replaced by their
  average; post-local SGD runs DP-SGD for the first steps, then switches.
* DiLoCo (Douillard et al. 2023): H inner steps from the global parameters theta; the outer
  pseudo-gradient is Delta = theta - mean_i(x_i), and theta takes an outer Nesterov step.
"""

from __future__ import annotations

import torch


def local_sgd_should_average(step: int, period: int, switch_step: int = 0) -> bool:
    """Local SGD with optional post-local switch: average every step before `switch_step`
    (plain data-parallel SGD), then every `period` steps."""
    if step < switch_step:
        return True
    return (step - switch_step) % period == 0


class DiLoCoOuter:
    """The outer optimizer of DiLoCo: SGD with Nesterov momentum mu on the pseudo-gradient."""

    def __init__(self, theta: torch.Tensor, *, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True):
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.buf = torch.zeros_like(theta)
        self.started = False

    def step(self, theta: torch.Tensor, average: torch.Tensor) -> torch.Tensor:
        """theta <- outer step with pseudo-gradient Delta = theta - average; in place."""
        delta = theta - average
        if self.started:
            self.buf.mul_(self.momentum).add_(delta)
        else:
            self.buf.copy_(delta)
            self.started = True
        update = delta.add_(self.buf, alpha=self.momentum) if self.nesterov else self.buf
        return theta.sub_(update, alpha=self.lr)
