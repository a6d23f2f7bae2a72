"""The optimizer math against NumPy references (no MPI)."""

import numpy as np
import pytest
import torch

from hpcopt.optim.easgd import default_alpha, elastic_exchange_
from hpcopt.optim.local import SGDStep
from hpcopt.optim.schedule import learning_rate


def easgd_reference(x, center, alpha):
    """Zhang et al. 2015, Algorithm 1: x <- x - alpha (x - c), c <- c + alpha (x - c)."""
    x = x.astype(np.float64)
    c = center.astype(np.float64)
    d = alpha * (x - c)
    return x - d, c + d


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.225, 0.5, 0.51, 0.9, 1.0])
def test_elastic_exchange_matches_numpy(alpha):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(1000).astype(np.float32)
    c0 = rng.standard_normal(1000).astype(np.float32)
    want_x, want_c = easgd_reference(x0, c0, alpha)

    center, x = torch.from_numpy(c0.copy()), torch.from_numpy(x0.copy())
    elastic_exchange_(center, x, alpha)        # the server moves both; x is the reply
    np.testing.assert_allclose(x.numpy(), want_x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(center.numpy(), want_c, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
def test_elastic_forces_are_equal_and_opposite(alpha):
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(500).astype(np.float32)
    c0 = rng.standard_normal(500).astype(np.float32)
    center, x = torch.from_numpy(c0.copy()), torch.from_numpy(x0.copy())
    elastic_exchange_(center, x, alpha)
    # the pull on the worker and on the center cancel: x + c is conserved
    np.testing.assert_allclose((x + center).numpy(), x0 + c0, rtol=1e-5, atol=1e-5)
    # and both moved toward each other by the same fraction
    np.testing.assert_allclose((x - center).numpy(), (1 - 2 * alpha) * (x0 - c0), rtol=1e-4, atol=1e-5)


def test_default_alpha_is_beta_over_p():
    assert default_alpha(0.9, 4) == pytest.approx(0.225)
    with pytest.raises(ValueError):
        default_alpha(0.9, 0)


@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.0), (0.9, 5e-4), (0.5, 1e-2)])
def test_local_step_matches_torch_sgd(momentum, wd):
    torch.manual_seed(0)
    p_ref = torch.randn(300, requires_grad=True)
    p = torch.zeros(300)
    p.copy_(p_ref.detach())
    ref = torch.optim.SGD([p_ref], lr=0.1, momentum=momentum, nesterov=momentum > 0, weight_decay=wd)
    step = SGDStep(p, momentum=momentum, nesterov=True, weight_decay=wd)
    for i in range(5):
        g = torch.randn(300)
        p_ref.grad = g.clone()
        ref.step()
        step.step(p, g.clone(), lr=0.1)
        np.testing.assert_allclose(p.numpy(), p_ref.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_cosine_schedule_and_warmup():
    assert learning_rate(0, 100, 0.1, "cosine") == pytest.approx(0.1)
    assert learning_rate(50, 100, 0.1, "cosine") == pytest.approx(0.05)
    assert learning_rate(100, 100, 0.1, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(0, 100, 0.1, "cosine", warmup_steps=10) == pytest.approx(0.01)
    assert learning_rate(9, 100, 0.1, "cosine", warmup_steps=10) == pytest.approx(0.1)
    assert learning_rate(70, 100, 0.1, "constant") == 0.1
