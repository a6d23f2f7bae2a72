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
        # (hpcopt.worker.LocalTrainer fills it; the exchange client ships it)
        self.layer_grad_norms = np.full(len(params), np.nan)
        offset = 0
        for p in params:
            n = p.numel()
            self.params[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = self.params[offset:offset + n].view_as(p)
            # autograd accumulates into an existing .grad in place, so the view stays live
            p.grad = self.grads[offset:offset + n].view_as(p)
            offset += n

    def zero_grad(self) -> None:
        self.grads.zero_()

    def layout(self) -> dict:
        """Names, shapes and offsets of the parameters inside the flat buffer."""
        offsets, o = [], 0
        for s in self.shapes:
            offsets.append(o)
            o += int(torch.Size(s).numel())
        return {"names": self.names, "shapes": [list(s) for s in self.shapes], "offsets": offsets}
