"""Bad input is refused with a clear error and loses nothing (no MPI)."""

import json
import os
import sys

import pytest

from hpcopt import config as C
from hpcopt.io.rundir import RunDir


def _old_run(tmp_path):
    """A run directory as a finished training leaves it (the files only, no real content)."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    for f in (run.trajectory, run.checkpoint, run.status, run.center_model, run.config):
        f.write_text("previous run\n")
    run.workers.mkdir()
    run.worker_state(3).write_text("state\n")
    run.joins.mkdir()
    return run


# ---------------------------------------------------------------- model.kwargs and the config file
def test_null_in_model_kwargs_is_a_config_error():
    with pytest.raises(C.ConfigError, match=r"model.kwargs.channels is null"):
        C.load(None, {"model.kwargs": '{"channels": null}'})
    with pytest.raises(C.ConfigError, match=r"model.kwargs.a\[1\] is null"):
        C.load(None, {"model.kwargs": '{"a": [1, null]}'})


def test_model_kwargs_with_odd_keys_round_trip_through_toml():
    import tomllib

    cfg = C.load(None, {"model.kwargs": '{"a b": 1, "c": {"d.e": [1, 2.5, "x"]}}'})
    assert tomllib.loads(cfg.to_toml())["model"]["kwargs"] == {"a b": 1, "c": {"d.e": [1, 2.5, "x"]}}


def test_a_config_that_cannot_be_written_deletes_nothing(tmp_path, monkeypatch):
    """hpcopt train --force: the config is serialised before the previous run's files go."""
    from hpcopt.roles import train

    run = _old_run(tmp_path)
    cfg = C.load(None, {"run.out": str(run.path)})
    cfg.model.kwargs = {"channels": None}  # past the config checks (built in code)
    with pytest.raises(TypeError):
        train._prepare_run_dir(cfg, force=True)
    assert run.trajectory.read_text() == "previous run\n" and run.checkpoint.exists()
    assert run.worker_state(3).exists()


# ---------------------------------------------------------------- numbers
@pytest.mark.parametrize("key, value", [
    ("train.epochs", "inf"), ("train.epochs", "1e308"), ("train.warmup_epochs", "nan"),
    ("train.weight_decay", "nan"), ("train.gamma1", "nan"), ("comm.chunk_mb", "inf"), ("comm.timeout", "inf"),
    ("record.checkpoint_seconds", "nan"), ("record.eval_seconds", "nan"), ("sync.switch_epochs", "inf"),
    ("run.seed", "100000000000000"), ("run.seed", "-1"), ("run.threads", "100000000000000000000"),
    ("run.threads", "100000"), ("easgd.tau", "100000000000000000000000"), ("data.seed", "-1"),
    ("data.batch_size", "100000000000000000000"),
])
def test_non_finite_and_out_of_range_numbers_are_config_errors(key, value):
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        C.load(None, {key: value})


def test_non_finite_numbers_in_a_toml_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nepochs = inf\n")
    with pytest.raises(C.ConfigError, match=r"train\.epochs must be a finite number"):
        C.load(p)
    with pytest.raises(C.ConfigError, match=r"record\.checkpoint_seconds must be a finite number"):
        C.Config(record=C.RecordConfig(checkpoint_seconds=float("nan")))
    cfg = C.load(None, {"run.seed": str(2**40 - 1), "run.threads": "64", "train.epochs": "0.5"})
    assert cfg.run.seed == 2**40 - 1 and cfg.run.threads == 64


@pytest.mark.parametrize("kw", [dict(span=float("nan")), dict(span=float("inf")), dict(timeout=float("nan")),
                                dict(time_limit=float("inf")), dict(sharpness_eps=float("nan")), dict(samples=-1),
                                dict(seed=2**70)])
def test_analyze_options_reject_non_finite_numbers(kw):
    from hpcopt.analyze.options import AnalyzeOptions

    with pytest.raises(ValueError):
        AnalyzeOptions(**kw)


# ---------------------------------------------------------------- workers/ and joins/ of a previous run
def test_clear_previous_never_follows_a_symlinked_workers_folder(tmp_path):
    run = _old_run(tmp_path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine\n")
    (precious / "worker-00001.pt").write_text("not the run's\n")
    for d in (run.workers, run.joins):
        import shutil

        shutil.rmtree(d)
        d.symlink_to(precious)
    run.clear_previous()
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt", "worker-00001.pt"]
    assert not run.workers.exists() and not run.joins.exists()


def test_clear_previous_deletes_only_hpcopts_own_files(tmp_path):
    run = _old_run(tmp_path)
    (run.workers / "notes.txt").write_text("mine\n")
    (run.workers / ".worker-00002.pt.123.tmp").write_text("temp\n")
    for name in ("20260101T000000-0123abcd.req", "20260101T000000-0123abcd.ok",
                 "20260101T000000-0123abcd.refused", "20260101T000000-0123abcd.port-1"):
        (run.joins / name).write_text("{}\n")
    (run.joins / "keep.txt").write_text("mine\n")
    run.clear_previous()
    assert [p.name for p in run.workers.iterdir()] == ["notes.txt"]
    assert [p.name for p in run.joins.iterdir()] == ["keep.txt"]
    assert not run.trajectory.exists()


# ---------------------------------------------------------------- export onto the run's own files
def test_export_refuses_the_runs_own_files_and_an_empty_name(tmp_path):
    from hpcopt.export import ExportError, export

    run = _old_run(tmp_path)
    link = tmp_path / "link.h5"
    link.symlink_to(run.checkpoint)
    for out in (run.trajectory, run.checkpoint, run.config, run.status, run.center_model, link,
                run.worker_state(3), run.workers / "new.pt"):
        with pytest.raises(ExportError, match="file of the run"):
            export(run.path, "center", out)
        with pytest.raises(ExportError, match="file of the run"):
            export(run.trajectory, "center", out)
    with pytest.raises(ExportError, match="empty"):
        export(run.path, "center", "")
    with pytest.raises(ExportError, match="directory"):
        export(run.path, "center", tmp_path)
    assert run.trajectory.read_text() == "previous run\n"


def test_export_cli_onto_a_real_runs_trajectory(tmp_path, capsys):
    import torch

    from hpcopt.cli import main
    from hpcopt.models import build_model
    from hpcopt.record import Recorder

    torch.manual_seed(0)
    model = build_model("cnn1d")
    Recorder(tmp_path / "r", model, model_factory="cnn1d").close()
    run = RunDir(tmp_path / "r")
    before = run.trajectory.read_bytes()
    assert main(["export", str(run.path), "-o", str(run.trajectory)]) == 2
    assert main(["export", str(run.path), "-o", ""]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 2
    assert run.trajectory.read_bytes() == before
    assert main(["export", str(run.path), "-o", str(run.path / "m.pt")]) == 0  # a new file of its own name


# ---------------------------------------------------------------- hand-edited status.json
@pytest.mark.parametrize("text", ['[]', '"running"', '{"updated": null}', '{"updated": "yesterday"}',
                                  '{"updated": 1e30}', '{"updated": NaN}', '{"updated": 0, "workers": [{}]}',
                                  '{"updated": 0, "workers": 5}', '{"updated": 0, "elapsed_seconds": "x"}',
                                  '{"updated": 0, "servers": [1, 2]}', None])
def test_status_of_a_malformed_status_file(tmp_path, capsys, text):
    from hpcopt.cli import main

    run = RunDir(tmp_path)
    run.config.write_text("[run]\n")
    if text is None:
        run.status.mkdir()
    else:
        run.status.write_text(text)
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("hpcopt status: error:") and len(err.splitlines()) == 1
    if text is not None:
        assert "malformed status.json" in err


def test_status_of_a_good_status_file_and_of_a_non_object(tmp_path, capsys):
    import time

    from hpcopt.cli import main

    (tmp_path / "status.json").write_text("[]")
    assert main(["status", str(tmp_path)]) == 2

    w = {"id": 0, "host": "h", "rank": 1, "pid": 9, "step": 5, "exchanges": 2, "joined_at": 0.1, "silent_seconds": 0.2}
    (tmp_path / "status.json").write_text(json.dumps({
        "updated": time.time(), "state": "running", "method": "easgd", "servers": ["h"], "elapsed_seconds": 1.0,
        "exchanges": 2, "exchanges_per_second": 2.0, "center_test_accuracy": None, "workers": [w]}))
    assert main(["status", str(tmp_path)]) == 0
    assert "workers      1" in capsys.readouterr().out
    # written by a server 0 on this host that is gone: killed, said at once (not 30 s later)
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    fresh = json.loads((tmp_path / "status.json").read_text())
    (tmp_path / "status.json").write_text(json.dumps({**fresh, "host": socket.gethostname(), "pid": dead.pid}))
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("state        killed") and f"server 0, pid {dead.pid}, is gone" in out, out
    (tmp_path / "status.json").write_text(json.dumps({**fresh, "host": socket.gethostname(), "pid": os.getpid()}))
    assert main(["status", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("state        running")


# ---------------------------------------------------------------- hpcopt train -n2
def test_train_launcher_drops_every_spelling_of_n(tmp_path, monkeypatch):
    for n in (["-n2"], ["-n", "2"], ["--np=2"], ["-n=2"], ["--np", "2"]):
        _launched_with(tmp_path, monkeypatch, n)


def _launched_with(tmp_path, monkeypatch, n):
    from hpcopt import cli

    argv = ["hpcopt", "train", *n, "--out", str(tmp_path / "r"), "--train.epochs", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    seen = {}

    def launch(np, rest, out, own_server):
        seen.update(np=np, rest=rest)
        return 0

    import hpcopt.launch.launcher as L

    monkeypatch.setattr(L, "launch", launch)
    monkeypatch.setattr(L, "under_mpi_launcher", lambda: False)
    assert cli.main(argv[1:]) == 0
    assert seen["np"] == 2 and seen["rest"] == ["train", "--out", str(tmp_path / "r"), "--train.epochs", "1"]


# ---------------------------------------------------------------- two launchers of one run
def _launcher(*args):
    """`hpcopt train -n 3 ARGS` (each case here is refused before mpirun starts). (Not conftest's
    mpi_env: under the whole suite `conftest` can name tests/slurm's.)"""
    import os
    import subprocess

    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    return subprocess.run([sys.executable, "-m", "hpcopt", "train", "-n", "3", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_a_second_launcher_of_a_run_is_refused_before_it_starts_anything(tmp_path):
    """Two `hpcopt train -n` of one run both passed the run-lock check before either's rank 0
    took the lock, and each started an ompi-server whose URI replaced the other's."""
    import os

    run = RunDir(tmp_path / "r")
    held = run.hold_launch()  # as a launcher running this run holds it
    try:
        p = _launcher("--out", str(run.path), "--train.epochs", "1")
        assert p.returncode == 2 and "is being launched by another" in p.stderr, p.stdout + p.stderr
        assert not run.server_uri.exists() and not run.trajectory.exists()  # nothing started
    finally:
        os.close(held)
    os.close(run.hold_launch())  # released with the descriptor


def test_a_launcher_on_a_run_trained_by_a_live_process_is_refused(tmp_path):
    """A run started by plain mpirun or sbatch holds only the run lock: the launcher reads it."""
    import os
    import socket

    run = _old_run(tmp_path)
    run.lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": 0}))
    p = _launcher("--resume", str(run.path))
    assert p.returncode == 2 and f"is being trained by pid {os.getpid()}" in p.stderr, p.stdout + p.stderr
    assert not run.server_uri.exists()


def test_the_launcher_refuses_a_launch_lock_it_cannot_take_and_a_run_dir_it_cannot_make(tmp_path):
    """A folder (or a symlink) at launch.lock silently turned the one-launcher guard off; an --out
    that cannot be made, or a --resume of a folder with no run, gave a traceback or made the folder."""
    run = RunDir(tmp_path / "r")
    run.launch_lock_file.mkdir(parents=True)
    p = _launcher("--out", str(run.path), "--train.epochs", "1")
    assert p.returncode == 2 and "it must be a plain file" in p.stderr, p.stdout + p.stderr
    (tmp_path / "afile").write_text("x")
    p = _launcher("--out", str(tmp_path / "afile"), "--train.epochs", "1")
    assert p.returncode == 2 and "cannot make the run directory" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = _launcher("--resume", str(tmp_path / "typo"))
    assert p.returncode == 2 and "no run there" in p.stderr, p.stderr
    assert not (tmp_path / "typo").exists()


def test_the_advice_after_a_dead_server_says_whether_the_trajectory_can_be_resumed_from(tmp_path):
    """Before the first checkpoint a resume starts from the trajectory's last center snapshot: the
    launcher's message says so when there is one, that there is nothing to resume from when there
    is none, and hedges only when the file cannot be read (a server died writing it)."""
    import json

    import h5py
    import numpy as np

    from hpcopt.launch.launcher import _after_loss

    run, outcome = tmp_path / "run", tmp_path / "run" / "OUTCOME"
    outcome.mkdir(parents=True)
    (outcome / "essential.json").write_text(json.dumps({"resumable": True, "ranks": {}}))

    def trajectory(rows):
        with h5py.File(run / "trajectory.h5", "w") as f:
            f.create_dataset("center/params", data=np.zeros((rows, 4), np.float32), maxshape=(None, 4))
            f.create_dataset("center/meta", data=np.zeros((rows, 3)), maxshape=(None, 3))

    trajectory(0)
    assert "nothing to resume from" in _after_loss(run, outcome)
    trajectory(2)
    said = _after_loss(run, outcome)
    assert "goes on from the trajectory's last center snapshot)" in said and "if it has one" not in said
    with h5py.File(run / "trajectory.h5", "r+") as f:  # a diverged center: a resume looks further back
        f["center/params"][...] = np.nan
    assert "center snapshot, if it has one" in _after_loss(run, outcome)
    (run / "trajectory.h5").write_bytes(b"half an HDF5 file")
    assert "center snapshot, if it has one" in _after_loss(run, outcome)
    (run / "checkpoint.h5").write_bytes(b"")
    assert "goes on from its last checkpoint" in _after_loss(run, outcome)


def test_a_launcher_removes_the_outcome_folders_of_killed_launchers_of_its_host(tmp_path):
    """A launcher killed with SIGKILL cannot remove its .outcome folder: the next one on the host
    does, if that launcher is gone; a live one's and another host's stay."""
    import socket
    import subprocess

    from hpcopt.launch.launcher import _remove_stale_outcomes

    here = socket.gethostname()
    gone = subprocess.Popen(["true"])
    gone.wait()
    for name in (f".outcome-{here}-{gone.pid}", f".outcome-{here}-{os.getpid()}", f".outcome-elsewhere-{gone.pid}",
                 f".outcome-{here}-notapid"):
        (tmp_path / name / "started").mkdir(parents=True)
    _remove_stale_outcomes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".outcome-{here}-{os.getpid()}", f".outcome-elsewhere-{gone.pid}", f".outcome-{here}-notapid"])
