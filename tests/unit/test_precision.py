"""train.precision bf16: the forward pass and loss under bfloat16 autocast, on the CPU here (the
same code takes the parameters' device type, so a GPU worker autocasts on CUDA)."""

import numpy as np
import pytest
import torch

from hpcopt import config as C
from hpcopt.models import FlatModel, build_model
from hpcopt.roles.local import LocalTrainer

MODEL = {"model.name": "mlp", "model.kwargs": '{"hidden": [32]}'}


def separable(n: int = 512) -> dict:
    """40 features, 10 classes given by a random linear map: an MLP learns it quickly."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((40, 10))
    x = rng.standard_normal((n, 40)).astype(np.float32)
    y = (x @ w).argmax(1).astype(np.int64)
    return {"x_train": x, "y_train": y, "x_test": x[:64], "y_test": y[:64]}


def train(precision: str, steps: int = 40, **train):
    cfg = C.load(None, {**MODEL, "run.seed": "1", "train.precision": precision, "train.lr": "0.1",
                        "train.momentum": "0.9", "train.schedule": "constant", "data.batch_size": "64",
                        **{f"train.{k}": str(v) for k, v in train.items()}})
    torch.manual_seed(1)
    flat = FlatModel(build_model(cfg.model.name, cfg.model.kwargs))
    t = LocalTrainer(cfg, 0, flat, separable())
    losses = []
    for step in range(steps):
        losses.append(float(t.gradient(step)))
        t.apply(t.lr(step))
    return flat, losses, t


def test_bf16_trains_in_float32_storage_close_to_fp32():
    flat16, losses16, t16 = train("bf16")
    flat32, losses32, _ = train("fp32")
    assert np.mean(losses16[-5:]) < 0.7 * losses16[0]  # it learns
    # parameters, gradients (views into the flat buffers) and the buffers the exchanges send stay float32
    assert flat16.params.dtype == flat16.grads.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in t16.module.parameters())
    storage = flat16.grads.untyped_storage().data_ptr()  # autograd accumulated into the flat buffer
    assert all(p.grad.untyped_storage().data_ptr() == storage for p in t16.module.parameters())
    # bf16 rounding shows in the results, but only as rounding
    assert not torch.equal(flat16.params, flat32.params)
    assert losses16[0] != losses32[0] and losses16[0] == pytest.approx(losses32[0], rel=2e-2)
    moved = (flat32.params - train("fp32", steps=0)[0].params).norm()
    assert (flat16.params - flat32.params).norm() < 0.05 * moved
    np.testing.assert_allclose(losses16, losses32, rtol=5e-2)


def test_bf16_runs_the_forward_in_bfloat16_and_the_loss_in_float32():
    _, _, t = train("bf16", steps=0)
    seen = []
    hook = t.module.net[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    loss = t._backward(t.x[:8], t.y[:8])
    hook.remove()
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32


def test_bf16_with_every_local_step():
    for local in ("sgd", "adamw", "sam", "lars", "entropy-sgd"):
        flat, losses, _ = train("bf16", steps=5, local=local, langevin_steps=2)
        assert flat.params.dtype == torch.float32 and all(np.isfinite(losses)), local


def test_bf16_initial_loss_is_the_autocast_loss_of_the_untrained_model():
    _, losses, t = train("bf16", steps=1)
    assert np.isfinite(t.initial_loss())
    _, _, t32 = train("fp32", steps=0)
    assert t.initial_loss() == pytest.approx(t32.initial_loss(), rel=2e-2)


def test_precision_is_checked():
    assert C.load(None).train.precision == "fp32"
    with pytest.raises(C.ConfigError, match="train.precision = 'fp16' is not one of: fp32, bf16"):
        C.load(None, {"train.precision": "fp16"})
