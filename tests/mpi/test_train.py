"""End-to-end training under real `mpirun` with real parallel HDF5, at several world sizes."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from conftest import hpcopt, mpirun

import quadratic  # tests/plugins, also on the ranks' PYTHONPATH

pytestmark = pytest.mark.mpi


def read(path):
    f = h5py.File(path, "r", locking=False)
    return f


def test_one_rank_is_a_clear_error(tmp_path):
    p = mpirun(1, "train", "--out", str(tmp_path / "r"), check=False)
    assert p.returncode == 2
    assert "cannot hold 1 server(s) and at least one worker" in p.stderr


def test_config_error_is_reported_once_under_mpirun(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[easgd]\ntua = 3\n")
    p = mpirun(3, "train", "--config", str(cfg), check=False)
    assert p.returncode != 0
    assert p.stderr.count("unknown key(s) easgd.tua") == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("n,servers", [(2, 1), (4, 2), (6, 1)])  # 6 ranks on 2 cores: oversubscribed
def test_mnist1d_run_writes_a_complete_trajectory(tmp_path, tiny_mnist1d, n, servers):
    p = mpirun(n, "train", *tiny_mnist1d, "--run.servers", str(servers), "--record.worker_every", "2")
    assert "final center test accuracy" in p.stdout
    path = tmp_path / "run" / "trajectory.h5"
    workers = n - servers
    with read(path) as f:
        a = f.attrs
        assert a["format"] == "hpcopt.trajectory" and a["schema_version"] == 3 and a["status"] == "complete"
        assert a["n_servers"] == servers and a["n_workers"] == workers
        P = int(a["n_parameters"])
        assert P == 5210 and f["center/params"].shape[1] == P and f["workers/params"].shape[1] == P
        ex = f["exchanges"][()]
        steps_per_worker = 3 * (4000 // 100)
        per_worker = steps_per_worker // 4  # tau=4, the last exchange is at the final step
        assert len(ex) == workers * per_worker
        assert sorted(np.unique(ex["worker_id"])) == list(range(workers))
        for w in range(workers):
            mine = ex[ex["worker_id"] == w]
            assert mine["exchange"].tolist() == list(range(1, per_worker + 1))
            assert mine["step"].tolist() == [4 * k for k in range(1, per_worker + 1)]
        assert np.all(np.diff(ex["time"]) >= 0) and np.all(np.isfinite(ex["train_loss"]))
        # center snapshots: every 10 exchanges from 0, plus the final center
        meta = f["center/meta"][()]
        assert meta["exchanges"][0] == 0 and meta["exchanges"][-1] == len(ex)
        assert f["center/params"].shape[0] == len(meta)
        np.testing.assert_array_equal(meta["exchanges"][:-1] % 10, 0)
        # the initial center is the model every rank started from; training moved it
        c = f["center/params"]
        assert np.all(np.isfinite(c[-1])) and not np.allclose(c[0], c[-1])
        wmeta = f["workers/meta"][()]
        assert len(wmeta) == workers * (per_worker // 2) and np.all(wmeta["exchange"] % 2 == 0)
        ev = f["evals"][()]
        assert len(ev) >= 1 and ev["exchanges"][-1] == len(ex)
        assert 0.2 < ev["test_accuracy"][-1] <= 1.0  # 3 epochs of the CNN: twice chance or better
        kinds = [k.decode() for k in f["events"]["kind"]]
        assert kinds[0] == "start" and kinds[-1] == "end"
        assert kinds.count("join") == workers and kinds.count("leave") == workers
        assert "[train]" in a["config"] and json.loads(f["model"].attrs["shapes"])[0] == [25, 1, 5]

    s = json.loads(hpcopt("inspect", "--json", str(path)).stdout)
    for key in ("schema_version", "method", "workers", "exchanges", "center_snapshots",
                "final_center_test_accuracy", "parameters", "wall_seconds"):
        assert key in s
    assert s["workers"] == list(range(workers)) and s["exchanges"] == len(ex) and s["parameters"] == 5210


def test_existing_run_is_not_overwritten(tmp_path, tiny_mnist1d):
    out = tmp_path / "run"
    out.mkdir()
    (out / "trajectory.h5").write_bytes(b"precious")
    p = mpirun(2, "train", *tiny_mnist1d, check=False)
    assert p.returncode == 2 and "already exists" in p.stderr
    assert (out / "trajectory.h5").read_bytes() == b"precious"


@pytest.mark.parametrize("n,servers", [(5, 1), (6, 2)])
def test_center_converges_on_noisy_quadratic(tmp_path, n, servers):
    mpirun(n, "train", "--out", str(tmp_path / "q"), "--model.name", "quadratic:model",
           "--data.name", "quadratic:data", "--run.servers", str(servers), "--train.epochs", "10",
           "--train.lr", "0.2", "--easgd.tau", "4", "--data.batch_size", "100")
    with read(tmp_path / "q" / "trajectory.h5") as f:
        c = f["center/params"]
        start, end = c[0], c[-1]
        assert f.attrs["n_workers"] == n - servers
    xstar = quadratic.optimum()
    assert np.linalg.norm(start - xstar) > 10
    # the noise of the whole training set shifts the empirical optimum by ~1/sqrt(4000) per axis
    assert np.linalg.norm(end - xstar) < 0.05 * np.linalg.norm(start - xstar)
    assert np.linalg.norm(end - xstar) < 0.25


def replay_easgd(exchanges, x0, lr, alpha, h, xstar):
    """NumPy replay of asynchronous EASGD (Algorithm 1) in the recorded serving order, for the
    noiseless quadratic: returns the worker parameters at each exchange and the center after it."""
    x = {}
    steps = {}
    c = x0.astype(np.float64).copy()
    workers_at, centers = [], []
    for row in exchanges:
        w, s = int(row["worker_id"]), int(row["step"])
        xi = x.setdefault(w, x0.astype(np.float64).copy())
        for _ in range(s - steps.get(w, 0)):
            xi -= lr * h * (xi - xstar)
        steps[w] = s
        workers_at.append(xi.copy())
        d = alpha * (xi - c)
        xi -= d
        c += d
        centers.append(c.copy())
    return workers_at, centers


@pytest.mark.parametrize("n,servers,chunk_mb", [(4, 1, 4.0), (5, 2, 20e-6)])  # 20e-6 MB: 5-float chunks
def test_deterministic_mode_records_exactly_what_workers_had(tmp_path, n, servers, chunk_mb):
    out = tmp_path / "d"
    args = ["--out", str(out), "--model.name", "quadratic:model", "--data.name", "quadratic:noiseless",
            "--run.servers", str(servers), "--run.deterministic", "true", "--train.epochs", "6",
            "--train.schedule", "constant", "--train.lr", "0.1", "--easgd.tau", "4",
            "--record.center_every", "1", "--record.worker_every", "1", "--comm.chunk_mb", str(chunk_mb),
            "--run.method", "easgd"]
    p = mpirun(n, "train", *args)
    workers = n - servers
    # one node: every worker exchanges in place, through shared memory (hpcopt.comm.shared)
    assert f"exchanges: all {workers} worker(s) in place through shared memory\n" in p.stdout
    with read(out / "trajectory.h5") as f:
        ex = f["exchanges"][()]
        alpha = float(f.attrs["alpha"])
        centers = f["center/params"][()]
        cmeta = f["center/meta"][()]
        wparams = f["workers/params"][()]
        wmeta = f["workers/meta"][()]
    assert alpha == pytest.approx(0.9 / workers)
    # fixed round-robin serving order
    assert ex["worker_id"].tolist() == list(range(workers)) * (len(ex) // workers)
    x0 = centers[0]
    want_workers, want_centers = replay_easgd(ex, x0, 0.1, alpha, quadratic.curvature(), quadratic.optimum())
    got_workers = {(int(m["worker_id"]), int(m["exchange"])): p for m, p in zip(wmeta, wparams)}
    assert len(got_workers) == len(ex)
    for row, want in zip(ex, want_workers):
        got = got_workers[(int(row["worker_id"]), int(row["exchange"]))]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert cmeta["exchanges"].tolist() == list(range(len(ex) + 1))
    np.testing.assert_allclose(centers[1:], np.array(want_centers), rtol=1e-5, atol=1e-5)

    # bit-reproducible: a second run writes the same numbers, also when every exchange goes over
    # messages instead (the same arithmetic on the same values, only where the bytes are differs)
    p = mpirun(n, "train", *args, "--force", "--comm.shared_memory", "false")
    assert "exchanges: over messages (comm.shared_memory = false)" in p.stdout
    with read(out / "trajectory.h5") as f:
        np.testing.assert_array_equal(f["center/params"][()], centers)
        np.testing.assert_array_equal(f["workers/params"][()], wparams)


def test_all_workers_diverging_ends_the_run_with_a_clear_error(tmp_path):
    p = mpirun(3, "train", "--out", str(tmp_path / "nan"), "--model.name", "quadratic:model",
               "--data.name", "quadratic:data", "--train.lr", "50", "--train.epochs", "5", check=False)
    assert p.returncode != 0
    assert "every worker diverged" in p.stderr and "lower train.lr" in p.stderr
    assert "restarting from the center" in p.stdout


# --- synchronous baselines --------------------------------------------------------------------
QUAD = ["--model.name", "quadratic:model", "--train.schedule", "constant", "--train.lr", "0.1",
        "--train.epochs", "6", "--record.center_every", "1"]


def test_dp_sgd_averages_gradients_exactly(tmp_path):
    """Noiseless gradients are the same on every worker, so DP-SGD on 3 ranks must follow the
    single-process trajectory step by step (a wrong average would not)."""
    for n in (1, 3):
        mpirun(n, "train", "--run.method", "dp-sgd", "--data.name", "quadratic:noiseless", *QUAD,
               "--out", str(tmp_path / f"dp{n}"))
    with read(tmp_path / "dp1" / "trajectory.h5") as f1, read(tmp_path / "dp3" / "trajectory.h5") as f3:
        np.testing.assert_allclose(f3["center/params"][()], f1["center/params"][()], rtol=1e-6, atol=1e-6)
        assert f3.attrs["n_workers"] == 3 and f3.attrs["n_servers"] == 0
        assert len(f3["exchanges"]) == 3 * len(f1["exchanges"]) == 3 * 24  # a row per worker per step
        h, xstar = quadratic.curvature(), quadratic.optimum()
        x = f1["center/params"][0].astype(np.float64)
        for _ in range(24):
            x -= 0.1 * h * (x - xstar)
        np.testing.assert_allclose(f1["center/params"][-1], x, rtol=1e-5, atol=1e-5)


def test_diloco_matches_a_numpy_replay(tmp_path):
    mpirun(2, "train", "--run.method", "diloco", "--data.name", "quadratic:noiseless", *QUAD,
           "--sync.period", "4", "--sync.outer_lr", "0.7", "--sync.outer_momentum", "0.9",
           "--out", str(tmp_path / "dl"))
    with read(tmp_path / "dl" / "trajectory.h5") as f:
        centers = f["center/params"][()]
    h, xstar = quadratic.curvature(), quadratic.optimum()
    theta = centers[0].astype(np.float64)
    buf = None
    for r in range(6):  # 24 steps, an outer step every 4
        x = theta.copy()
        for _ in range(4):
            x -= 0.1 * h * (x - xstar)
        delta = theta - x  # every worker computed the same x: the average is x
        buf = delta if buf is None else 0.9 * buf + delta
        theta = theta - 0.7 * (delta + 0.9 * buf)
        np.testing.assert_allclose(centers[r + 1], theta, rtol=1e-5, atol=1e-5)


def test_local_sgd_converges_on_noisy_quadratic(tmp_path):
    mpirun(4, "train", "--run.method", "local-sgd", "--model.name", "quadratic:model",
           "--data.name", "quadratic:data", "--train.epochs", "10", "--train.lr", "0.2",
           "--sync.period", "4", "--record.worker_every", "2", "--out", str(tmp_path / "ls"))
    with read(tmp_path / "ls" / "trajectory.h5") as f:
        c = f["center/params"]
        start, end = c[0], c[-1]
        assert f["workers/params"].shape[0] > 0 and f.attrs["status"] == "complete"
    xstar = quadratic.optimum()
    assert np.linalg.norm(end - xstar) < 0.05 * np.linalg.norm(start - xstar)
    s = json.loads(hpcopt("inspect", "--json", str(tmp_path / "ls")).stdout)
    assert s["method"] == "local-sgd" and s["workers"] == [0, 1, 2, 3]


def replay_mgrawa(exchanges, x0, lr, alpha, h, xstar):
    """NumPy replay of asynchronous MGRAWA in the recorded serving order, noiseless quadratic:
    the center is the 1/||grad||-weighted average of every worker's latest parameters."""
    x, steps, latest, norms = {}, {}, {}, {}
    workers_at, centers = [], []
    for row in exchanges:
        w, s = int(row["worker_id"]), int(row["step"])
        xi = x.setdefault(w, x0.astype(np.float64).copy())
        for _ in range(s - steps.get(w, 0)):
            g = h * (xi - xstar)
            norm = np.linalg.norm(g)
            xi -= lr * g
        steps[w] = s
        norms[w], latest[w] = norm, xi.copy()  # the norm of the last gradient before the exchange
        workers_at.append(xi.copy())
        inv = {v: 1 / n for v, n in norms.items()}
        c = sum(inv[v] * latest[v] for v in sorted(latest)) / sum(inv.values())
        xi += alpha * (c - xi)
        centers.append(c)
    return workers_at, centers, norms


def deterministic_quadratic(tmp_path, n, servers, chunk_mb, method, *extra):
    """A deterministic run on the noiseless quadratic, everything recorded: exchanges, centers,
    and the worker snapshots keyed by (worker id, exchange)."""
    out = tmp_path / method
    mpirun(n, "train", "--out", str(out), "--model.name", "quadratic:model", "--data.name", "quadratic:noiseless",
           "--run.servers", str(servers), "--run.deterministic", "true", "--run.method", method,
           "--train.epochs", "6", "--train.schedule", "constant", "--train.lr", "0.1", "--easgd.tau", "4",
           "--record.center_every", "1", "--record.worker_every", "1", "--comm.chunk_mb", str(chunk_mb), *extra)
    with read(out / "trajectory.h5") as f:
        got = {(int(m["worker_id"]), int(m["exchange"])): p for m, p in zip(f["workers/meta"][()], f["workers/params"][()])}
        return f["exchanges"][()], f["center/params"][()], got


@pytest.mark.parametrize("n,servers,chunk_mb", [(4, 1, 4.0), (5, 2, 20e-6)])
def test_mgrawa_matches_a_numpy_replay(tmp_path, n, servers, chunk_mb):
    ex, centers, got = deterministic_quadratic(tmp_path, n, servers, chunk_mb, "mgrawa", "--easgd.alpha", "0.5")
    want_workers, want_centers, _ = replay_mgrawa(ex, centers[0], 0.1, 0.5, quadratic.curvature(), quadratic.optimum())
    for row, want in zip(ex, want_workers):
        np.testing.assert_allclose(got[(int(row["worker_id"]), int(row["exchange"]))], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(centers[1:], np.array(want_centers), rtol=1e-5, atol=1e-5)
    assert np.all(ex["grad_norm"] > 0)


LAYERS = [(0, 7), (7, 14), (14, 20)]  # np.array_split of 20 into 3: 2 servers cut the middle layer


def minibatch_means(worker_id, x_train, batch=100, seed=0):
    """The means of the noise vectors of a worker's minibatches, in LocalTrainer's order."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + worker_id)
    per_epoch = len(x_train) // batch
    while True:
        perm = torch.randperm(len(x_train), generator=gen).numpy()
        for i in range(per_epoch):
            yield x_train[perm[i * batch:(i + 1) * batch]].astype(np.float64).mean(0)


def replay_lgrawa(exchanges, x0, lr, alpha, h, xstar, x_train):
    """NumPy replay of asynchronous LGRAWA on the noisy quadratic (each worker's own minibatches):
    like MGRAWA, but every layer of the center is the average of that layer of the workers' latest
    parameters, weighted by 1/||that layer's gradient||."""
    x, steps, latest, norms, batches = {}, {}, {}, {}, {}
    workers_at, centers, reported = [], [], []
    for row in exchanges:
        w, s = int(row["worker_id"]), int(row["step"])
        xi = x.setdefault(w, x0.astype(np.float64).copy())
        it = batches.setdefault(w, minibatch_means(w, x_train))
        for _ in range(s - steps.get(w, 0)):
            g = h * (xi - xstar - next(it))
            layer = np.array([np.linalg.norm(g[a:b]) for a, b in LAYERS])
            xi -= lr * g
        steps[w] = s
        norms[w], latest[w] = layer, xi.copy()
        workers_at.append(xi.copy())
        reported.append(layer)
        c = np.empty_like(xi)
        for l, (a, b) in enumerate(LAYERS):
            inv = {v: 1 / n[l] for v, n in norms.items()}
            c[a:b] = sum(inv[v] * latest[v][a:b] for v in sorted(latest)) / sum(inv.values())
        xi += alpha * (c - xi)
        centers.append(c)
    return workers_at, centers, np.array(reported)


def test_grawa_is_mgrawa(tmp_path):
    ex, centers, _ = deterministic_quadratic(tmp_path, 4, 1, 4.0, "grawa", "--easgd.alpha", "0.5")
    _, want_centers, _ = replay_mgrawa(ex, centers[0], 0.1, 0.5, quadratic.curvature(), quadratic.optimum())
    np.testing.assert_allclose(centers[1:], np.array(want_centers), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,servers,chunk_mb", [(4, 1, 4.0), (5, 2, 20e-6)])
def test_lgrawa_matches_a_numpy_replay(tmp_path, n, servers, chunk_mb):
    """Noisy gradients (each worker its own minibatches), so workers differ and the per-layer
    weights matter; 3 layers, and with 2 servers the middle layer is cut by the shard boundary."""
    ex, centers, got = deterministic_quadratic(tmp_path, n, servers, chunk_mb, "lgrawa", "--easgd.alpha", "0.5",
                                               "--model.kwargs", '{"layers": 3}', "--data.name", "quadratic:data",
                                               "--train.epochs", "2")
    h, xstar = quadratic.curvature().astype(np.float64), quadratic.optimum().astype(np.float64)
    want_workers, want_centers, want_norms = replay_lgrawa(ex, centers[0], 0.1, 0.5, h, xstar,
                                                           quadratic.data()["x_train"])
    for row, want in zip(ex, want_workers):
        np.testing.assert_allclose(got[(int(row["worker_id"]), int(row["exchange"]))], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(centers[1:], np.array(want_centers), rtol=1e-4, atol=1e-4)
    with read(tmp_path / "lgrawa" / "trajectory.h5") as f:
        recorded = f["layer_grad_norms"][()]
        assert json.loads(f["model"].attrs["names"]) == ["parts.0", "parts.1", "parts.2"]
    assert recorded.shape == (len(ex), 3)
    np.testing.assert_allclose(recorded, want_norms, rtol=1e-3)
    # the per-layer weights differ from MGRAWA's one weight per worker (so do the centers)
    last = {int(w): norms for w, norms in zip(ex["worker_id"], want_norms)}
    norms = np.array([last[w] for w in sorted(last)])
    per_layer = (1 / norms) / (1 / norms).sum(0)
    model = 1 / np.linalg.norm(norms, axis=1)
    assert np.abs(per_layer - (model / model.sum())[:, None]).max() > 1e-3
    np.testing.assert_allclose(per_layer.sum(0), 1.0)
    assert len(ex) == (n - servers) * 20


def best(losses, among):
    """The worker with the lowest loss among `among` (ties: lowest id), or -1."""
    return min(among, key=lambda v: (losses[v], v), default=-1)


def lsgd_bytes(P, servers, uploaded, pulled):
    """What an LSGD exchange moves: header and verdict per server, parameters that travelled."""
    return servers * 8 * (10 + 4) + 4 * P * (int(uploaded) + int(pulled))


@pytest.mark.parametrize("n,servers,chunk_mb,snapshots", [(4, 1, 4.0, True), (5, 2, 20e-6, True), (4, 1, 4.0, False)])
def test_lsgd_matches_a_numpy_replay_and_only_leaders_send(tmp_path, n, servers, chunk_mb, snapshots):
    """LSGD with only the leaders' parameters travelling: the server holds the parameters of the
    workers that led at their own latest exchange; a worker that now has the lowest loss sends
    its parameters and is not pulled, any other is pulled toward the best-loss worker held (and
    sends its parameters only when a worker snapshot is due)."""
    extra = [] if snapshots else ["--record.worker_every", "0"]
    ex, centers, got = deterministic_quadratic(tmp_path, n, servers, chunk_mb, "lsgd", "--lsgd.lam", "0.3", *extra)
    h, xstar, x0 = quadratic.curvature(), quadratic.optimum(), centers[0].astype(np.float64)
    P = len(x0)
    x, steps, held, losses, center = {}, {}, {}, {}, x0.copy()
    for i, row in enumerate(ex):
        w, s = int(row["worker_id"]), int(row["step"])
        xi = x.setdefault(w, x0.copy())
        step_losses = []
        for _ in range(s - steps.get(w, 0)):
            r = xi - xstar
            step_losses.append(0.5 * np.sum(h * r * r))
            xi -= 0.1 * h * r
        steps[w] = s
        assert row["train_loss"] == pytest.approx(np.mean(step_losses), rel=1e-4)
        if snapshots:
            np.testing.assert_allclose(got[(w, int(row["exchange"]))], xi, rtol=1e-5, atol=1e-5)
        losses[w] = float(row["train_loss"])  # the server's own loss values
        before = xi.copy()
        if best(losses, losses) == w:  # it leads: its parameters travel, it is not pulled
            held[w] = center = xi.copy()
            lead = w
        else:
            held.pop(w, None)
            lead = best(losses, [v for v in held if v != w])
            if lead >= 0:
                xi += 0.3 * (held[lead] - xi)
        assert row["leader"] == lead
        if lead == w:
            np.testing.assert_array_equal(xi, before)
        np.testing.assert_allclose(centers[i + 1], center, rtol=1e-5, atol=1e-5)
        assert row["bytes"] == lsgd_bytes(P, servers, lead == w or snapshots, 0 <= lead != w)
    leads = ex["leader"] == ex["worker_id"]
    assert leads.any() and (~leads).any()
    if not snapshots:  # fewer parameters travel than with every worker sending and receiving them all
        params_moved = ex["bytes"].sum() - len(ex) * lsgd_bytes(P, servers, False, False)
        assert params_moved < 0.75 * len(ex) * 2 * 4 * P


def test_two_level_lsgd_matches_a_numpy_replay(tmp_path):
    """Two-level LSGD, 4 workers in 2 emulated nodes (lsgd.group_size 2), noisy minibatches: every
    exchange pulls toward the node's leader with lambda, every tau_G = 2 tau steps also toward the
    global leader with lambda_G; a worker that leads both is not pulled. Leaders are held as in
    single-level LSGD (a worker leading its node sends its parameters)."""
    ex, centers, got = deterministic_quadratic(tmp_path, 5, 1, 4.0, "lsgd", "--lsgd.lam", "0.3", "--lsgd.lam_g", "0.2",
                                               "--lsgd.tau_g", "8", "--lsgd.group_size", "2",
                                               "--data.name", "quadratic:data", "--train.epochs", "2")
    h, xstar = quadratic.curvature().astype(np.float64), quadratic.optimum().astype(np.float64)
    x0, x_train = centers[0].astype(np.float64), quadratic.data()["x_train"]
    x, steps, held, losses, batches = {}, {}, {}, {}, {}
    locals_, globals_ = set(), set()
    for row in ex:
        w, s, k = int(row["worker_id"]), int(row["step"]), int(row["exchange"])
        xi = x.setdefault(w, x0.copy())
        it = batches.setdefault(w, minibatch_means(w, x_train))
        for _ in range(s - steps.get(w, 0)):
            xi -= 0.1 * h * (xi - xstar - next(it))
        steps[w] = s
        np.testing.assert_allclose(got[(w, k)], xi, rtol=1e-4, atol=1e-4)
        losses[w] = float(row["train_loss"])
        node = [v for v in losses if v // 2 == w // 2]
        leads = best(losses, node) == w
        pull = np.zeros_like(xi)
        lead = w if leads else best(losses, [v for v in held if v // 2 == w // 2 and v != w])
        if 0 <= lead != w:
            pull += 0.3 * (held[lead] - xi)
        glob = -1
        if k % 2 == 0:
            glob = w if best(losses, losses) == w else best(losses, [v for v in held if v != w])
            if 0 <= glob != w:
                pull += 0.2 * (held[glob] - xi)
                globals_.add(glob)
        if leads:
            held[w] = xi.copy()
        else:
            held.pop(w, None)
        assert row["leader"] == lead and row["global_leader"] == glob
        locals_.add(lead)
        xi += pull
    # both nodes had their own leaders, and the global pull crossed nodes
    assert {v // 2 for v in locals_ if v >= 0} == {0, 1} and globals_ and len(ex) == 4 * 20
