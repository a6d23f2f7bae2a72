"""The loss as a function of a flat parameter vector: values, gradients and Hessian-vector
products on a fixed set of samples. Pure torch, no MPI.

An `Objective` holds one part of the data. With `weight = n_part / n_total` its sums are already
weighted, so summing the results of every part (an allreduce) gives the loss, gradient or HVP on
the whole set; with one part and weight 1 it is the plain mean.

The loss is the mean cross-entropy of the module's output, or the module's own `loss(x, y)`
(taken as the mean loss of the batch it is given) when it has one; accuracy is NaN then.

The model and the data live on `device` (a GPU or the CPU). Vectors come in as NumPy arrays or
tensors on any device; gradients go out on the CPU (float32 tensors, Python floats: what callers
do next -- sums over MPI ranks, the results file -- happens in host memory), Hessian-vector
products stay on the device (a caller keeping its Lanczos basis there moves nothing).
Sums over batches stay on the device in float64 (the same operations, in the same order, as on
Python floats, so CPU results do not depend on it), with one host sync per call.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


class _LossOf(nn.Module):
    """Wraps a model so that functional_call can reach a user `loss(x, y)` method too."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, x, y):
        if hasattr(self.m, "loss"):
            return self.m.loss(x, y)
        return F.cross_entropy(self.m(x), y)


class Objective:
    def __init__(self, model: nn.Module, layout: dict, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
                 *, weight: float = 1.0, batch: int = 1000, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(torch.float32).to(self.device).eval()
        self.wrapped = _LossOf(self.model)
        self.names = list(layout["names"])
        self.shapes = [tuple(s) for s in layout["shapes"]]
        self.offsets = list(layout["offsets"])
        self.numel = sum(int(np.prod(s)) for s in self.shapes)
        self.x = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        self.y = torch.as_tensor(y, device=self.device)
        self.weight = float(weight)
        self.batch = max(1, int(batch))
        self.has_accuracy = not hasattr(model, "loss")
        own = dict(model.named_parameters())
        missing = [n for n in self.names if n not in own]
        if missing or sum(p.numel() for p in own.values()) != self.numel:
            raise ValueError(f"the rebuilt model does not match the recorded parameter layout "
                             f"(missing {missing[:3]}, {sum(p.numel() for p in own.values())} vs {self.numel} parameters)")

    def on_device(self, v) -> torch.Tensor:
        """v (NumPy or a tensor anywhere) as float32 on this objective's device; v itself when it is
        already that (so a vector used for many calls, like the point of the HVPs, is moved once)."""
        return torch.as_tensor(v, dtype=torch.float32, device=self.device)

    def _params(self, w: torch.Tensor) -> dict:
        return {f"m.{n}": w[o:o + int(np.prod(s))].view(s) for n, s, o in zip(self.names, self.shapes, self.offsets)}

    def _batches(self):
        for i in range(0, len(self.x), self.batch):
            yield self.x[i:i + self.batch], self.y[i:i + self.batch]

    def _frac(self, n: int) -> float:
        return self.weight * n / max(1, len(self.x))

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def loss_accuracy(self, w) -> tuple[float, float]:
        """(weighted mean loss, weighted accuracy) at w; accuracy NaN for a model with its own loss."""
        params = self._params(self.on_device(w))
        loss, correct = self._zero(), self._zero()
        for xb, yb in self._batches():
            if self.has_accuracy:
                out = functional_call(self.model, {k[2:]: v for k, v in params.items()}, (xb,))
                loss += F.cross_entropy(out, yb, reduction="sum").double() * self.weight / len(self.x)
                correct += (out.argmax(1) == yb).sum().double() * self.weight / len(self.x)
            else:
                loss += functional_call(self.wrapped, params, (xb, yb)).double() * self._frac(len(xb))
        loss, correct = torch.stack((loss, correct)).tolist()  # the one host sync
        return loss, (correct if self.has_accuracy else float("nan"))

    def loss_grad(self, w) -> tuple[float, torch.Tensor]:
        """(weighted loss, weighted gradient) at w; the gradient on the CPU."""
        w = self.on_device(w).detach().requires_grad_(True)
        params = self._params(w)
        total, grad = self._zero(), torch.zeros_like(w)
        for xb, yb in self._batches():
            loss = functional_call(self.wrapped, params, (xb, yb)) * self._frac(len(xb))
            g, = torch.autograd.grad(loss, w)
            grad += g
            total += loss.detach().double()
        return total.item(), grad.detach().cpu()

    def hvp(self, w, v) -> torch.Tensor:
        """Weighted Hessian-vector product H(w) v (double backward, batch by batch), on the device."""
        w = self.on_device(w).detach().requires_grad_(True)
        v = self.on_device(v)
        params = self._params(w)
        out = torch.zeros_like(w)
        for xb, yb in self._batches():
            loss = functional_call(self.wrapped, params, (xb, yb)) * self._frac(len(xb))
            g, = torch.autograd.grad(loss, w, create_graph=True)
            hv, = torch.autograd.grad(g @ v, w)
            out += hv
        return out.detach()


def subsample(n: int, samples: int, seed: int) -> np.ndarray:
    """Indices of a fixed subsample: all n (in order) when samples <= 0 or >= n, else `samples`
    indices drawn without replacement with `seed`, sorted."""
    if samples <= 0 or samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=samples, replace=False))


def part_of(n: int, rank: int, size: int) -> slice:
    """The contiguous share of n items that rank `rank` of `size` holds."""
    lo = n * rank // size
    return slice(lo, n * (rank + 1) // size)


def make_objective(run, data: dict, *, split: str = "train", samples: int = 0, seed: int = 0,
                   rank: int = 0, size: int = 1, batch: int = 1000, device: str = "cpu") -> Objective:
    """The run's model (rebuilt from its recorded config) on `split` (train or test), a fixed
    subsample of it, and this rank's share of that subsample, on `device`."""
    from hpcopt.models import build_model

    if split not in ("train", "test"):
        raise ValueError(f"data split {split!r} must be train or test")
    x, y = data[f"x_{split}"], data[f"y_{split}"]
    idx = subsample(len(x), samples, seed)
    share = idx[part_of(len(idx), rank, size)]
    torch.manual_seed(0)  # the init is overwritten; seeded only so building is deterministic
    model = build_model(run.config.model.name, run.config.model.kwargs)
    return Objective(model, run.layout, x[share], y[share], weight=len(share) / len(idx), batch=batch,
                     device=device)
