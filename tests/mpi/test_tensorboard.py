"""Live metrics in TensorBoard (record.tensorboard, `--tensorboard`), on real runs: the event files
are read back with TensorBoard's own reader and checked against the trajectory file the same
flushes wrote (and against `hpcopt analyze`'s consensus spread, a NumPy reference).

    .venv/bin/python -m pytest -q tests/mpi/test_tensorboard.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import hpcopt, mpi_env, mpirun
from hpcopt.io.tensorboard import run_name

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

pytestmark = pytest.mark.mpi

# short flushes, so that the run has several of them before its final one; every center and
# worker snapshot recorded, so the center nearest a worker snapshot is that same exchange's (round's)
SHORT = ["--train.lr", "0.1", "--record.flush_seconds", "0.05", "--record.eval_seconds", "0.05",
         "--record.worker_every", "1", "--record.center_every", "1"]
LIVE = {"center/test_loss", "center/test_accuracy", "center/spread", "train/loss", "workers/active",
        "workers/joins", "workers/leaves", "workers/crashes"}
QUADRATIC = ["--model.name", "quadratic:model", "--data.name", "quadratic:data"]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    ea = EventAccumulator(str(log_dir))
    ea.Reload()
    tags = {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
    for tag, points in tags.items():  # one point per step: a flush at an unchanged count replaces, never repeats
        steps = [s for s, _ in points]
        assert all(a < b for a, b in zip(steps, steps[1:])), (tag, steps)
    return tags


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Both at once: EAMSGD with 2 servers + 2 workers (the spread is summed over the servers'
    shards) into OUT/tensorboard, and Local SGD on 2 ranks into a directory of its own."""
    d = tmp_path_factory.mktemp("tb")
    jobs = {
        "eamsgd": (4, ["--run.method", "eamsgd", "--run.servers", "2", "--train.epochs", "4", "--easgd.tau", "4",
                       "--record.tensorboard", "true"]),
        "local-sgd": (2, ["--run.method", "local-sgd", "--train.epochs", "2", "--sync.period", "4",
                          "--tensorboard", str(d / "sync-events")]),
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        done = [pool.submit(mpirun, n, "train", "--out", str(d / name), *SHORT, *flags)
                for name, (n, flags) in jobs.items()]
        for f in done:
            assert "tensorboard: live metrics in" in f.result().stdout
    return {"eamsgd": d / "eamsgd", "local-sgd": d / "local-sgd", "sync-events": d / "sync-events"}


def _check_against_trajectory(tb: dict, run: Path, workers: int, unit: str) -> None:
    with h5py.File(run / "trajectory.h5", "r") as f:
        ev, ex = f["evals"][()], f["exchanges"][()]
    assert LIVE | {f"throughput/{unit}_per_second"} <= set(tb)
    acc = tb["center/test_accuracy"]
    assert all(0 <= a <= 1 for _, a in acc)
    # every evaluation the file got, at the count it was made at; the last is the final center's
    # (the final evaluation of a center at the count of an earlier one replaces that one's point)
    evals = {int(n): (loss, a) for n, loss, a in zip(ev["exchanges"], ev["test_loss"], ev["test_accuracy"])}
    assert [s for s, _ in acc] == list(evals)
    np.testing.assert_array_equal([a for _, a in acc], [a for _, a in evals.values()])
    np.testing.assert_array_equal([v for _, v in tb["center/test_loss"]], [v for v, _ in evals.values()])
    active = [v for _, v in tb["workers/active"]]
    assert len(active) >= 2 and active[0] == workers and max(active) == workers and active[-1] == 0
    assert tb["workers/joins"][-1][1] == workers and tb["workers/leaves"][-1][1] == workers
    assert all(v == 0 for _, v in tb["workers/crashes"])
    rate = [v for _, v in tb[f"throughput/{unit}_per_second"]]
    assert min(rate) >= 0 and max(rate) > 0  # (a flush on a loaded machine may find no new exchange)
    losses = [v for _, v in tb["train/loss"]]
    assert min(ex["train_loss"]) <= min(losses) and max(losses) <= max(ex["train_loss"])


def _spread_reference(run: Path) -> float:
    """`hpcopt analyze`'s consensus spread at the last worker snapshots (plain NumPy on the file)."""
    from hpcopt.analyze.source import load_run
    from hpcopt.analyze.trajectory import consensus_spread, distance_to_center

    _, spread = consensus_spread(distance_to_center(load_run(str(run))))
    return float(spread[-1])


def test_async_server_writes_live_metrics(runs):
    run = runs["eamsgd"]
    tb = scalars(run / "tensorboard")
    _check_against_trajectory(tb, run, workers=2, unit="exchanges")
    status = json.loads((run / "status.json").read_text())
    assert tb["center/test_accuracy"][-1] == (status["evaluated_at_exchange"],
                                               pytest.approx(status["center_test_accuracy"], rel=1e-6))
    assert tb["workers/active"][-1][0] == status["exchanges"]  # the final flush, at the last exchange
    # the spread is analyze's, but not to the bit: a worker snapshot's nearest center is chosen
    # among the snapshots flushed so far (analyze sees later ones too), by server 0's clock
    spread = [v for _, v in tb["center/spread"]]
    assert all(v > 0 for v in spread) and spread[-1] == pytest.approx(_spread_reference(run), rel=0.5)


def test_sync_baseline_writes_the_same_to_its_own_directory(runs):
    run = runs["local-sgd"]
    assert not (run / "tensorboard").exists()
    assert [d.name for d in runs["sync-events"].iterdir()] == [run_name(run)]  # DIR/<its own subdirectory>
    tb = scalars(runs["sync-events"] / run_name(run))
    _check_against_trajectory(tb, run, workers=2, unit="rounds")
    # a round's worker snapshots and center (their average) are flushed together: exactly analyze's
    assert tb["center/spread"][-1][1] == pytest.approx(_spread_reference(run), rel=1e-6)


def test_analyze_writes_its_numbers_next_to_the_training(runs):
    run = runs["eamsgd"]
    p = hpcopt("analyze", str(run), "--skip", "landscape,interpolation,hessian,sharpness", "--no-report",
               "--tensorboard", str(run / "tensorboard"))
    assert p.returncode == 0, p.stderr
    tb = scalars(run / "tensorboard")
    assert LIVE <= set(tb)  # the training's events stay
    with h5py.File(run / "trajectory.h5", "r") as f:
        meta = f["center/meta"][()]
    assert [s for s, _ in tb["analysis/center_path_length"]] == meta["exchanges"].tolist()
    assert {"analysis/spread", "analysis/pca_explained_variance/pc1"} <= set(tb)
    # a second analysis replaces the first one's events instead of drawing them twice
    assert hpcopt("analyze", str(run), "--skip", "landscape,interpolation,hessian,sharpness,pca", "--no-report",
                  "--tensorboard", str(run / "tensorboard")).returncode == 0
    assert len(list((run / "tensorboard").glob("*.hpcopt-analyze"))) == 1
    assert "analysis/pca_explained_variance/pc1" not in scalars(run / "tensorboard")


def test_a_directory_that_cannot_be_written_costs_one_line_not_the_run(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    p = mpirun(2, "train", "--out", str(tmp_path / "q"), "--model.name", "quadratic:model", "--data.name",
               "quadratic:data", "--train.epochs", "1", "--tensorboard", str(blocker / "tb"))
    lines = [l for l in p.stdout.splitlines() if "TensorBoard events are no longer written" in l]
    assert len(lines) == 1, p.stdout
    assert "done:" in p.stdout and (tmp_path / "q" / "center.pt").exists()


def _event_files(log_dir: Path) -> list[str]:
    return sorted(f.name for f in log_dir.glob("events.out.tfevents.*"))


def test_runs_sharing_a_directory_never_delete_each_others_events(tmp_path):
    """Each run writes to DIR/<name>-<hash of its path>: a second run, or a --force rerun of the
    first, deletes only its own previous events (it deleted every run's in DIR before)."""
    shared = tmp_path / "shared"
    train = ["train", *QUADRATIC, "--train.epochs", "1", "--tensorboard", str(shared)]
    p = mpirun(2, *train, "--out", str(tmp_path / "a"))
    assert f"tensorboard --logdir {shared})" in p.stdout
    mpirun(2, *train, "--out", str(tmp_path / "b"))
    a, b = shared / run_name(tmp_path / "a"), shared / run_name(tmp_path / "b")
    assert sorted(shared.iterdir()) == sorted([a, b])
    for d in (a, b):
        assert len(_event_files(d)) == 1 and scalars(d)["workers/active"][-1][1] == 0
    first_a, kept_b = _event_files(a), _event_files(b)
    mpirun(2, *train, "--out", str(tmp_path / "a"), "--force")
    assert _event_files(b) == kept_b and scalars(b)["workers/active"][-1][1] == 0
    assert len(_event_files(a)) == 1 and _event_files(a) != first_a  # its own previous events: replaced
    assert scalars(a)["workers/active"][-1][1] == 0


def test_a_failure_measuring_the_spread_on_one_server_ends_the_events_not_the_run(tmp_path):
    """Server 1's share of the spread raises (a MemoryError, by a failpoint): server 0 still gets
    its allreduce (no collective is left unmatched, nothing hangs), says so in one line, and the
    run ends as usual. Before, the error aborted the whole job."""
    out = tmp_path / "run"
    p = mpirun(4, "train", "--out", str(out), *QUADRATIC, *SHORT, "--train.epochs", "8", "--run.servers", "2",
               "--tensorboard", env={"HPCOPT_FAILPOINTS": "recorder.spread.rank1@2"}, timeout=120)
    lines = [l for l in p.stdout.splitlines() if "TensorBoard events are no longer written" in l]
    assert len(lines) == 1 and "server 1: MemoryError" in lines[0], p.stdout
    assert "done:" in p.stdout and (out / "center.pt").exists()
    assert json.loads((out / "status.json").read_text())["state"] == "complete"
    tb = scalars(out / "tensorboard")  # what the first flush measured stays, and is readable
    assert len(tb["center/spread"]) == 1 and tb["workers/active"][-1][1] == 2


@pytest.mark.parametrize("where, compare", [("a-file", False), ("a-file/below", True)])
def test_analyze_refuses_a_tensorboard_directory_it_cannot_write_before_analysing(runs, tmp_path, where, compare):
    """A file, or a folder that cannot be created (or written): exit 2 and one line, before the
    analysis (it ran whole, then said the events were not written "and the run goes on", exit 0)."""
    (tmp_path / "a-file").write_text("")
    more = ["--compare", str(runs["local-sgd"])] if compare else []
    p = hpcopt("analyze", str(runs["local-sgd"]), *more, "--out", str(tmp_path / "a"), "--no-report",
               "--tensorboard", str(tmp_path / where))
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write TensorBoard event files" in lines[0], p.stderr
    assert "goes on" not in p.stdout + p.stderr
    assert not (tmp_path / "a").exists()  # nothing analysed


def _without_tensorboard(*argv: str) -> subprocess.CompletedProcess:
    """hpcopt's own main in a Python whose import machinery refuses `tensorboard` (as when it is
    not installed): sys.modules[name] = None makes every import of it raise ImportError."""
    code = ("import sys; sys.modules['tensorboard'] = None\n"
            "from hpcopt.cli import main\n"
            f"sys.exit(main({list(argv)!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=mpi_env())


@pytest.mark.parametrize("how", [["--tensorboard"], ["--record.tensorboard", "true"], ["-n", "3", "--tensorboard"]])
def test_without_the_package_train_says_how_to_install_it(tmp_path, how):
    out = tmp_path / "run"
    p = _without_tensorboard("train", "--out", str(out), *how)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "pip install 'hpcopt[tensorboard]'" in p.stderr and "Traceback" not in p.stderr
    assert not (out / "trajectory.h5").exists()  # failed before anything was set up


def test_without_the_package_analyze_says_how_to_install_it(runs, tmp_path):
    p = _without_tensorboard("analyze", str(runs["local-sgd"]), "--out", str(tmp_path / "a"),
                             "--tensorboard", str(tmp_path / "tb"))
    assert p.returncode == 2 and "pip install 'hpcopt[tensorboard]'" in p.stderr, p.stderr
    assert not (tmp_path / "a" / "analysis.h5").exists()
