"""A model whose parameters and gradients live in two flat contiguous float32 buffers.

Every parameter (and its .grad) becomes a view into one buffer, so optimizer math, exchanges and
snapshots work on a single tensor with no gather/scatter copies.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class FlatModel:
    def __init__(self, model: nn.Module, device: torch.device | str = "cpu"):
        self.module = model.to(device=device, dtype=torch.float32)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        self.shapes = [tuple(p.shape) for p in params]
        self.numel = sum(p.numel() for p in params)
        self.params = torch.empty(self.numel, dtype=torch.float32, device=device)
        self.grads = torch.zeros(self.numel, dtype=torch.float32, device=device)
        # LGRAWA: the norm of each parameter tensor's slice of the gradient a worker last reported
        # (hpcopt.roles.local.LocalTrainer fills it; the exchange client ships it)
        self.layer_grad_norms = np.full(len(params), np.nan)
        offset = 0
        for p in params:
            n = p.numel()
            self.params[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = self.params[offset:offset + n].view_as(p)
            # autograd accumulates into an existing .grad in place, so the view stays live
            p.grad = self.grads[offset:offset + n].view_as(p)
            offset += n

    def place(self, storage: torch.Tensor) -> None:
        """Move the flat parameters into `storage` (a contiguous float32 CPU tensor of numel
        elements, e.g. a shared-memory window): the values are copied, every parameter becomes
        a view into it."""
        if storage.numel() != self.numel or storage.dtype != torch.float32 or not storage.is_contiguous():
            raise ValueError(f"storage for {self.numel} float32 parameters expected, got {storage.numel()} "
                             f"{storage.dtype}")
        storage.copy_(self.params)
        self.params = storage
        offset = 0
        for p, shape in zip((p for p in self.module.parameters() if p.requires_grad), self.shapes):
            n = p.numel()
            p.data = storage[offset:offset + n].view(shape)
            offset += n

    def zero_grad(self) -> None:
        self.grads.zero_()

    def layout(self) -> dict:
        """Names, shapes and offsets of the parameters inside the flat buffer."""
        return parameter_layout(self.module)


def parameter_layout(module: nn.Module) -> dict:
    """Names, shapes and offsets of `module`'s trainable parameters laid end to end in the order
    of `module.parameters()`: the flat vector a trajectory records (its /model attributes)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    offsets, o = [], 0
    for _, p in named:
        offsets.append(o)
        o += p.numel()
    return {"names": [n for n, _ in named], "shapes": [list(p.shape) for _, p in named], "offsets": offsets}
