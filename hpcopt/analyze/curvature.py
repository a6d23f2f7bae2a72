"""Curvature of the loss: top Hessian eigenvalues (Lanczos), the trace (Hutchinson), the
spectral density (stochastic Lanczos quadrature) and epsilon-sharpness (Keskar et al. 2017).

Pure functions of a Hessian-vector product `hvp(v) -> H v` (and of a loss/gradient function for
sharpness) on flat float tensors; how the products are computed (one process, or summed over MPI
ranks) is the caller's business. Every random vector comes from a seeded CPU torch.Generator (the
same vectors whatever the device), so all ranks that run these functions with the same seed and
the same (reduced) products take the same steps and stop at the same time. `device` is where the
Lanczos basis and the probes live (the GPU of the products, when the basis fits there: its full
reorthogonalisation reads the whole basis every step, steps x dim float64 values).

References: Lanczos with full reorthogonalisation (Golub & Van Loan 10.1); Hutchinson 1989;
stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019);
epsilon-sharpness (Keskar et al. 2017, eq. 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]


def _call(hvp: Matvec, v: torch.Tensor) -> torch.Tensor:
    """H v in float64 on v's device (the product itself may come back from anywhere)."""
    return hvp(v.to(torch.float32)).to(device=v.device, dtype=torch.float64)


def _rademacher(dim: int, gen: torch.Generator, device) -> torch.Tensor:
    return (torch.randint(0, 2, (dim,), generator=gen, dtype=torch.float64) * 2 - 1).to(device)


def lanczos(hvp: Matvec, dim: int, steps: int, *, start: torch.Tensor | None = None, seed: int = 0,
            progress=None, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """`steps` Lanczos iterations with full reorthogonalisation (float64). Returns the
    tridiagonal's diagonal `alpha`, off-diagonal `beta` (len(alpha) - 1) and the basis Q [m, dim]
    (on `device`). Stops early when the Krylov space is exhausted (beta ~ 0)."""
    steps = max(1, min(steps, dim))
    if start is None:
        start = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q = start.to(device=device, dtype=torch.float64)
    q = q / q.norm()
    Q = torch.zeros(steps, dim, dtype=torch.float64, device=device)
    alpha, beta = [], []
    for j in range(steps):
        Q[j] = q
        w = _call(hvp, q)
        a = float(w @ q)
        alpha.append(a)
        # full reorthogonalisation, twice ("twice is enough"), against every basis vector so far
        for _ in range(2):
            w -= Q[:j + 1].T @ (Q[:j + 1] @ w)
        if progress is not None:
            progress(j + 1)
        b = float(w.norm())
        if j == steps - 1 or b < 1e-10 * max(1.0, abs(a)):
            break
        beta.append(b)
        q = w / b
    m = len(alpha)
    return np.array(alpha), np.array(beta[:m - 1]), Q[:m]


def tridiagonal_eig(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    return np.linalg.eigh(T)


@dataclass
class Eigen:
    values: np.ndarray       # top-k eigenvalues, largest first (algebraic)
    residuals: np.ndarray    # ||H v - lambda v|| of each Ritz pair, measured with one more product each
    vectors: torch.Tensor    # [k, dim] unit Ritz vectors
    iterations: int


def top_eigenvalues(hvp: Matvec, dim: int, k: int = 5, *, steps: int = 0, seed: int = 0,
                    progress=None, device: str | torch.device = "cpu") -> Eigen:
    """The k algebraically largest Hessian eigenvalues by Lanczos (`steps` iterations, default
    max(3k, 30)); each residual is measured with one extra product, so it is a true error bound
    (|lambda - lambda_true| <= residual for the nearest true eigenvalue)."""
    steps = steps or max(3 * k, 30)
    alpha, beta, Q = lanczos(hvp, dim, steps, seed=seed, progress=progress, device=device)
    theta, S = tridiagonal_eig(alpha, beta)
    order = np.argsort(theta)[::-1][:k]
    vecs = torch.from_numpy(S[:, order]).T.to(Q.device) @ Q
    res = []
    for lam, v in zip(theta[order], vecs):
        res.append(float((_call(hvp, v) - lam * v).norm()))
    return Eigen(values=theta[order].copy(), residuals=np.array(res), vectors=vecs, iterations=len(alpha))


@dataclass
class Trace:
    value: float          # the estimate: mean of z^T H z over the probes
    stderr: float         # its standard error: std(z^T H z) / sqrt(probes)
    probes: int
    samples: np.ndarray   # every z^T H z


def hutchinson_trace(hvp: Matvec, dim: int, *, rtol: float = 0.01, min_probes: int = 10, max_probes: int = 500,
                     seed: int = 0, progress=None, device: str | torch.device = "cpu") -> Trace:
    """Hutchinson's estimator tr(H) ~ mean z^T H z with Rademacher z; stops as soon as the
    standard error is at most rtol |estimate| (after at least min_probes) or at max_probes."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    while True:
        z = _rademacher(dim, gen, device)
        samples.append(float(z @ _call(hvp, z)))
        n = len(samples)
        mean = float(np.mean(samples))
        se = float(np.std(samples, ddof=1) / math.sqrt(n)) if n > 1 else float("inf")
        if progress is not None:
            progress(n, mean, se)
        if (n >= min_probes and se <= rtol * abs(mean)) or n >= max_probes:
            return Trace(value=mean, stderr=se, probes=n, samples=np.array(samples))


@dataclass
class Density:
    grid: np.ndarray       # eigenvalue axis
    density: np.ndarray    # smoothed spectral density on the grid (integrates to ~1)
    nodes: np.ndarray      # [runs, steps] Ritz values
    weights: np.ndarray    # [runs, steps] their quadrature weights (each row sums to 1)
    sigma: float


def slq_density(hvp: Matvec, dim: int, *, runs: int = 3, steps: int = 60, sigma: float = 0.0, points: int = 1000,
                seed: int = 0, progress=None, device: str | torch.device = "cpu") -> Density:
    """Spectral density by stochastic Lanczos quadrature: `runs` Lanczos runs of `steps` from
    Rademacher starts; the Ritz values with weights (first components squared) are smoothed by a
    Gaussian of width sigma (default: 1% of the spectrum's span)."""
    gen = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for r in range(runs):
        z = _rademacher(dim, gen, device)
        done = r * steps
        alpha, beta = lanczos(hvp, dim, steps, start=z, device=device,
                                 progress=(lambda j, done=done: progress(done + j)) if progress else None)[:2]
        # (the basis is dropped at once: the next run's must not be allocated beside it)
        theta, S = tridiagonal_eig(alpha, beta)
        pad = steps - len(theta)
        nodes.append(np.pad(theta, (0, pad)))
        weights.append(np.pad(S[0] ** 2, (0, pad)))
    nodes, weights = np.array(nodes), np.array(weights)
    lo, hi = nodes.min(), nodes.max()
    span = max(hi - lo, 1e-12)
    sigma = sigma or 0.01 * span
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, points)
    kern = np.exp(-((grid[None, None, :] - nodes[..., None]) ** 2) / (2 * sigma ** 2)) / (sigma * math.sqrt(2 * math.pi))
    density = (weights[..., None] * kern).sum(axis=(0, 1)) / runs
    return Density(grid=grid, density=density, nodes=nodes, weights=weights, sigma=sigma)


@dataclass
class Sharpness:
    value: float        # 100 (max f(x + z) - f(x)) / (1 + f(x)), as in Keskar et al.
    loss: float         # f(x)
    max_loss: float     # the largest f(x + z) found
    epsilon: float
    steps: int


def epsilon_sharpness(loss_grad: Callable[[torch.Tensor], tuple[float, torch.Tensor]], x: torch.Tensor, *,
                      epsilon: float = 1e-3, steps: int = 20, step_fraction: float = 0.25,
                      progress=None) -> Sharpness:
    """Epsilon-sharpness (Keskar et al. 2017): the largest relative loss increase over the box
    |z_i| <= epsilon (|x_i| + 1), found by projected sign-gradient ascent (steps of
    step_fraction times the box, as in PGD) started at z = 0 (Keskar et al. use L-BFGS-B; any
    ascent gives a lower bound of the true maximum)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    box = epsilon * (x.abs() + 1)
    f0, g = loss_grad(x)
    z = torch.zeros_like(x)
    best = f0
    for s in range(steps):
        z = torch.maximum(torch.minimum(z + step_fraction * box * torch.sign(g), box), -box)
        f, g = loss_grad(x + z)
        best = max(best, f)
        if progress is not None:
            progress(s + 1)
    return Sharpness(value=100 * (best - f0) / (1 + f0), loss=f0, max_loss=best, epsilon=epsilon, steps=steps)
