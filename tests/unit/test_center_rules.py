"""The center rules the servers run (hpcopt.optim.center), replayed against NumPy (no MPI).

Each test drives a rule the way a server does, a shard at a time and chunk by chunk, and
compares the center and the worker's new parameters with a float64 NumPy replay of the paper's
update."""

import math

import numpy as np
import pytest
import torch

from hpcopt.optim.center import ElasticRule, GrawaRule, LeaderRule, make_rule

rng = np.random.default_rng(1)
P = 23
CHUNKS = [(0, 5), (5, 16), (16, 23)]


def exchange(rule, wid, x, **report):
    """A server's exchange: report, then every chunk; returns the worker's new parameters."""
    rule.report(wid, loss=report.get("loss", 1.0), grad_norm=report.get("grad_norm", math.nan),
                exchange=report.get("k", 1), layer_norms=report.get("layer_norms"))
    xt = torch.from_numpy(x.astype(np.float32).copy())
    for a, b in CHUNKS:
        rule.exchange_(wid, xt[a:b], a, b)
    return xt.numpy()


def test_elastic_rule_replays_algorithm_1():
    c0 = rng.standard_normal(P)
    rule, c = ElasticRule(torch.from_numpy(c0.astype(np.float32)), 0.3), c0.copy()
    for k in range(12):
        x = rng.standard_normal(P)
        got = exchange(rule, k % 3, x)
        d = 0.3 * (x - c)
        want, c = x - d, c + d
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rule.center.numpy(), c, rtol=1e-5, atol=1e-6)


def test_mgrawa_rule_averages_latest_parameters_by_inverse_gradient_norm():
    c0 = rng.standard_normal(P)
    rule = GrawaRule(torch.from_numpy(c0.astype(np.float32)), 0.5)
    latest, norms = {}, {}
    for w in range(3):
        rule.add(w)
        latest[w] = c0.copy()
    for k in range(10):
        w = k % 3
        x, norm = rng.standard_normal(P), float(rng.uniform(0.1, 3))
        got = exchange(rule, w, x, grad_norm=norm)
        latest[w], norms[w] = x, norm
        inv = {v: 1 / n for v, n in norms.items()}
        c = sum(inv[v] * latest[v] for v in sorted(inv)) / sum(inv.values())
        np.testing.assert_allclose(rule.center.numpy(), c, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got, x + 0.5 * (c - x), rtol=1e-5, atol=1e-6)


def test_grawa_worker_without_a_finite_norm_does_not_count_and_nobody_yet_leaves_the_center():
    c0 = rng.standard_normal(P).astype(np.float32)
    rule = GrawaRule(torch.from_numpy(c0.copy()), 0.5)
    rule.add(0)
    rule.add(1)
    x = rng.standard_normal(P)
    exchange(rule, 0, x, grad_norm=math.nan)  # e.g. it left before its first tau steps
    np.testing.assert_array_equal(rule.center.numpy(), c0)
    y = rng.standard_normal(P)
    exchange(rule, 1, y, grad_norm=2.0)
    np.testing.assert_allclose(rule.center.numpy(), y, rtol=1e-6)  # only worker 1 counts
    exchange(rule, 0, x, grad_norm=math.inf)
    np.testing.assert_allclose(rule.center.numpy(), y, rtol=1e-6)
    rule.forget(1)
    assert 1 not in rule.held() and rule.worker_scalars(1)[1] != rule.worker_scalars(1)[1]


def test_lgrawa_rule_on_a_shard_that_cuts_a_layer():
    layers = [(0, 10), (10, 30), (30, 40)]
    lo = 17  # this server's shard is [17, 40): the middle layer is cut
    c0 = rng.standard_normal(P)
    rule = make_rule("lgrawa", torch.from_numpy(c0.astype(np.float32)), alpha=0.4, layers=layers, lo=lo)
    latest, norms = {}, {}
    for w in range(2):
        rule.add(w)
        latest[w] = c0.copy()
    for k in range(6):
        w = k % 2
        x, n = rng.standard_normal(P), rng.uniform(0.1, 3, size=3)
        got = exchange(rule, w, x, layer_norms=n)
        latest[w], norms[w] = x, n
        c = np.empty(P)
        for l, (a, b) in enumerate(layers):
            a, b = max(a, lo) - lo, min(b, lo + P) - lo
            if a < b:
                inv = {v: 1 / norms[v][l] for v in norms}
                c[a:b] = sum(inv[v] * latest[v][a:b] for v in sorted(inv)) / sum(inv.values())
        np.testing.assert_allclose(rule.center.numpy(), c, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got, x + 0.4 * (c - x), rtol=1e-5, atol=1e-6)


def test_lsgd_rule_leads_with_the_lowest_loss_and_pulls_the_others_toward_held_leaders():
    rule = LeaderRule(torch.zeros(P), 0.3, loss_decay=0.5)
    for w in range(3):
        rule.add(w, group="node")
    v = rule.verdict(0, loss=1.0, grad_norm=1.0, exchange=1, sample=False)
    assert v.leads and v.send and v.target is None  # the only report: it leads and uploads
    x0 = torch.from_numpy(rng.standard_normal(P).astype(np.float32))
    rule.upload(0, x0)
    np.testing.assert_array_equal(rule.center.numpy(), x0.numpy())  # the center is the latest upload
    v = rule.verdict(1, loss=2.0, grad_norm=1.0, exchange=1, sample=False)
    assert not v.leads and not v.send and v.leader == 0 and v.rate == pytest.approx(0.3)
    assert v.target is rule.held()[0]  # sent as it is, no copy
    v = rule.verdict(1, loss=0.1, grad_norm=1.0, exchange=2, sample=True)  # average (2 + 0.1) / 2 = 1.05 > 1
    assert not v.leads and v.send and v.leader == 0  # sends only because a snapshot is due
    v = rule.verdict(2, loss=0.2, grad_norm=1.0, exchange=1, sample=False)
    assert v.leads and v.target is None
    rule.upload(2, torch.ones(P))
    v = rule.verdict(0, loss=5.0, grad_norm=1.0, exchange=2, sample=False)  # 0 no longer leads: drops what it held
    assert not v.leads and v.leader == 2 and 0 not in rule.held()
    assert rule.worker_scalars(0)[0] == pytest.approx(3.0)


def test_two_level_lsgd_adds_the_global_pull_on_global_exchanges():
    rule = LeaderRule(torch.zeros(P), 0.3, lam_g=0.2, global_every=2)
    for w, g in ((0, "a"), (1, "a"), (2, "b")):
        rule.add(w, group=g)
    for w, loss in ((0, 0.5), (2, 0.1)):
        assert rule.verdict(w, loss=loss, grad_norm=1.0, exchange=1, sample=False).leads
        rule.upload(w, torch.full((P,), float(w)))
    v = rule.verdict(1, loss=1.0, grad_norm=1.0, exchange=2, sample=False)  # local leader 0, global 2
    assert (v.leader, v.global_leader) == (0, 2) and v.rate == pytest.approx(0.5)
    np.testing.assert_allclose(v.target.numpy(), (0.3 * 0 + 0.2 * 2) / 0.5)
    v = rule.verdict(1, loss=1.0, grad_norm=1.0, exchange=3, sample=False)  # not a global exchange
    assert (v.leader, v.global_leader) == (0, -1) and v.rate == pytest.approx(0.3)


def test_every_asynchronous_method_has_a_rule():
    from hpcopt.config import ASYNC_METHODS

    for m in ASYNC_METHODS:
        assert make_rule(m, torch.zeros(4), alpha=0.1, layers=[(0, 4)]).center.shape == (4,)
    with pytest.raises(ValueError, match="no center rule"):
        make_rule("dp-sgd", torch.zeros(4), alpha=0.1)
