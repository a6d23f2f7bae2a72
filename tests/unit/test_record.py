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
from conftest import ROOT, hpcopt as run_hpcopt, mpi_env
from hpcopt.analyze.source import load_run
from hpcopt.models import build_model
from hpcopt.record import Recorder, RecorderError

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
