"""A worker's local step through LocalTrainer (no MPI): SAM and Entropy-SGD against NumPy."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcopt import config as C
from hpcopt.models import FlatModel
from hpcopt.roles.local import LocalTrainer

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
        loss = float(t.gradient(step))
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


def lars_reference(x, g, layers, lr, eta, wd, momentum, buf):
    """One LARS step in NumPy (You et al. 2017, with Nesterov momentum as torch.optim.SGD)."""
    d = np.empty_like(x)
    for lo, hi in layers:
        w_norm, g_norm = np.linalg.norm(x[lo:hi]), np.linalg.norm(g[lo:hi])
        ratio = eta * w_norm / (g_norm + wd * w_norm) if w_norm > 0 and g_norm > 0 else 1.0
        d[lo:hi] = ratio * (g[lo:hi] + wd * x[lo:hi])
    buf = d if buf is None else momentum * buf + d
    return x - lr * (d + momentum * buf), buf


@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 1e-2)])
def test_lars_local_step_matches_numpy(momentum, wd):
    cfg = C.load(None, {"model.name": "quadratic:model", "train.schedule": "constant", "train.lr": "2.0",
                        "train.local": "lars", "train.lars_eta": "0.01", "train.momentum": str(momentum),
                        "train.weight_decay": str(wd)})
    flat = FlatModel(quadratic.model(layers=3, init=1.5))
    t = LocalTrainer(cfg, 0, flat, quadratic.noiseless())
    layers = [(0, 7), (7, 14), (14, 20)]
    x, buf = flat.params.numpy().astype(np.float64), None
    x[7:14] = XSTAR[7:14]  # a layer at its optimum (zero gradient) keeps ratio 1
    flat.params.copy_(torch.from_numpy(x))
    for step in range(4):
        t.gradient(step)
        t.apply(2.0)
        x, buf = lars_reference(x, grad(x), layers, 2.0, 0.01, wd, momentum, buf)
    np.testing.assert_allclose(flat.params.numpy(), x, rtol=1e-5, atol=1e-6)
    # every layer with weights and gradient moved by about lr * eta * ||x_l|| at the first step
    assert not np.allclose(x[:7], 1.5)


def test_lars_trust_ratio_makes_the_step_scale_free():
    """Scaling the loss (so the gradient) by 100 does not change a plain LARS step."""
    from hpcopt.optim.local import LARSStep

    layers = [(0, 3), (3, 8)]
    g = torch.arange(1.0, 9.0)
    outs = []
    for scale in (1.0, 100.0):
        x = torch.linspace(-1, 1, 8)
        LARSStep(x, layers, eta=0.1).step(x, g * scale, 1.0)
        outs.append(x)
    torch.testing.assert_close(outs[0], outs[1])


def test_lars_step_needs_no_host_sync():
    """Meta tensors have no values: any .item(), float() or comparison on a norm fails on them,
    as it would make a GPU step wait twice per layer."""
    from hpcopt.optim.local import LARSStep

    x, g = torch.randn(20, device="meta"), torch.randn(20, device="meta")
    LARSStep(x, [(0, 7), (7, 20)], eta=0.1, momentum=0.9, weight_decay=0.1).step(x, g, 0.1)


@pytest.mark.parametrize("local", ["sgd", "adamw", "sam", "lars", "entropy-sgd"])
def test_a_local_step_reads_nothing_from_the_device(monkeypatch, local):
    """A GPU would wait for every kernel queued so far at any read; the loss stays on the device
    for StepLosses to read a step later."""
    t, _ = trainer(local=local, langevin_steps=3, momentum=0.9)
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name: reads.append(_n) or _f(self, *a))
    for step in range(3):
        loss = t.gradient(step)
        t.apply(0.1)
    assert reads == [] and isinstance(loss, torch.Tensor) and loss.dim() == 0


def test_a_user_loss_of_shape_one_gives_a_scalar():
    """A model's own loss(x, y) of shape [1] backpropagates; the step's loss must still be 0-d
    (the synchronous sum and a GPU's page-locked copy take a scalar)."""
    t, _ = trainer()
    plain = t.module.loss
    t.module.loss = lambda x, y: plain(x, y).reshape(1)
    loss = t.gradient(0)
    assert loss.shape == () and torch.isfinite(loss)


def test_step_losses_are_read_one_step_late():
    from hpcopt.roles.local import StepLosses

    losses = StepLosses(torch.device("cpu"))
    assert losses.take() is None and losses.push(0, torch.tensor(2.5)) is None
    assert losses.push(1, torch.tensor(float("nan")))[0] == 0
    step, value = losses.take()
    assert step == 1 and np.isnan(value) and losses.take() is None
    losses.push(2, torch.tensor(1.0))
    losses.clear()  # a restart from the center forgets the loss of the overwritten parameters
    assert losses.take() is None


def test_entropy_sgd_trainer_resumes_exactly():
    """The scope gamma_t and the Langevin noise generator are part of a worker's saved state."""
    noisy = {"local": "entropy-sgd", "langevin_steps": 2, "langevin_noise": 0.1, "gamma1": 0.5}
    t, flat = trainer(**noisy)
    for step in range(6):
        t.gradient(step)
        t.apply(0.1)
    whole = flat.params.clone()
    t, flat = trainer(**noisy)
    for step in range(3):
        t.gradient(step)
        t.apply(0.1)
    state, params = t.state_dict(), flat.params.clone()
    t, flat = trainer(**noisy)
    flat.params.copy_(params)
    t.load_state_dict(state)
    assert t.entropy.t == 3
    for step in range(3, 6):
        t.gradient(step)
        t.apply(0.1)
    assert torch.equal(flat.params, whole)


def test_divergence_guard_ignores_spikes_and_catches_explosions():
    """Issue 12, item 16: a resumed (low) reference plus the ordinary spikes of a constant-lr run
    must not count as divergence; a sustained or mean excess, or NaN, must."""
    from hpcopt.roles.worker import DivergenceGuard

    guard = DivergenceGuard(10.0, reference=0.1)  # as restored from a trained worker's saved state
    for loss in [0.03, 0.02, 4.7, 0.03, 2.7, 0.04, 0.03, 3.1, 0.02]:  # peaks as measured in a real run
        assert guard.step(loss) is None
    assert guard.exchange(sum([0.03, 4.7, 0.03, 0.02, 0.03, 0.04, 0.05, 0.03]) / 8) is None
    assert guard.step(float("nan")) is not None
    exploding = DivergenceGuard(10.0)
    assert exploding.step(2.3) is None and exploding.reference == 2.3  # the very first loss
    assert [exploding.step(x) is None for x in (50.0, 3e3, 4e16)] == [True, True, False]
    assert DivergenceGuard(10.0, reference=2.3).exchange(1e6) is not None  # huge but finite: not sent


def test_the_divergence_reference_is_the_runs_untrained_loss_for_every_worker():
    """A joiner or a worker resumed without its state starts from a trained center; its guard must
    measure against the run's untrained loss, not against its own (far lower) first loss, or the
    ordinary noise of a constant-lr run resets it (seen in the chaos benchmark: a joined worker
    reset three times and dropped, limit 0.21)."""
    cfg = C.load(None, {"model.name": "quadratic:model", "run.seed": "5"})
    data = quadratic.noiseless()
    torch.manual_seed(5)
    untrained = FlatModel(quadratic.model())
    fresh = LocalTrainer(cfg, 0, untrained, data)
    torch.manual_seed(123)  # another process's RNG state
    trained = FlatModel(quadratic.model())
    trained.params.copy_(torch.from_numpy(quadratic.optimum()))  # a joiner, at the trained center
    joiner = LocalTrainer(cfg, 7, trained, data)
    x = untrained.params.detach().numpy().astype(np.float64)
    expected = 0.5 * (H * (x - XSTAR) ** 2).sum()
    assert fresh.initial_loss() == pytest.approx(expected, rel=1e-5)
    assert joiner.initial_loss() == fresh.initial_loss() > 100 * float(joiner.module.loss(
        torch.from_numpy(data["x_train"][:10]), None).detach())
    assert torch.equal(trained.params, torch.from_numpy(quadratic.optimum()))  # untouched


def test_a_gpu_workers_warm_up_changes_nothing_of_the_training():
    """LocalTrainer.warm_up (run before the liveness clock on a GPU; the same code on the CPU
    here): a forward and backward of the training model itself, after which parameters,
    BatchNorm statistics, the module's mode, every RNG and the gradients are as they were."""
    cfg = C.load(None, {"data.batch_size": "32"})
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv1d(1, 4, 5), torch.nn.BatchNorm1d(4), torch.nn.Flatten(),
                                 torch.nn.Dropout(0.5), torch.nn.Linear(4 * 36, 10))
    module.loss = lambda x, y: torch.nn.functional.cross_entropy(module(x.unsqueeze(1)), y)
    flat = FlatModel(module)
    rng = np.random.default_rng(0)
    data = {"x_train": rng.standard_normal((64, 40)).astype(np.float32), "y_train": rng.integers(0, 10, 64),
            "x_test": rng.standard_normal((8, 40)).astype(np.float32), "y_test": rng.integers(0, 10, 8)}
    t = LocalTrainer(cfg, 0, flat, data)
    params, buffers = flat.params.clone(), [b.clone() for b in module.buffers()]
    rng_state = torch.get_rng_state()
    t.warm_up()
    assert torch.equal(flat.params, params) and all(torch.equal(a, b) for a, b in zip(module.buffers(), buffers))
    assert torch.equal(torch.get_rng_state(), rng_state) and module.training
    assert not flat.grads.any()


@pytest.mark.parametrize("saved_kind,resumed_kind,tag", [("sgd", "adamw", True), ("adamw", "sgd", True),
                                                         ("sgd", "adamw", False)])
def test_a_resume_with_another_local_step_starts_that_step_fresh_instead_of_crashing(saved_kind, resumed_kind, tag):
    """`--resume RUN --train.local adamw` of a run trained with SGD crashed every worker with
    KeyError: 'm'. The worker keeps its data order and says why its local step starts fresh;
    states saved before the kind was recorded (tag False) fail on their keys, with the same result."""
    old, _ = trainer(local=saved_kind)
    for s in range(3):
        old.gradient(s)
        old.apply(0.1)
    state = old.state_dict()
    if not tag:
        del state["local_kind"]
    new, _ = trainer(local=resumed_kind)
    fresh = new.local.state_dict()
    note = new.load_state_dict(state)
    assert note is not None and "starts fresh" in note, note
    assert new.gen.get_state().equal(state["gen"])  # the data order is resumed
    for k, v in new.local.state_dict().items():  # the local step's state is the initial one
        assert torch.equal(v, fresh[k]) if isinstance(v, torch.Tensor) else v == fresh[k], k
    new.gradient(3)
    new.apply(0.1)  # and it steps


def test_a_resume_with_the_same_local_step_takes_its_state_silently():
    old, _ = trainer(local="adamw")
    old.gradient(0)
    old.apply(0.1)
    new, _ = trainer(local="adamw")
    assert new.load_state_dict(old.state_dict()) is None
