"""Update rules of the EASGD family and the baselines against NumPy references (no MPI)."""

import numpy as np
import pytest
import torch

from hpcopt.optim.grawa import inverse_norm_weights, layer_norms, layerwise_center_, shard_segments, weighted_center_
from hpcopt.optim.local import AdamWStep, EntropySGD, lars_trust_ratios, sam_perturbation
from hpcopt.optim.lsgd import leader, loss_average, pull_
from hpcopt.optim.sync import DiLoCoOuter, local_sgd_should_average
from references import entropy_sgd_step

rng = np.random.default_rng(0)


# --- GRAWA -------------------------------------------------------------------------------------
def test_grawa_weights_sum_to_one_and_favour_the_flatter_worker():
    norms = torch.tensor([0.5, 1.0, 4.0])
    w = inverse_norm_weights(norms)
    ref = (1 / norms.numpy()) / (1 / norms.numpy()).sum()
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-6)
    assert w.sum().item() == pytest.approx(1.0)
    assert w[0] > w[1] > w[2]  # smallest gradient norm (flattest) weighs most


def test_grawa_zero_norm_takes_the_weight_without_dividing_by_zero():
    w = inverse_norm_weights(torch.tensor([0.0, 2.0, 0.0]))
    np.testing.assert_allclose(w.numpy(), [0.5, 0.0, 0.5])
    with pytest.raises(ValueError):
        inverse_norm_weights(torch.tensor([1.0, float("nan")]))


def test_mgrawa_center_matches_numpy():
    xs = rng.standard_normal((4, 50)).astype(np.float32)
    norms = np.array([1.0, 2.0, 0.5, 3.0], np.float32)
    w = inverse_norm_weights(torch.from_numpy(norms))
    ref = ((1 / norms) / (1 / norms).sum()) @ xs
    got = weighted_center_(torch.empty(50), list(torch.from_numpy(xs)), w.tolist()).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_lgrawa_center_is_a_weighted_average_per_layer():
    xs = rng.standard_normal((3, 10)).astype(np.float32)
    gs = rng.standard_normal((3, 10)).astype(np.float32)
    layers = [(0, 4), (4, 10)]
    norms = torch.stack([layer_norms(torch.from_numpy(g), layers) for g in gs])
    w = inverse_norm_weights(norms)
    np.testing.assert_allclose(w.sum(0).numpy(), [1, 1], rtol=1e-6)
    center = layerwise_center_(torch.empty(10), list(torch.from_numpy(xs)), w, shard_segments(layers, 0, 10)).numpy()
    for l, (lo, hi) in enumerate(layers):
        n = np.array([np.linalg.norm(g[lo:hi]) for g in gs])
        ref = ((1 / n) / (1 / n).sum()) @ xs[:, lo:hi]
        np.testing.assert_allclose(center[lo:hi], ref, rtol=1e-5, atol=1e-6)


# --- LSGD --------------------------------------------------------------------------------------
def test_lsgd_leader_is_the_lowest_average_and_is_not_pulled():
    avg = {}
    for w, losses in {0: [2.0, 1.0], 1: [0.5, 0.6], 2: [3.0, float("nan")]}.items():
        for loss in losses:
            avg[w] = loss_average(avg.get(w), loss, decay=0.5)
    assert avg[0] == pytest.approx(1.5) and avg[1] == pytest.approx(0.55)
    assert leader(avg) == 1  # worker 2's NaN average never leads
    x_lead = torch.from_numpy(rng.standard_normal(8).astype(np.float32))
    x = torch.from_numpy(rng.standard_normal(8).astype(np.float32))
    want = x.numpy() - 0.2 * (x.numpy() - x_lead.numpy())
    np.testing.assert_allclose(pull_(x.clone(), x_lead, 0.2).numpy(), want, rtol=1e-5)
    with pytest.raises(ValueError):
        leader({0: float("nan")})


# --- synchronous baselines ---------------------------------------------------------------------
def test_local_sgd_schedule_with_post_local_switch():
    assert [local_sgd_should_average(s, 4) for s in range(6)] == [True, False, False, False, True, False]
    assert all(local_sgd_should_average(s, 4, switch_step=10) for s in range(10))
    assert [local_sgd_should_average(s, 4, switch_step=10) for s in (11, 14)] == [False, True]


def test_diloco_outer_step_matches_numpy_nesterov():
    theta0 = rng.standard_normal(30)
    avgs = [theta0 - rng.standard_normal(30) * 0.1 for _ in range(3)]
    theta = torch.from_numpy(theta0.copy())
    outer = DiLoCoOuter(theta, lr=0.7, momentum=0.9)
    ref, buf = theta0.copy(), None
    for avg in avgs:
        outer.step(theta, torch.from_numpy(avg))
        delta = ref - avg
        buf = delta if buf is None else 0.9 * buf + delta
        ref = ref - 0.7 * (delta + 0.9 * buf)
        np.testing.assert_allclose(theta.numpy(), ref, rtol=1e-10)


def test_diloco_with_outer_lr_1_and_no_momentum_is_plain_averaging():
    theta = torch.zeros(5, dtype=torch.float64)
    avg = torch.arange(5, dtype=torch.float64)
    DiLoCoOuter(theta, lr=1.0, momentum=0.0).step(theta, avg)
    assert torch.equal(theta, avg)


# --- local steps -------------------------------------------------------------------------------
def test_adamw_matches_torch():
    torch.manual_seed(0)
    ref_p = torch.randn(40, requires_grad=True)
    p = ref_p.detach().clone()
    ref = torch.optim.AdamW([ref_p], lr=1e-2, weight_decay=0.05)
    mine = AdamWStep(p, weight_decay=0.05)
    for _ in range(6):
        g = torch.randn(40)
        ref_p.grad = g.clone()
        ref.step()
        mine.step(p, g.clone(), 1e-2)
    np.testing.assert_allclose(p.numpy(), ref_p.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_sam_perturbation_has_length_rho_along_the_gradient():
    g = torch.tensor([3.0, 4.0])
    e = sam_perturbation(g, 0.05)
    assert e.norm().item() == pytest.approx(0.05) and torch.allclose(e / e.norm(), g / 5)


def test_lars_trust_ratios():
    params = torch.tensor([3.0, 4.0, 0.0, 0.0])
    grad = torch.tensor([0.0, 1.0, 1.0, 1.0])
    r = lars_trust_ratios(params, grad, [(0, 2), (2, 4)], eta=0.01, weight_decay=0.1)
    assert r[0].item() == pytest.approx(0.01 * 5 / (1 + 0.1 * 5))
    assert r[1].item() == 1.0  # zero weights: no scaling


def test_entropy_sgd_matches_a_numpy_reference_without_noise():
    h = np.linspace(0.5, 2.0, 6)

    def grad(x):
        return h * x

    x0 = rng.standard_normal(6)
    opt = EntropySGD(langevin_steps=4, langevin_lr=0.1, gamma0=0.5, gamma1=0.1, noise=0.0, alpha=0.75)
    x = torch.from_numpy(x0.copy())
    ref = x0.copy()
    for t in range(3):
        opt.step(x, lambda p: torch.from_numpy(grad(p.numpy())), lr=0.5)
        ref = entropy_sgd_step(ref, grad, 0.5 * 1.1 ** t, 0.5, 4, 0.1)
        np.testing.assert_allclose(x.numpy(), ref, rtol=1e-10)
    assert np.linalg.norm(x.numpy()) < np.linalg.norm(x0)  # moved toward the minimum at 0


def test_entropy_sgd_noise_generator_is_made_on_the_parameters_device_and_saved():
    def noisy(**kw):
        return EntropySGD(langevin_steps=2, noise=0.5, seed=11, **kw)

    def run(opt, steps=2):
        x = torch.zeros(5)
        for _ in range(steps):
            opt.step(x, torch.zeros_like, lr=1.0)
        return x

    lazy, eager = noisy(), noisy(device="cpu")
    assert lazy.gen is None and eager.gen.device.type == "cpu"
    assert torch.equal(run(lazy), run(eager))  # the same seed either way
    assert lazy.gen.device == torch.device("cpu")
    # the noise is the seeded stream of a plain CPU generator, as before generators followed the device:
    # one Langevin step from 0 with zero gradient gives x' = sqrt(eta') eps N, mu = alpha x'
    one = EntropySGD(langevin_steps=1, noise=0.5, seed=11)
    x_prime = 0.1 ** 0.5 * 0.5 * torch.randn(5, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(one.gradient(torch.zeros(5), torch.zeros_like), -one.gamma0 * 0.75 * x_prime)
    # a saved state goes on where it stopped: the generator's state is a CPU ByteTensor
    state = lazy.state_dict()
    assert state["t"] == 2 and state["generator"]["gen"].device.type == "cpu"
    assert state["generator"]["gen"].dtype == torch.uint8 and state["generator"]["device"] == "cpu"
    after = run(lazy)
    for resumed in (noisy(), noisy(device="cpu")):  # made later, or now
        resumed.load_state_dict(state)
        assert resumed.t == 2 and torch.equal(run(resumed), after)
    # a state from another kind of device does not fit this generator: it starts from the seed
    fresh = noisy()
    fresh.load_state_dict({"t": 2, "generator": {"device": "cuda", "gen": torch.zeros(16, dtype=torch.uint8)}})
    seeded = noisy()
    seeded.t = 2
    assert torch.equal(run(fresh), run(seeded)) and fresh.t == 4


def test_two_level_lsgd_target_applies_both_pulls():
    from hpcopt.optim.lsgd import group_leader, pull_target

    rng = np.random.default_rng(3)
    x, xl, xg = (torch.from_numpy(rng.standard_normal(6)) for _ in range(3))
    lam, lam_g = 0.3, 0.2
    m, rate = pull_target([(lam, xl), (lam_g, xg)])
    want = x.numpy() - lam * (x.numpy() - xl.numpy()) - lam_g * (x.numpy() - xg.numpy())
    assert rate == pytest.approx(lam + lam_g)
    np.testing.assert_allclose(pull_(x.clone(), m, rate).numpy(), want, rtol=1e-12)
    one, r1 = pull_target([(lam, xl)])
    assert one is xl and r1 == lam and pull_target([]) == (None, 0.0)  # one target is sent as it is
    losses = {0: 1.0, 1: 0.5, 2: 0.2, 3: 0.9}
    groups = {0: "a", 1: "a", 2: "b", 3: "b"}
    assert group_leader(losses, groups, 0) == 1 and group_leader(losses, groups, 3) == 2


def test_lgrawa_shard_segments_cover_every_layer_exactly_once():
    from hpcopt.comm.protocol import shard_bounds
    from hpcopt.optim.grawa import layer_bounds, shard_segments

    layout = {"names": ["a", "b", "c"], "shapes": [[3, 4], [5], [2, 3]], "offsets": [0, 12, 17]}
    layers = layer_bounds(layout)
    assert layers == [(0, 12), (12, 17), (17, 23)]
    for servers in (1, 2, 3, 5):
        covered = np.zeros(23, dtype=int)
        for lo, hi in shard_bounds(23, servers):
            for layer, a, b in shard_segments(layers, lo, hi):
                assert layers[layer][0] <= lo + a < lo + b <= layers[layer][1]
                covered[lo + a:lo + b] += 1
        assert (covered == 1).all()
