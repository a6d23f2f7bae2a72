"""A worker's local step through LocalTrainer (no MPI): SAM and Entropy-SGD against NumPy."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcopt import config as C
from hpcopt.models import FlatModel
from hpcopt.worker import LocalTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
import quadratic  # noqa: E402
from references import entropy_sgd_step  # noqa: E402


def trainer(**train):
    cfg = C.load(None, {"model.name": "quadratic:model", "train.schedule": "constant", "train.lr": "0.1",
                        **{f"train.{k}": str(v) for k, v in train.items()}})
    torch.manual_seed(0)
    flat = FlatModel(quadratic.model())
    return LocalTrainer(cfg, 0, flat, quadratic.noiseless()), flat


H, XSTAR = quadratic.curvature().astype(np.float64), quadratic.optimum().astype(np.float64)


def grad(x):
    return H * (x - XSTAR)


def test_sgd_local_step():
    t, flat = trainer()
    x = flat.params.numpy().astype(np.float64)
    for step in range(3):
        t.gradient(step)
        t.apply(0.1)
        x = x - 0.1 * grad(x)
    np.testing.assert_allclose(flat.params.numpy(), x, rtol=1e-5)


def test_sam_descends_with_the_gradient_at_the_ascent_point():
    t, flat = trainer(local="sam", sam_rho=0.5)
    x = flat.params.numpy().astype(np.float64)
    for step in range(3):
        loss = t.gradient(step)
        assert loss == pytest.approx(0.5 * np.sum(H * (x - XSTAR) ** 2), rel=1e-5)  # loss at x itself
        t.apply(0.1)
        g = grad(x)
        e = 0.5 * g / np.linalg.norm(g)
        x = x - 0.1 * grad(x + e)
    np.testing.assert_allclose(flat.params.numpy(), x, rtol=1e-5)


def test_entropy_sgd_local_step_matches_numpy():
    t, flat = trainer(**{"local": "entropy-sgd", "langevin_steps": 3, "langevin_lr": 0.1, "gamma0": 0.5,
                         "gamma1": 0.1, "langevin_noise": 0.0})
    x = flat.params.numpy().astype(np.float64)
    for step in range(3):
        t.gradient(step)
        t.apply(0.1)
        x = entropy_sgd_step(x, grad, 0.5 * 1.1 ** step, 0.1, 3, 0.1)
    np.testing.assert_allclose(flat.params.numpy(), x, rtol=1e-5)
