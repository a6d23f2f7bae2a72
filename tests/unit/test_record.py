"""Trajectories of trainings hpcopt did not run (hpcopt.record, hpcopt.importer), on real files and
real processes, no MPI: a plain PyTorch loop recorded and read back bit for bit, `hpcopt inspect`
and `hpcopt analyze` on it, a recording killed with SIGKILL, two torch DDP ranks under torchrun,
and `hpcopt import` of checkpoint directories, good and bad.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hpcopt
from hpcopt.analyze.source import load_run
from hpcopt.models import build_model
from hpcopt.record import Recorder, RecorderError


def _tests_conftest():
    """tests/conftest.py's helpers. Not `from conftest import ...`: in a whole-suite run the name
    `conftest` is tests/slurm/conftest.py by the time tests/unit is collected."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hpcopt_tests_conftest", Path(__file__).resolve().parents[1]
                                                  / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_shared = _tests_conftest()
ROOT, run_hpcopt, mpi_env = _shared.ROOT, _shared.hpcopt, _shared.mpi_env

CHEAPEST = ["--skip", "landscape,interpolation,hessian,sharpness,density", "--no-report"]


def flat(model) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def train(rec: Recorder, model, steps: int, evaluate_every: int = 0) -> tuple[dict, list, list]:
    """A plain SGD loop on random data: the parameters after every step, the losses, the evals."""
    torch.manual_seed(1)
    x, y = torch.randn(120, 40), torch.randint(0, 10, (120,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params, losses, evals = {0: flat(model)}, [], []
    for step in range(1, steps + 1):
        i = torch.arange(step * 30, step * 30 + 30) % len(x)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.step(loss=loss, batch=x[i], lr=0.1)
        params[step] = flat(model)
        losses.append(loss.item())
        if evaluate_every and step % evaluate_every == 0:
            evals.append((step, 0.5 + step / 100, 2.0 - step / 100))
            rec.evaluate(acc=torch.tensor(evals[-1][1]), loss=evals[-1][2])
    return params, losses, evals


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """23 steps of the MNIST-1D CNN, snapshots every 5 steps, evaluations every 10."""
    out = tmp_path_factory.mktemp("record") / "plain"
    torch.manual_seed(0)
    model = build_model("cnn1d")
    with Recorder(out, model, every=5, model_factory="cnn1d", data="mnist1d", seed=0, method="sgd") as rec:
        params, losses, evals = train(rec, model, 23, evaluate_every=10)
    return out, model, params, losses, evals


def test_round_trip(recorded):
    """Snapshots are the model's parameters bit for bit at steps 0, 5, ..., 20 and the last (23);
    every step is a row of worker 0; the evaluations, status, config and center.pt read back."""
    out, model, params, losses, evals = recorded
    with h5py.File(out / "trajectory.h5", "r") as f:
        steps = f["center/meta"]["exchanges"]
        assert list(steps) == [0, 5, 10, 15, 20, 23]
        for s, row in zip(steps, f["center/params"][()]):
            assert np.array_equal(row, params[int(s)]), f"center snapshot at step {s}"
        ex = f["exchanges"][()]
        assert list(ex["worker_id"]) == [0] * 23 and list(ex["step"]) == list(range(1, 24))
        assert np.array_equal(ex["train_loss"], np.float32(losses))
        assert list(ex["samples"]) == [30 * s for s in range(1, 24)]
        ev = f["evals"][()]
        assert list(ev["exchanges"]) == [s for s, _, _ in evals]
        assert np.array_equal(ev["test_accuracy"], np.float32([a for _, a, _ in evals]))
        assert np.array_equal(ev["test_loss"], np.float32([v for _, _, v in evals]))
        assert f.attrs["status"] == "complete" and f.attrs["method"] == "sgd"
        assert f.attrs["source"] == "hpcopt.Recorder"
    state = torch.load(out / "center.pt")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    rebuilt = hpcopt.load_model(out)  # from the recorded config: the factory rebuilds the model
    assert np.array_equal(flat(rebuilt), params[23])


def test_inspect_and_analyze(recorded):
    """`hpcopt inspect` and `hpcopt analyze` (its cheapest measures) read a recorded run, and
    hpcopt.load_analysis what analyze wrote."""
    out, *_ = recorded
    p = run_hpcopt("inspect", str(out), "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert (s["method"], s["status"], s["workers"], s["center_snapshots"], s["evaluations"], s["exchanges"]) == \
        ("sgd", "complete", [0], 6, 2, 23)
    p = run_hpcopt("analyze", str(out), *CHEAPEST)
    assert p.returncode == 0, p.stdout + p.stderr
    res = hpcopt.load_analysis(out)
    assert len(res["trajectory"]["center_path_length"]) == 6


def test_existing_run_and_wrong_factory(recorded, tmp_path):
    """An existing run is refused unless overwrite=True; a factory that builds another model is
    refused before anything is written."""
    out, model, *_ = recorded
    with pytest.raises(RecorderError, match="already exists"):
        Recorder(out, model, model_factory="cnn1d")
    with pytest.raises(RecorderError, match="builds the parameters"):
        Recorder(tmp_path / "new", model, model_factory="mlp")
    assert not (tmp_path / "new").exists()
    other = tmp_path / "other"
    Recorder(other, model, model_factory="cnn1d").close()
    Recorder(other, model, model_factory="cnn1d", overwrite=True).close()
    assert load_run(other).center.shape == (1, 5210)


def test_exception_stops_the_run(tmp_path):
    """An exception inside `with Recorder(...)` ends the run as stopped with the model as it was
    then (its last steps included), and no center.pt; the exception goes on to the caller."""
    torch.manual_seed(0)
    model = build_model("cnn1d")
    with pytest.raises(ZeroDivisionError):
        with Recorder(tmp_path / "r", model, every=5, model_factory="cnn1d") as rec:
            params, *_ = train(rec, model, 7)
            1 / 0
    run = load_run(tmp_path / "r")
    assert run.status == "stopped" and list(run.center_meta["exchanges"]) == [0, 5, 7]
    assert np.array_equal(run.center[-1], params[7]) and len(run.exchanges) == 7
    assert b"ZeroDivisionError" in run.events["detail"][-2]  # the leave event says why
    assert not (tmp_path / "r" / "center.pt").exists()


KILLED = """
import sys, time, torch, torch.nn.functional as F
from hpcopt.models import build_model
from hpcopt.record import Recorder
torch.manual_seed(0)
model = build_model("cnn1d")
opt = torch.optim.SGD(model.parameters(), lr=0.05)
x, y = torch.randn(100, 40), torch.randint(0, 10, (100,))
rec = Recorder(sys.argv[1], model, every=3, model_factory="cnn1d", flush_seconds=0.2)
step = 0
while True:
    loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
    rec.step(loss=loss, batch=100)
    step += 1
    if step % 10 == 0:
        rec.evaluate(acc=0.1, loss=loss)
    time.sleep(0.01)
"""


def test_sigkill_leaves_a_readable_file(tmp_path):
    """A recording process killed with SIGKILL leaves a trajectory that reads (status running)
    up to its last flush; while it lived, its lock kept a second recorder out."""
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(out)], env=mpi_env(), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no flush with 4 center snapshots and an evaluation in 60 s"
            try:
                with h5py.File(out / "trajectory.h5", "r", locking=False) as f:
                    if f["center/params"].shape[0] >= 4 and f["evals"].shape[0] >= 1:
                        break
            except (OSError, KeyError):  # not created yet, or caught inside a flush
                pass
            time.sleep(0.2)
        with pytest.raises(RecorderError, match="being trained by pid"):
            Recorder(out, build_model("cnn1d"), overwrite=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run = load_run(out)  # the analysis' reader
    assert run.status == "running"
    n = len(run.center)
    assert n >= 4 and list(run.center_meta["exchanges"]) == [3 * i for i in range(n)]
    assert np.isfinite(run.center).all() and len(run.evals) >= 1 and len(run.exchanges) >= 3 * (n - 1)
    p = run_hpcopt("inspect", str(out), "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["status"] == "running", p.stderr
    Recorder(out, build_model("cnn1d"), overwrite=True).close()  # the dead process's lock is taken over


DDP = """
import sys, numpy as np, torch, torch.nn.functional as F, torch.distributed as dist
from hpcopt.models import build_model
from hpcopt.record import Recorder
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(build_model("cnn1d"))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
g = torch.Generator().manual_seed(rank)
x, y = torch.randn(40, 40, generator=g), torch.randint(0, 10, (40,), generator=g)
params, losses = {}, []
with Recorder(sys.argv[1], model, every=4, model_factory="cnn1d", workers=True) as rec:
    for step in range(1, 11):
        loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
        rec.step(loss=loss, batch=40)
        losses.append(loss.item())
        params[str(step)] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()
np.savez(f"{sys.argv[1]}/rank{rank}.npz", losses=np.array(losses, dtype=np.float32), **params)
dist.destroy_process_group()
"""


def test_ddp_ranks_are_workers(tmp_path):
    """Two DDP ranks under torchrun (gloo): rank r's steps are worker r's rows with its own
    losses, rank 0's parameters the center, each rank's the worker snapshots."""
    out = tmp_path / "ddp"
    script = tmp_path / "ddp.py"
    script.write_text(DDP)
    env = mpi_env({"OMP_NUM_THREADS": "1"})
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29500 + os.getpid() % 1000), str(script), str(out)],
                       capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    ranks = [np.load(out / f"rank{r}.npz") for r in range(2)]
    with h5py.File(out / "trajectory.h5", "r") as f:
        assert f.attrs["n_workers"] == 2 and f.attrs["status"] == "complete"
        assert list(f["center/meta"]["exchanges"]) == [0, 4, 8, 10]
        for s, row in zip(f["center/meta"]["exchanges"][1:], f["center/params"][1:]):
            assert np.array_equal(row, ranks[0][str(s)])
        ex = f["exchanges"][()]
        for r in range(2):
            mine = ex[ex["worker_id"] == r]
            assert list(mine["step"]) == list(range(1, 11))
            assert np.array_equal(mine["train_loss"], ranks[r]["losses"])
        wm, wp = f["workers/meta"][()], f["workers/params"][()]
        assert sorted(zip(wm["worker_id"], wm["step"])) == [(r, s) for r in range(2) for s in (4, 8, 10)]
        for (w, s), row in zip(zip(wm["worker_id"], wm["step"]), wp):
            assert np.array_equal(row, ranks[w][str(s)])
        kinds = [k.decode() for k in f["events"]["kind"]]
        assert kinds.count("join") == 2 and kinds.count("leave") == 2


def save_checkpoints(folder: Path, steps) -> dict:
    """cnn1d state_dicts named step_N.pt, each a little further along; {step: flat vector}."""
    folder.mkdir()
    torch.manual_seed(3)
    model, vectors = build_model("cnn1d"), {}
    for s in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        torch.save(model.state_dict(), folder / f"step_{s}.pt")
        vectors[s] = flat(model)
    return vectors


def test_import_checkpoints(tmp_path):
    """A directory of state_dicts in natural order (step_9 before step_10) becomes the center
    snapshots, steps from the names; files named one by one keep their order."""
    vectors = save_checkpoints(tmp_path / "ckpts", [100, 9, 10, 0])
    p = run_hpcopt("import", str(tmp_path / "ckpts"), "--model", "cnn1d", "-o", str(tmp_path / "run"))
    assert p.returncode == 0, p.stderr
    run = load_run(tmp_path / "run")
    assert list(run.center_meta["exchanges"]) == [0, 9, 10, 100] and run.status == "complete"
    for s, row in zip(run.center_meta["exchanges"], run.center):
        assert np.array_equal(row, vectors[int(s)])
    named = [str(tmp_path / "ckpts" / f"step_{s}.pt") for s in (10, 0)]
    p = run_hpcopt("import", *named, "--model", "cnn1d", "-o", str(tmp_path / "two"))
    assert p.returncode == 0, p.stderr
    two = load_run(tmp_path / "two")
    assert list(two.center_meta["exchanges"]) == [0, 1]  # 10 then 0 does not increase: 0, 1, ...
    assert np.array_equal(two.center[0], vectors[10]) and np.array_equal(two.center[1], vectors[0])


def test_import_refuses_bad_files(tmp_path):
    """A corrupt file, or one of another model's shapes, is an error naming the file (status 2),
    and no run directory is left behind."""
    save_checkpoints(tmp_path / "ckpts", [0, 1, 2])
    data = (tmp_path / "ckpts" / "step_1.pt").read_bytes()
    (tmp_path / "ckpts" / "step_1.pt").write_bytes(data[: len(data) // 2])  # cut short
    p = run_hpcopt("import", str(tmp_path / "ckpts"), "--model", "cnn1d", "-o", str(tmp_path / "run"))
    assert p.returncode == 2 and "step_1.pt: cannot be read" in p.stderr, p.stderr
    assert not (tmp_path / "run").exists()
    torch.save(build_model("cnn1d", {"channels": 20}).state_dict(), tmp_path / "ckpts" / "step_1.pt")
    p = run_hpcopt("import", str(tmp_path / "ckpts"), "--model", "cnn1d", "-o", str(tmp_path / "run"))
    assert p.returncode == 2 and "step_1.pt: conv1.weight has shape (20, 1, 5)" in p.stderr, p.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the review's findings (issue 14, item 3)
MODELS = '''
import numpy as np, torch

def bn_frozen():
    """BatchNorm (running statistics: buffers) and a frozen layer."""
    m = torch.nn.Sequential(torch.nn.Linear(40, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                            torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    m[3].requires_grad_(False)
    return m

class Fragile(torch.nn.Module):
    """Takes the 2-row probe an import makes, fails on the whole test split (a device lost)."""
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(40, 10)
    def forward(self, x):
        if len(x) > 2:
            raise RuntimeError("device lost")
        return self.fc(x.reshape(len(x), -1))

def fragile():
    return Fragile()

class Wide(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = torch.nn.Linear(40, width)

def data():
    g = np.random.default_rng(0)
    return {"x_train": g.normal(size=(60, 40)), "y_train": g.integers(0, 10, 60),
            "x_test": g.normal(size=(50, 40)), "y_test": g.integers(0, 10, 50)}
'''


@pytest.fixture
def models(tmp_path, monkeypatch):
    """The module `recmods` (factories and data) importable here and in hpcopt subprocesses;
    returns the env those need."""
    (tmp_path / "recmods.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "tests" / "plugins")])}


def test_import_huge_step_number_and_force_keeps_the_old_run(tmp_path, models):
    """A name whose number does not fit a 64-bit step is imported with steps 0, 1 (a note says
    why), not an OverflowError; an import --force that fails while writing (a model that fails on
    the test split) is one error line, exit 2, and the existing run is left as it was."""
    save_checkpoints(tmp_path / "old", [3, 4])
    run = tmp_path / "run"
    p = run_hpcopt("import", str(tmp_path / "old"), "--model", "cnn1d", "-o", str(run))
    assert p.returncode == 0, p.stderr
    huge = tmp_path / "huge"
    huge.mkdir()
    for name in ("step_1.pt", "step_99999999999999999999999.pt"):
        torch.save(build_model("cnn1d").state_dict(), huge / name)
    p = run_hpcopt("import", str(huge), "--model", "cnn1d", "-o", str(run), "--force")
    assert p.returncode == 0 and "too large for a step" in p.stdout, p.stdout + p.stderr
    assert list(load_run(run).center_meta["exchanges"]) == [0, 1]
    before = {f: (run / f).read_bytes() for f in ("trajectory.h5", "config.toml", "center.pt")}

    frag = tmp_path / "frag"
    frag.mkdir()
    torch.save(build_model("recmods:fragile").state_dict(), frag / "step_1.pt")
    p = run_hpcopt("import", str(frag), "--model", "recmods:fragile", "--data", "recmods:data", "-o", str(run),
                   "--force", env=models)
    assert p.returncode == 2 and "RuntimeError: device lost" in p.stderr, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert {f: (run / f).read_bytes() for f in before} == before  # the old run, untouched
    assert sorted(f.name for f in run.iterdir()) == ["center.pt", "config.toml", "trajectory.h5"]


def _bn_frozen_pretrained():
    """recmods:bn_frozen with its frozen layer "pretrained": not the values the factory gives."""
    torch.manual_seed(0)
    model = build_model("recmods:bn_frozen")
    with torch.no_grad():
        model[3].weight.mul_(3.0)
    return model


def test_final_center_keeps_buffers_and_frozen_parameters(tmp_path, models):
    """A model with BatchNorm and a frozen layer: the Recorder warns when it starts, and
    hpcopt.load_model(run) of the final center (and hpcopt export) reproduces the recorded last
    evaluation exactly (its buffers and frozen parameters from center.pt); an earlier center
    takes them from the factory."""
    from hpcopt.models.evaluate import evaluate
    from hpcopt.record import RecorderWarning

    model = _bn_frozen_pretrained()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 40, generator=g), torch.randint(0, 10, (200,), generator=g)
    xt, yt = torch.randn(100, 40, generator=g), torch.randint(0, 10, (100,), generator=g)
    with pytest.warns(RecorderWarning, match="buffer"):
        rec = Recorder(tmp_path / "bn", model, every=10, model_factory="recmods:bn_frozen", seed=0)
    for step in range(25):
        i = torch.arange(step * 20, step * 20 + 20) % 200
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.step(loss=loss, batch=20)
    recorded = evaluate(model, xt, yt)
    rec.evaluate(loss=recorded[0], acc=recorded[1])
    rec.close()
    ev = load_run(tmp_path / "bn").evals[-1]
    loaded = hpcopt.load_model(tmp_path / "bn")
    assert np.float32(evaluate(loaded, xt, yt)).tolist() == [ev["test_loss"], ev["test_accuracy"]]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    from hpcopt.export import export

    export(tmp_path / "bn", "center", tmp_path / "m.pt")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in torch.load(tmp_path / "m.pt").items())
    first = hpcopt.load_model(tmp_path / "bn", at="center:0")  # not the final center: the factory's state
    assert not torch.equal(first[1].running_mean, model[1].running_mean)


def test_import_keeps_the_last_checkpoints_full_state(tmp_path, models):
    """hpcopt import of a BatchNorm + frozen layer model says in a note that the trajectory lacks
    that state, writes the last checkpoint's state_dict as center.pt, and load_model(run) gives
    the last checkpoint exactly."""
    model = _bn_frozen_pretrained()
    (tmp_path / "ck").mkdir()
    for s in (1, 2):
        with torch.no_grad():
            model[1].running_mean.add_(s)
            model[0].weight.add_(0.1)
        torch.save(model.state_dict(), tmp_path / "ck" / f"step_{s}.pt")
    p = run_hpcopt("import", str(tmp_path / "ck"), "--model", "recmods:bn_frozen", "-o", str(tmp_path / "run"),
                   env=models)
    assert p.returncode == 0 and "note: the model has" in p.stdout and "frozen" in p.stdout, p.stdout + p.stderr
    loaded = hpcopt.load_model(tmp_path / "run")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_abandoned_recorder_releases_its_lock(tmp_path):
    """A Recorder never closed and dropped (a notebook cell raised) releases the run's lock when
    collected; a lock of this very process that no open Recorder holds is taken over; while one
    is open, a second Recorder on its directory is refused with what to do."""
    import gc
    import socket

    model = build_model("cnn1d")
    out = tmp_path / "nb"
    rec = Recorder(out, model, every=5, model_factory="cnn1d")
    rec.step(loss=1.0, batch=10)
    with pytest.raises(RecorderError, match=r"this process .*close\(\)"):
        Recorder(out, model, model_factory="cnn1d", overwrite=True)
    del rec
    gc.collect()
    assert not (out / "lock").exists()
    assert load_run(out).status == "running"  # as it was at its last flush
    Recorder(out, model, model_factory="cnn1d", overwrite=True).close()
    (out / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": 0}))
    Recorder(out, model, model_factory="cnn1d", overwrite=True).close()  # left by this process: taken over
    assert load_run(out).status == "complete" and not (out / "lock").exists()


def test_step_numbers_from_names(tmp_path):
    """Steps from names: the number after step/epoch (Lightning's epoch=0-step=100.ckpt: 100, its
    weights under state_dict with a model. prefix), not a fraction's digits (epoch1_acc0.71: 1),
    *.PT taken; a dangling symbolic link is an error naming it."""
    from hpcopt.importer import name_step

    assert [name_step(Path(n)) for n in ("epoch=0-step=100.ckpt", "epoch1_acc0.71.pt", "model_acc0.80.pt",
                                         "ckpt.300.pt", "global_step1200.pth", "best.pt")] == [100, 1, 0, 300, 1200, None]
    light = tmp_path / "light"
    light.mkdir()
    vectors = {}
    torch.manual_seed(0)
    model = build_model("cnn1d")
    for epoch, step in ((1, 200), (0, 100)):
        with torch.no_grad():
            model.conv1.weight.add_(1.0)
        vectors[step] = flat(model)
        torch.save({"epoch": epoch, "global_step": step, "pytorch-lightning_version": "2.4.0",
                    "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                    "optimizer_states": [], "lr_schedulers": []}, light / f"epoch={epoch}-step={step}.ckpt")
    p = run_hpcopt("import", str(light), "--model", "cnn1d", "-o", str(tmp_path / "l"))
    assert p.returncode == 0, p.stdout + p.stderr
    run = load_run(tmp_path / "l")
    assert list(run.center_meta["exchanges"]) == [100, 200]
    assert np.array_equal(run.center, np.stack([vectors[100], vectors[200]]))

    acc = tmp_path / "acc"
    acc.mkdir()
    for name in ("epoch1_acc0.71.pt", "epoch2_acc0.65.PT", "epoch10_acc0.80.pt"):
        torch.save(model.state_dict(), acc / name)
    p = run_hpcopt("import", str(acc), "--model", "cnn1d", "-o", str(tmp_path / "a"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert list(load_run(tmp_path / "a").center_meta["exchanges"]) == [1, 2, 10]
    os.symlink(tmp_path / "gone.pt", acc / "epoch11_acc0.9.pt")
    p = run_hpcopt("import", str(acc), "--model", "cnn1d", "-o", str(tmp_path / "b"))
    assert p.returncode == 2 and "epoch11_acc0.9.pt is a symbolic link" in p.stderr, p.stderr


MAIN_CLASS = """
import sys, torch
from hpcopt.record import Recorder, RecorderError
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(40, 10)
try:
    Recorder(sys.argv[1], Net())
except RecorderError as e:
    print(e)
"""


def test_default_factory_must_rebuild_the_model(tmp_path, models):
    """Without model_factory, a class of __main__ (a script's, a notebook's), or one that needs
    arguments, is refused at the start, saying to pass model_factory; nothing is written. A
    class that builds the model without arguments is the factory."""
    p = subprocess.run([sys.executable, "-c", MAIN_CLASS, str(tmp_path / "m")], capture_output=True, text=True,
                       timeout=60, env=mpi_env())
    assert p.returncode == 0 and "__main__" in p.stdout and 'model_factory="module:function"' in p.stdout, \
        p.stdout + p.stderr
    assert not (tmp_path / "m").exists()
    with pytest.raises(RecorderError, match=r"recmods:Wide built without arguments.*model_factory="):
        Recorder(tmp_path / "w", build_model("recmods:Wide", {"width": 8}))
    assert not (tmp_path / "w").exists()
    Recorder(tmp_path / "c", build_model("cnn1d")).close()
    assert hpcopt.load_model(tmp_path / "c") is not None


def test_step_checks_its_arguments_at_once(tmp_path):
    """A loss of several numbers (or a learning rate that is not a number) is a RecorderError at
    that step(), nothing of it kept: the recording goes on; every=True is refused clearly."""
    model = build_model("cnn1d")
    with pytest.raises(RecorderError, match="every must be a whole number"):
        Recorder(tmp_path / "t", model, every=True, model_factory="cnn1d")
    rec = Recorder(tmp_path / "r", model, every=2, model_factory="cnn1d")
    with pytest.raises(RecorderError, match=r"loss=.*one number.*shape \(3,\)"):
        rec.step(loss=torch.ones(3))
    with pytest.raises(RecorderError, match=r"lr=.*number"):
        rec.step(loss=1.0, lr="0.1")
    for _ in range(3):
        rec.step(loss=torch.tensor(0.5), lr=np.float32(0.1), batch=4)
    rec.close()
    ex = load_run(tmp_path / "r").exchanges
    assert list(ex["step"]) == [1, 2, 3] and np.all(ex["train_loss"] == 0.5)


def test_inspect_resume_and_force_on_recorded_runs(tmp_path):
    """hpcopt inspect of evaluations with a loss only says so (no "nan%"); hpcopt train --resume
    of a recorded run says it was recorded and cannot be resumed; hpcopt import --force onto a
    run removes its old analysis."""
    out = tmp_path / "rec"
    with Recorder(out, build_model("cnn1d"), model_factory="cnn1d") as rec:
        rec.step(loss=1.0)
        rec.evaluate(loss=0.75)
    p = run_hpcopt("inspect", str(out))
    assert p.returncode == 0 and "nan%" not in p.stdout and "no accuracy recorded" in p.stdout, p.stdout
    p = run_hpcopt("train", "--resume", str(out))
    assert p.returncode == 2 and "recorded by hpcopt.Recorder" in p.stderr and "cannot be resumed" in p.stderr, \
        p.stdout + p.stderr
    (out / "analysis").mkdir()
    (out / "analysis" / "analysis.h5").write_bytes(b"old")
    save_checkpoints(tmp_path / "ck", [0, 1])
    p = run_hpcopt("import", str(tmp_path / "ck"), "--model", "cnn1d", "-o", str(out), "--force")
    assert p.returncode == 0, p.stderr
    assert not (out / "analysis").exists() and load_run(out).status == "complete"
