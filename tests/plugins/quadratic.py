"""A noisy quadratic, as a user model + data plugin ('quadratic:model', 'quadratic:data').

    f(w) = 1/2 sum_j h_j (w_j - x*_j - mean(xi_batch)_j)^2

Each training sample is a noise vector xi; a minibatch's gradient is h (w - x* - mean xi), so the
expected loss has its minimum at x*. Test samples are zero: the test loss is the exact f at x*.
"""

import os

import numpy as np
import torch
from torch import nn

DIM = 20


def optimum(dim: int = DIM) -> np.ndarray:
    return np.linspace(-1.0, 1.0, dim).astype(np.float32)


def curvature(dim: int = DIM) -> np.ndarray:
    return np.linspace(0.5, 2.0, dim).astype(np.float32)


class Quadratic(nn.Module):
    def __init__(self, dim: int = DIM, init: float = 3.0, poison_rank: int = -1, poison_call: int = 0,
                 layers: int = 1, poison_grad: bool = False):
        """poison_rank/poison_call: the loss is NaN at that call on that MPI rank (once), to test
        the divergence guard; with poison_grad the loss stays finite and its gradient is NaN
        instead (the parameters go bad without the loss saying so). layers > 1 splits w into that many parameter tensors (np.array_split
        sizes), for per-layer rules (LGRAWA, LARS)."""
        super().__init__()
        self.poison = poison_rank >= 0 and int(os.environ.get("OMPI_COMM_WORLD_RANK", -1)) == poison_rank
        self.poison_call, self.calls, self.poison_grad = poison_call, 0, poison_grad
        if layers == 1:
            self.w = nn.Parameter(torch.full((dim,), float(init)))
        else:
            self.parts = nn.ParameterList([nn.Parameter(torch.full((len(p),), float(init)))
                                           for p in np.array_split(np.arange(dim), layers)])
        self.register_buffer("h", torch.from_numpy(curvature(dim)))
        self.register_buffer("xstar", torch.from_numpy(optimum(dim)))

    @property
    def weights(self) -> torch.Tensor:
        return self.w if hasattr(self, "w") else torch.cat(list(self.parts))

    def forward(self, x):
        return self.weights.expand(len(x), -1)

    def loss(self, x, y):
        self.calls += 1
        r = self.weights - self.xstar - x.mean(0)
        poisoned = self.poison and self.calls == self.poison_call
        if poisoned and self.poison_grad:
            r.register_hook(lambda g: torch.full_like(g, float("nan")))
        value = 0.5 * (self.h * r * r).sum()
        return value * float("nan") if poisoned and not self.poison_grad else value


def model(**kwargs):
    return Quadratic(**kwargs)


def _data(n: int, sigma: float, dim: int = DIM) -> dict:
    rng = np.random.default_rng(1234)
    return {"x_train": (sigma * rng.standard_normal((n, dim))).astype(np.float32),
            "y_train": np.zeros(n, dtype=np.int64),
            "x_test": np.zeros((8, dim), dtype=np.float32), "y_test": np.zeros(8, dtype=np.int64)}


def data():
    """Noisy gradients: unit-variance noise per sample."""
    return _data(4000, 1.0)


def noiseless():
    """Exact gradients whatever the batch: every sample is zero noise."""
    return _data(400, 0.0)
