"""The analysis math against references computed here: an exact Hessian
(torch.autograd.functional.hessian) for eigenvalues, trace and HVPs; NumPy for PCA; brute force
for epsilon-sharpness, filter normalisation, barriers and path lengths. No MPI."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from hpcopt.analyze import curvature as K
from hpcopt.analyze import landscape as L
from hpcopt.analyze import pca as PCA
from hpcopt.analyze import trajectory as T
from hpcopt.analyze.objective import Objective, part_of, subsample
from hpcopt.models import MLP, FlatModel

torch.set_num_threads(1)  # ranks and other jobs share the cores; threads only contend


def small_problem(seed=0, n=120):
    """An MLP of 8 -> 12 -> 3 (147 parameters) at a non-trivial point, on random data."""
    torch.manual_seed(seed)
    model = MLP(input_size=8, classes=3, hidden=[12])
    flat = FlatModel(model)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return flat, x, y


def exact_hessian(flat, x, y, w):
    layout = flat.layout()

    def loss(v):
        params = {n: v[o:o + int(np.prod(s))].view(s) for n, s, o in zip(layout["names"], layout["shapes"], layout["offsets"])}
        return F.cross_entropy(functional_call(flat.module, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, w.clone()).double().numpy()


@pytest.fixture(scope="module")
def problem():
    flat, x, y = small_problem()
    w = flat.params.clone()
    H = exact_hessian(flat, x, y, w)
    obj = Objective(flat.module, flat.layout(), x, y, batch=50)  # 3 batches: the sum over batches is exercised
    return obj, w, H


def test_hvp_equals_exact_hessian_times_v(problem):
    obj, w, H = problem
    v = torch.randn(len(w), generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(obj.hvp(w, v).numpy(), H @ v.double().numpy(), rtol=1e-4, atol=1e-5)


def test_weighted_parts_sum_to_the_whole(problem):
    obj, w, _ = problem
    flat, x, y = small_problem()
    v = torch.randn(len(w), generator=torch.Generator().manual_seed(4))
    total = torch.zeros_like(w)
    loss_total = 0.0
    for r in range(3):
        s = part_of(len(x), r, 3)
        part = Objective(flat.module, flat.layout(), x[s], y[s], weight=len(x[s]) / len(x))
        total += part.hvp(w, v)
        loss_total += part.loss_grad(w)[0]
    np.testing.assert_allclose(total.numpy(), obj.hvp(w, v).numpy(), rtol=1e-4, atol=1e-6)
    assert loss_total == pytest.approx(F.cross_entropy(flat.module(x), y).item(), rel=1e-5)


def test_lanczos_top_eigenvalues_match_the_exact_spectrum(problem):
    obj, w, H = problem
    exact = np.sort(np.linalg.eigvalsh(H))[::-1]
    eig = K.top_eigenvalues(lambda v: obj.hvp(w, v), len(w), k=4, steps=60, seed=1)
    np.testing.assert_allclose(eig.values, exact[:4], rtol=1e-3, atol=1e-5)
    assert np.all(eig.residuals < 1e-3 * exact[0])
    # the reported residual bounds the distance to the nearest true eigenvalue
    for lam, r in zip(eig.values, eig.residuals):
        assert np.min(np.abs(exact - lam)) <= r + 1e-6


def test_hutchinson_trace_within_its_reported_error(problem):
    obj, w, H = problem
    exact = float(np.trace(H))
    tr = K.hutchinson_trace(lambda v: obj.hvp(w, v), len(w), rtol=0.05, max_probes=200, seed=5)
    assert tr.probes >= 10
    assert abs(tr.value - exact) <= 4 * tr.stderr  # ~4 sigma: fails by chance with p < 1e-4
    # the estimator itself: the mean of z^T H z over its samples
    assert tr.value == pytest.approx(np.mean(tr.samples))


def test_slq_density_is_a_probability_density_with_the_right_mean(problem):
    obj, w, H = problem
    d = K.slq_density(lambda v: obj.hvp(w, v), len(w), runs=2, steps=30, seed=2, points=4000)
    np.testing.assert_allclose(d.weights.sum(axis=1), 1.0, rtol=1e-6)
    assert np.trapezoid(d.density, d.grid) == pytest.approx(1.0, rel=1e-2)
    # Gauss quadrature is exact for low moments: sum_i tau_i theta_i^k = q^T H^k q (q the
    # normalised Rademacher start of each run, drawn as slq_density draws them)
    gen = torch.Generator().manual_seed(2)
    for r in range(2):
        z = (torch.randint(0, 2, (len(w),), generator=gen, dtype=torch.float64) * 2 - 1).numpy()
        q = z / np.linalg.norm(z)
        for k in (1, 2):
            assert (d.weights[r] * d.nodes[r] ** k).sum() == pytest.approx(q @ np.linalg.matrix_power(H, k) @ q, rel=1e-3)
    exact = np.linalg.eigvalsh(H)
    assert d.nodes.max() == pytest.approx(exact.max(), rel=1e-3)


def test_epsilon_sharpness_on_a_quadratic_matches_brute_force():
    A = torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    c = torch.tensor([0.2, -0.1, 0.05], dtype=torch.float64)

    def f(z):
        return float(0.5 * (A * (z - c) ** 2).sum())

    def loss_grad(z):
        z = z.double()
        return f(z), (A * (z - c)).float()

    x = torch.tensor([1.0, -2.0, 0.5])
    eps = 0.05
    s = K.epsilon_sharpness(loss_grad, x, epsilon=eps, steps=20)
    box = eps * (x.abs() + 1)
    best = max(f(x.double() + torch.tensor(signs, dtype=torch.float64) * box.double())
               for signs in itertools.product((-1, 1), repeat=3))  # convex: the max is at a corner
    f0 = f(x.double())
    assert s.value == pytest.approx(100 * (best - f0) / (1 + f0), rel=1e-5)


def test_pca_matches_the_covariance_eigendecomposition():
    rng = np.random.default_rng(0)
    path = np.cumsum(rng.standard_normal((40, 30)) * np.linspace(3, 0.1, 30), axis=0)
    origin = path[-1]
    fit = PCA.fit(path, origin, k=3)
    D = path - origin
    C = np.cov(D.T, bias=True)
    vals, vecs = np.linalg.eigh(C)
    order = np.argsort(vals)[::-1]
    np.testing.assert_allclose(fit.explained, vals[order][:3] / vals.sum(), rtol=1e-8)
    for k in range(3):
        assert abs(abs(fit.components[k] @ vecs[:, order[k]]) - 1) < 1e-8
    coords = fit.project(path)
    np.testing.assert_allclose(coords, D @ fit.components.T)
    assert np.all(coords[0] <= 0)  # signs fixed: the path starts on the negative side
    np.testing.assert_allclose(coords[-1], 0, atol=1e-12)


def test_filter_normalised_direction():
    flat, _, _ = small_problem()
    theta = flat.params.numpy().astype(np.float64)
    layout = flat.layout()
    d = L.filter_normalized(theta, layout, seed=3)
    for shape, off in zip(layout["shapes"], layout["offsets"]):
        n = int(np.prod(shape))
        if len(shape) == 1:
            assert np.all(d[off:off + n] == 0)
        else:
            dn = np.linalg.norm(d[off:off + n].reshape(shape[0], -1), axis=1)
            tn = np.linalg.norm(theta[off:off + n].reshape(shape[0], -1), axis=1)
            np.testing.assert_allclose(dn, tn, rtol=1e-10)
    assert np.array_equal(d, L.filter_normalized(theta, layout, seed=3))
    assert not np.array_equal(d, L.filter_normalized(theta, layout, seed=4))
    d1 = L.filter_normalized(theta, layout, seed=3, one_d="filter")
    b = layout["offsets"][1]
    assert np.linalg.norm(d1[b:b + 12]) == pytest.approx(np.linalg.norm(theta[b:b + 12]))


def test_grid_point_is_row_major_on_a_non_square_grid():
    origin = np.zeros(3)
    dirs = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    xs, ys = np.array([-1.0, 0.0, 1.0, 2.0]), np.array([10.0, 20.0])
    for iy, ix in itertools.product(range(2), range(4)):
        p = L.grid_point(origin, dirs, xs, ys, iy * 4 + ix)
        assert p[0] == xs[ix] and p[1] == ys[iy]


def test_barrier():
    ts = np.linspace(0, 1, 11)
    losses = 1 - ts + 0.5 * np.sin(np.pi * ts)   # chord from 1 to 0, bump of 0.5 in the middle
    b = L.barrier(ts, losses)
    assert b["barrier"] == pytest.approx(0.5) and b["t_max"] == pytest.approx(0.5)
    assert b["barrier_over_endpoints"] == pytest.approx(max(losses) - 1)
    with pytest.raises(ValueError):
        L.barrier(np.array([0.2, 0.5]), np.array([1.0, 2.0]))


def test_path_length_and_helpers():
    pts = np.array([[0.0, 0], [3, 4], [3, 0]])
    np.testing.assert_allclose(T.path_length(pts), [0, 5, 9])
    assert T.displacement(pts) == pytest.approx(3)
    np.testing.assert_array_equal(T.nearest_rows(np.array([0.0, 1, 2]), np.array([0.4, 0.6, 5, -1])), [0, 1, 2, 0])
    np.testing.assert_allclose(T.smooth(np.array([1.0, 3, 5, 7]), 2), [1, 2, 4, 6])
    assert subsample(10, 0, 1).tolist() == list(range(10))
    s = subsample(100, 7, 1)
    assert len(set(s)) == 7 and np.all(np.diff(s) > 0) and np.array_equal(s, subsample(100, 7, 1))
    assert [part_of(10, r, 3) for r in range(3)] == [slice(0, 3), slice(3, 6), slice(6, 10)]


def test_full_float32_works_after_a_program_used_the_new_tf32_api():
    """A user's program set TF32 through torch's new fp32_precision (torch >= 2.9): reading the
    legacy allow_tf32 flags would raise, so the analysis's GPU settings must use the new ones,
    and give the user's settings back."""
    import torch

    from hpcopt.analyze.api import full_float32

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has only the legacy flags")
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        with full_float32():
            assert matmul.fp32_precision == "ieee" and torch.backends.cudnn.conv.fp32_precision != "tf32"
            # a user's model or torch itself may read the legacy flags meanwhile
            assert not matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            with torch.backends.cudnn.flags():
                pass
            assert torch.backends.cudnn.deterministic
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before
