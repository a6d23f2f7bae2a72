"""Local steps of a worker on flat parameter/gradient buffers (torch.optim.SGD semantics).

EASGD uses plain SGD, EAMSGD Nesterov momentum with rate delta (Algorithm 2).
"""

from __future__ import annotations

import torch


class SGDStep:
    """x <- x - lr * (g + wd x), with optional (Nesterov) momentum delta, like torch.optim.SGD.

    Works in place on flat buffers; `grad` is used as scratch (it is zeroed before the next step
    anyway), so a step allocates nothing.
    """

    def __init__(self, params: torch.Tensor, *, momentum: float = 0.0, nesterov: bool = True,
                 weight_decay: float = 0.0):
        self.momentum = momentum
        self.nesterov = nesterov and momentum > 0
        self.weight_decay = weight_decay
        self.buf = torch.zeros_like(params) if momentum > 0 else None
        self._started = False

    def step(self, params: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        if self.weight_decay:
            grad.add_(params, alpha=self.weight_decay)
        if self.buf is not None:
            if self._started:
                self.buf.mul_(self.momentum).add_(grad)
            else:  # torch.optim.SGD initialises the buffer with the first gradient
                self.buf.copy_(grad)
                self._started = True
            if self.nesterov:
                grad.add_(self.buf, alpha=self.momentum)
            else:
                grad.copy_(self.buf)
        params.add_(grad, alpha=-lr)

    def state_dict(self) -> dict:
        return {"momentum_buffer": None if self.buf is None else self.buf.clone(), "started": self._started}

    def load_state_dict(self, state: dict) -> None:
        if self.buf is not None and state.get("momentum_buffer") is not None:
            self.buf.copy_(state["momentum_buffer"])
            self._started = bool(state.get("started", True))
