"""Failure paths of the `hpcopt` command with real processes, pipes and signals: a closed stdout,
Ctrl-C during an analysis, joins to a run that is missing or dead, and a launcher killed with -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from conftest import ROOT, hpcopt, mpi_env, mpirun
from test_elastic import QUAD, finish, launch, running, status, stop, wait_for

pytestmark = pytest.mark.mpi


def _pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def _kill_run(run: Path) -> None:
    """SIGKILL every process that names the run directory (launcher, ompi-server, mpirun, ranks:
    the ranks and the ompi-server are in sessions of their own, so a killpg misses them)."""
    for pid in _pids(str(run)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A small finished run of the quadratic plugin."""
    run = tmp_path_factory.mktemp("fp") / "run"
    mpirun(3, "train", "--out", str(run), *QUAD, "--train.epochs", "1")
    return run


@pytest.mark.parametrize("args", [["inspect", "{run}"], ["inspect", "--json", "{run}"], ["status", "{run}"],
                                  ["analyze", "{run}", "--out", "{out}", "--grid", "2x2", "--line-points", "2",
                                   "--skip", "pca,interpolation,hessian,sharpness", "--no-report"]])
def test_a_closed_stdout_ends_a_command_quietly(trained, tmp_path, args):
    """`hpcopt inspect RUN | head -1`: the reader is gone before the command writes. (The read end
    is closed before the command starts, so every write fails, whatever the output's size; a real
    `head` races with the writer.)"""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "hpcopt", *[a.format(run=trained, out=tmp_path / "a") for a in args]],
                           stdout=w, stderr=subprocess.PIPE, text=True, timeout=120, env=mpi_env())
    finally:
        os.close(w)
    assert p.returncode == 141, p.stderr  # 128 + SIGPIPE, what the shell shows for a tool ended by it
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr


def _wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    wait_for(repr(text), lambda: text in path.read_text(errors="replace"), proc, timeout=timeout, log=path)


@pytest.mark.parametrize("ranks", [0, 2])
def test_ctrl_c_ends_an_analysis_with_one_line_and_130(trained, tmp_path, ranks):
    """A plain `hpcopt analyze` (ranks=0), and `mpirun -n 2 hpcopt analyze` whose ranks all get
    the SIGINT (as from a terminal's Ctrl-C to the job, or srun's)."""
    out = tmp_path / "a"
    cmd = [sys.executable, "-m", "hpcopt", "analyze", str(trained), "--out", str(out), "--grid", "1000x1000",
           "--skip", "trajectory,pca,interpolation,hessian,sharpness", "--no-report", "--progress"]
    if ranks:
        cmd = ["mpirun", "-n", str(ranks), *cmd]
    log = tmp_path / "analyze.err"
    # SIGINT as from a terminal: not ignored, whatever this process inherited
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=mpi_env(),
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for_text(log, "random_2d", proc)  # the progress bar of the long grid: it is computing
        time.sleep(1)
        for pid in [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                   text=True).stdout.split()] if ranks else [proc.pid]:
            os.kill(pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_run(out)
    err = log.read_text(errors="replace")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "MPI_ABORT" not in err, err
    assert err.count("hpcopt analyze: interrupted") == 1, err
    with h5py.File(out / "analysis.h5", "r") as f:  # what was done is kept: the same command resumes
        assert f["grids/random_1d/done"][...].all()


def test_join_of_a_missing_or_non_run_directory_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    for args in (["-n", "1"], []):
        p = hpcopt("join", str(tmp_path / "nope"), *args, timeout=60)
        assert p.returncode == 2 and "does not exist" in p.stderr and "ompi-server" not in p.stderr, p.stderr
        p = hpcopt("join", str(tmp_path / "empty"), *args, timeout=60)
        assert p.returncode == 2 and "is not a run directory" in p.stderr and "ompi-server" not in p.stderr, p.stderr
    assert not (tmp_path / "nope").exists()  # nothing is created for a join


def test_join_of_a_dead_run_is_refused_at_once(tmp_path):
    """The whole job SIGKILLed: status.json still says running, the lock names a gone pid. A join
    must not wait comm.timeout (120 s) for an answer nobody will write."""
    run, log = tmp_path / "r", tmp_path / "train.log"
    proc = launch("train", "-n", "3", "--out", str(run), "--train.epochs", "100000", *QUAD, log=log)
    try:
        wait_for("exchanges", lambda: status(run).get("exchanges", 0) > 20, proc, log=log)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        _kill_run(run)
    assert status(run)["state"] == "running" and (run / "lock").exists()
    try:
        for args in (["-n", "1"], []):
            t0 = time.monotonic()
            p = hpcopt("join", str(run), *args, timeout=60)
            text = p.stdout + p.stderr
            assert p.returncode == 2 and "is not running" in text and f"--resume {run}" in text, text
            assert time.monotonic() - t0 < 30
        # a run that ended (status.json says so) is refused the same way
        (run / "status.json").write_text(json.dumps({**status(run), "state": "stopped"}))
        p = hpcopt("join", str(run), "-n", "1", timeout=60)
        assert p.returncode == 2 and "is stopped" in p.stderr and f"--resume {run}" in p.stderr, p.stderr
    finally:
        _kill_run(run)


def test_a_killed_launcher_takes_its_ompi_server_and_job_along(tmp_path):
    """kill -9 of `hpcopt train -n 3` leaves no process of the run behind: not its ompi-server, nor
    mpirun and the ranks, which would train on unwatched."""
    run, log = tmp_path / "r", tmp_path / "train.log"
    proc = launch("train", "-n", "3", "--out", str(run), "--train.epochs", "100000", *QUAD, log=log)
    try:
        wait_for("exchanges", lambda: status(run).get("exchanges", 0) > 20, proc, log=log)
        assert _pids(f"ompi-server.*{run}") and _pids(f"mpirun.*{run}")
        os.kill(proc.pid, signal.SIGKILL)  # the launcher alone
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _pids(str(run)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = subprocess.run(["pgrep", "-af", str(run)], capture_output=True, text=True).stdout
        assert not _pids(f"ompi-server.*{run}"), left
        assert not _pids(str(run)), left
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_run(run)


def test_a_terminal_ctrl_c_to_the_whole_process_group_is_a_graceful_stop(tmp_path):
    """A terminal's Ctrl-C goes to the whole foreground process group, not to the launcher alone:
    mpirun got it too and aborted the ranks, racing the graceful stop (exit 1; or rank 0 killed
    after its final flush: no center.pt, a stale lock)."""
    run, log = tmp_path / "r", tmp_path / "train.log"
    proc = launch("train", "-n", "3", "--out", str(run), "--train.epochs", "100000", *QUAD, log=log)
    try:
        wait_for("exchanges", lambda: status(run).get("exchanges", 0) > 50, proc, log=log)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does (launch() made the launcher a group leader)
        out = finish(proc, log)
        assert proc.returncode == 0, out
        assert status(run)["state"] == "stopped", out
        assert (run / "center.pt").exists() and not (run / "lock").exists(), out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_run(run)


def test_a_stop_signal_while_the_ranks_start_is_a_graceful_stop(tmp_path):
    """SIGTERM (scancel, a preemption) to `hpcopt train -n 3` right after it started mpirun, while
    the ranks still import torch and start MPI: the forwarded SIGUSR1 killed them (its default
    action), and the exit status said the training failed. The launcher now passes it on once
    rank 0 holds the run, the ranks remember it from their first line on, and the run stops."""
    run, log = tmp_path / "r", tmp_path / "train.log"
    proc = launch("train", "-n", "3", "--out", str(run), "--train.epochs", "100000", *QUAD, log=log)
    try:
        wait_for("mpirun to start", lambda: "hpcopt: " in log.read_text(), proc, log=log)
        os.kill(proc.pid, signal.SIGTERM)
        out = finish(proc, log)
        assert proc.returncode == 0, out
        assert "Traceback" not in out and "failed" not in out, out
        assert status(run)["state"] == "stopped" and not (run / "lock").exists(), out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_run(run)


def test_a_joined_worker_whose_server_died_leaves_without_waiting_comm_timeout(tmp_path):
    """A joined worker is in no MPI job with the servers: when server 0 was SIGKILLed the training
    job ended in seconds, but the joiner waited comm.timeout (120 s) for a reply. It now reads
    the run's lock while it waits: server 0's pid is gone, so it leaves (exit 1, saying why)."""
    run, log, jlog = tmp_path / "r", tmp_path / "train.log", tmp_path / "join.log"
    proc = launch("train", "-n", "3", "--out", str(run), "--train.epochs", "100000", *QUAD, "--comm.timeout", "600",
                  log=log)
    joiner = None
    try:
        wait_for("the first exchanges", lambda: status(run).get("exchanges", 0) > 20, proc, log=log)
        joiner = launch("join", str(run), "-n", "1", log=jlog)
        wait_for("the joiner", lambda: len(status(run).get("workers", [])) == 3, proc, log=log)
        server0 = json.loads((run / "lock").read_text())["pid"]
        os.kill(server0, signal.SIGKILL)
        jout = finish(joiner, jlog, timeout=120)  # (comm.timeout is 600 s)
        assert joiner.returncode != 0 and "servers are gone" in jout and "is gone" in jout, jout
    finally:
        for p in (proc, joiner):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        _kill_run(run)


@pytest.fixture
def small_disk(tmp_path):
    """A real, small file system (tmpfs of 6 MB) to fill up; skipped where mounting is not allowed."""
    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6M", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root in a machine that allows it)")
    try:
        yield where
    finally:
        _kill_run(where)
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_ends_the_run_with_one_clear_line_and_space_then_resume_goes_on(small_disk):
    """Issue 12, item 17: the trajectory's disk fills up mid-run. One line says what and where (no
    traceback), the job ends non-zero at once (not after comm.timeout), and once there is space
    again --resume continues from the last checkpoint."""
    run = small_disk / "r"
    args = ["--config", "configs/mnist1d_easgd.toml", "--train.epochs", "100000", "--record.center_every", "1",
            "--record.flush_seconds", "0.3", "--record.checkpoint_seconds", "0.3"]
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "hpcopt", "train", "-n", "3", "--out", str(run), *args],
                       env=mpi_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    out = p.stdout + p.stderr
    assert p.returncode == 1 and "cannot write" in out and "the disk is full" in out, out
    assert "Traceback" not in out and time.monotonic() - t0 < 60, out
    subprocess.run(["mount", "-o", "remount,size=200M", str(small_disk)], check=True)  # space again
    log = small_disk.parent / "resume.log"
    proc = launch("train", "-n", "3", "--resume", str(run), log=log)
    try:
        wait_for("the resumed run", lambda: status(run).get("exchanges", 0) > 0
                 and status(run).get("state") == "running" and status(run).get("resumed_from_exchange", 0) > 0,
                 proc, log=log)
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        _kill_run(small_disk)
    assert proc.returncode == 0, log.read_text()
    assert json.loads(hpcopt("inspect", "--json", str(run)).stdout)["status"] == "stopped"


def test_a_worker_that_cannot_save_its_state_says_so_once_and_trains_on(tmp_path):
    """CI found it: on a full disk a worker's own state write (only needed for a resume) raced the
    server's recording error and ended the worker with a traceback. Made deterministic here: worker
    0's state file is a directory, so each save fails; the run goes on and stops cleanly."""
    with running(tmp_path, 3) as (run, proc, log):
        pass
    state = run / "workers" / "worker-00000.pt"
    assert state.is_file()
    state.unlink()
    state.mkdir()  # a save now fails (IsADirectoryError), every time, on every file system
    rlog = tmp_path / "resume.log"
    proc = launch("train", "-n", "3", "--resume", str(run), "--record.checkpoint_seconds", "0.3", log=rlog)
    try:
        n0 = status(run).get("exchanges", 0)
        wait_for("the resumed run", lambda: status(run).get("state") == "running"
                 and status(run).get("exchanges", 0) > n0 + 40, proc, log=rlog)
        stop(proc)
        out = finish(proc, rlog)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert out.count("worker 0: cannot save its state") == 1 and "Traceback" not in out, out
    assert json.loads(hpcopt("inspect", "--json", str(run)).stdout)["status"] == "stopped"
