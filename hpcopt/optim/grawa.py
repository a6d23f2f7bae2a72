"""GRAWA, MGRAWA, LGRAWA (Dimlioglu & Choromanska, AISTATS 2024): gradient-based weighted averaging.

The center is a convex combination of the workers, weighted toward the flatter ones:

    center = sum_i w_i x_i,   w_i = (1 / ||grad f(x_i)||) / sum_j (1 / ||grad f(x_j)||)

one weight per worker (MGRAWA: the whole model's gradient norm) or one per layer (LGRAWA: each
layer of the center is its own weighted average). GRAWA is the paper's name for the algorithm with
model-level weights, whose asynchronous variant is MGRAWA; hpcopt runs both the same way (method
"grawa" is "mgrawa"). Every tau steps each worker is pulled toward it:

    x_i <- (1 - alpha) x_i + alpha center
"""

from __future__ import annotations

import torch


def inverse_norm_weights(grad_norms: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """w_i proportional to 1 / ||g_i||, summing to 1 along the first axis.

    `grad_norms` has shape [p] (MGRAWA) or [p, L] (LGRAWA: one column per layer). A zero norm
    (a worker at a stationary point) gets all the weight of its column, shared with any other
    zero norm, rather than a division by zero."""
    norms = grad_norms.to(torch.float64)
    if (norms < 0).any() or not torch.isfinite(norms).all():
        raise ValueError(f"gradient norms must be finite and >= 0, got {grad_norms.tolist()}")
    zero = norms <= eps
    inv = torch.where(zero, torch.zeros_like(norms), 1.0 / norms.clamp_min(eps))
    any_zero = zero.any(dim=0, keepdim=True)
    inv = torch.where(any_zero, zero.to(norms.dtype), inv)
    return (inv / inv.sum(dim=0, keepdim=True)).to(grad_norms.dtype)


def weighted_center_(out: torch.Tensor, xs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """MGRAWA center, in place: out <- sum_i w_i xs[i] (one chunk of the shard; weights from
    inverse_norm_weights). Accumulated worker by worker, so no [p, P] stack is built."""
    if len(xs) != len(weights):
        raise ValueError(f"{len(xs)} workers but {len(weights)} weights")
    out.zero_()
    for x, w in zip(xs, weights):
        out.add_(x, alpha=w)
    return out


def layerwise_center_(center: torch.Tensor, xs: list[torch.Tensor], weights: torch.Tensor,
                      segments: list[tuple[int, int, int]], a: int = 0, b: int | None = None) -> torch.Tensor:
    """LGRAWA center, in place, on the chunk [a, b) of a shard: each part of a layer in it becomes
    sum_i weights[i, l] xs[i][part]. `segments` are (layer l, lo, hi) in shard coordinates
    (shard_segments), `weights` [p, L] from inverse_norm_weights."""
    b = len(center) if b is None else b
    if weights.shape[0] != len(xs):
        raise ValueError(f"{len(xs)} workers but weights of shape {list(weights.shape)}")
    for layer, s_lo, s_hi in segments:
        lo, hi = max(a, s_lo), min(b, s_hi)
        if lo < hi:
            weighted_center_(center[lo:hi], [x[lo:hi] for x in xs], weights[:, layer].tolist())
    return center


def layer_norms(grad: torch.Tensor, layers: list[tuple[int, int]]) -> torch.Tensor:
    """||g||_2 of each layer's slice of a flat gradient."""
    return torch.stack([grad[lo:hi].norm() for lo, hi in layers])


def layer_bounds(layout: dict) -> list[tuple[int, int]]:
    """Flat slices [lo, hi) of the model's layers (parameter tensors), from FlatModel.layout()."""
    sizes = [int(torch.Size(s).numel()) for s in layout["shapes"]]
    return [(int(o), int(o) + n) for o, n in zip(layout["offsets"], sizes)]


def shard_segments(layers: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """The parts of the layers that fall in a server's shard [lo, hi), as (layer index, a, b) in
    shard-local coordinates (a shard may start or end inside a layer)."""
    return [(l, max(a, lo) - lo, min(b, hi) - lo) for l, (a, b) in enumerate(layers) if a < hi and b > lo]
