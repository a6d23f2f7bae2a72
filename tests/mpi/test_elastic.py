"""Dynamic membership with real processes, real signals and real MPI: joins through an
ompi-server, workers that leave on a signal or crash, the divergence guard, checkpoints and
resume with another worker count."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import hpcopt, mpi_env, mpirun

from hpcopt.comm.protocol import PROTOCOL_VERSION

pytestmark = pytest.mark.mpi

QUAD = ["--model.name", "quadratic:model", "--data.name", "quadratic:data", "--train.lr", "0.05",
        "--easgd.tau", "4", "--data.batch_size", "50", "--record.flush_seconds", "0.3",
        "--record.eval_seconds", "0.3", "--record.checkpoint_seconds", "0.5", "--comm.worker_timeout", "4"]


def launch(*args, log: Path) -> subprocess.Popen:
    """`hpcopt train -n ...` / `hpcopt join ... -n`: the user's launcher (ompi-server + mpirun)."""
    return subprocess.Popen([sys.executable, "-m", "hpcopt", *args], env=mpi_env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def status(run: Path) -> dict:
    try:
        return json.loads((run / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_for(what, predicate, proc=None, timeout=120, log=None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended before {what}:\n{Path(log).read_text() if log else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{Path(log).read_text() if log else ''}")
        time.sleep(0.1)


def finish(proc, log, timeout=120) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"did not finish:\n{Path(log).read_text()}")
    return Path(log).read_text()


def events(path) -> list[tuple]:
    with h5py.File(path, "r", locking=False) as f:
        return [(e["kind"].decode(), int(e["worker_id"]), e["detail"].decode(), float(e["time"]))
                for e in f["events"][...]]


def stop(proc):
    """A graceful stop of the whole run (what a first Ctrl-C does)."""
    os.kill(proc.pid, signal.SIGINT)


@contextlib.contextmanager
def running(tmp_path, n: int, min_exchanges: int = 20):
    """A long training started with the launcher; stopped gracefully (and checked) at the end."""
    run, log = tmp_path / "r", tmp_path / "train.log"
    proc = launch("train", "-n", str(n), "--out", str(run), "--train.epochs", "100000", *QUAD, log=log)
    try:
        wait_for("the first exchanges", lambda: status(run).get("exchanges", 0) > min_exchanges, proc, log=log)
        yield run, proc, log
        stop(proc)
        out = finish(proc, log)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_join_mid_run_then_graceful_stop(tmp_path):
    run, log = tmp_path / "r", tmp_path / "train.log"
    proc = launch("train", "-n", "3", "--out", str(run), "--train.epochs", "100000", *QUAD, log=log)
    try:
        wait_for("the first exchanges", lambda: status(run).get("exchanges", 0) > 20, proc, log=log)
        jlog = tmp_path / "join.log"
        joiner = launch("join", str(run), "-n", "2", log=jlog)
        wait_for("the joiners", lambda: len(status(run).get("workers", [])) == 4, proc, log=log)
        n0 = status(run)["exchanges"]
        wait_for("more exchanges", lambda: status(run).get("exchanges", 0) > n0 + 50, proc, log=log)
        stop(proc)
        out = finish(proc, log)
        jout = finish(joiner, jlog)
    finally:
        for p in (proc,):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert joiner.returncode == 0, jout
    assert "joined" in jout and "stopped by the server" in jout
    # the token never leaves the 0600 token file: not in the request, not on a command line
    token = (run / "token").read_text().strip()
    assert token not in jout and token not in out
    for f in (run / "joins").iterdir():
        assert token not in f.read_text()
        if f.suffix == ".req":
            assert oct(f.stat().st_mode & 0o777) == "0o600"
    ev = events(run / "trajectory.h5")
    joins = [e for e in ev if e[0] == "join" and "joined from" in e[2]]
    assert sorted(e[1] for e in joins) == [2, 3]
    leaves = {e[1]: e[2] for e in ev if e[0] == "leave"}
    assert set(leaves) == {0, 1, 2, 3}
    # the stop reached the training's own ranks as a signal (mpirun forwards it), the joiners
    # (another mpirun) through the servers' STOP notice
    assert leaves[2] == leaves[3] == "stopped by the server"
    assert {leaves[0], leaves[1]} <= {"left on a signal", "stopped by the server"}
    with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
        assert f.attrs["status"] == "stopped"
        ids = set(f["exchanges"]["worker_id"].tolist())
        join_time = min(e[3] for e in joins)
        late = f["exchanges"][f["exchanges"]["time"] > join_time]
    assert ids == {0, 1, 2, 3}
    assert {0, 1} <= set(late["worker_id"].tolist())  # the first workers went on while the others joined
    s = json.loads(hpcopt("status", str(run), "--json").stdout)
    assert s["state"] == "stopped"


def test_concurrent_joins_of_different_sizes_each_get_their_own_ids(tmp_path):
    """Issue 12, items 3 and 15: three joins at the same moment, of 1, 2 and 3 ranks, into a run
    with 2 servers: each is admitted whole, under its own ids, the same way on both servers."""
    run, log = tmp_path / "r", tmp_path / "train.log"
    proc = launch("train", "-n", "4", "--run.servers", "2", "--out", str(run), "--train.epochs", "100000", *QUAD,
                  "--comm.worker_timeout", "15", log=log)
    joiners = []
    try:
        wait_for("the first exchanges", lambda: status(run).get("exchanges", 0) > 20, proc, log=log)
        joiners = [(n, launch("join", str(run), "-n", str(n), log=tmp_path / f"join{n}.log"), tmp_path / f"join{n}.log")
                   for n in (1, 2, 3)]
        wait_for("every joiner", lambda: len(status(run).get("workers", [])) == 8, proc, log=log, timeout=180)
        stop(proc)
        out = finish(proc, log)
        outs = {n: finish(j, jl) for n, j, jl in joiners}
    finally:
        for p in [proc] + [j for _, j, _ in joiners]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    ids = {}
    for n, text in outs.items():
        line = next(x for x in text.splitlines() if x.startswith("joined "))
        first, last = (int(v) for v in line.split("as worker(s) ")[1].split(" ")[0].split(".."))
        assert last - first + 1 == n, line
        ids[n] = set(range(first, last + 1))
    assert set().union(*ids.values()) == set(range(2, 8))  # disjoint, none lost
    joins = [e for e in events(run / "trajectory.h5") if e[0] == "join" and "joined from" in e[2]]
    for n, mine in ids.items():  # the servers registered each rank under its own request
        rid = {e[2].split("join ")[-1].rstrip(")") for e in joins if e[1] in mine}
        assert len(rid) == 1, (n, rid)
    with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
        assert set(f["exchanges"]["worker_id"].tolist()) == set(range(8))


def test_wrong_token_is_refused_and_changes_nothing(tmp_path):
    with running(tmp_path, 3, min_exchanges=10) as (run, proc, log):
        jlog = tmp_path / "join.log"
        joiner = launch("join", str(run), "-n", "1", "--token", "not-the-token", log=jlog)
        jout = finish(joiner, jlog)
        assert joiner.returncode != 0 and "refused" in jout and "wrong token" in jout, jout
        assert len(status(run)["workers"]) == 2
    ev = events(run / "trajectory.h5")
    assert any(e[0] == "refused" and "wrong token" in e[2] for e in ev)
    assert not any(e[0] == "join" and "joined from" in e[2] for e in ev)
    assert oct((run / "token").stat().st_mode & 0o777) == "0o600"


def test_a_connection_that_cannot_prove_the_token_is_not_admitted(tmp_path):
    """Issue 12, item 3: whoever reaches a join's port (here: an MPI job that read the port of a
    valid request) is challenged over the connection and refused without the token's answer."""
    from hpcopt.comm.joins import proof

    with running(tmp_path, 3, min_exchanges=10) as (run, proc, log):
        rid = "impostor-test"
        req = {"n": 1, "hosts": ["h"], "pids": [1], "n_parameters": 20, "time": time.time(),
               "protocol": PROTOCOL_VERSION}
        req["proof"] = proof((run / "token").read_text().strip(), rid, req)
        (run / "joins" / ".imp.tmp").write_text(json.dumps(req))
        (run / "joins" / ".imp.tmp").rename(run / "joins" / f"{rid}.req")
        port = run / "joins" / f"{rid}.port-0"
        wait_for("the request's port", port.exists, proc, log=log)
        script = Path(__file__).resolve().parent / "scripts" / "impostor.py"
        ilog = tmp_path / "impostor.log"
        impostor = subprocess.Popen(["mpirun", "-n", "1", sys.executable, str(script), port.read_text().strip()],
                                    env=mpi_env({"OMPI_MCA_pmix_server_uri": f"file:{run / 'ompi-server.uri'}"}),
                                    stdout=open(ilog, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for("the impostor's guess", lambda: "answered" in ilog.read_text(), impostor, log=ilog)
            wait_for("the refusal", lambda: any(e[0] == "refused" and "no proof" in e[2]
                                                for e in events(run / "trajectory.h5")), proc, log=log)
            # it still holds its connection: the servers go on all the same
            n0 = status(run)["exchanges"]
            wait_for("more exchanges", lambda: status(run).get("exchanges", 0) > n0 + 20, proc, log=log)
            assert len(status(run)["workers"]) == 2 and impostor.poll() is None
        finally:
            os.killpg(impostor.pid, signal.SIGKILL)
            impostor.wait(timeout=30)


def test_malformed_join_requests_are_refused_and_the_run_goes_on(tmp_path):
    with running(tmp_path, 3, min_exchanges=10) as (run, proc, log):
        good = {"proof": "0" * 64, "protocol": PROTOCOL_VERSION, "n": 1, "hosts": ["h"], "pids": [1], "n_parameters": 20,
                "time": time.time()}  # now: older requests are left-overs of an earlier start
        bad = {"old-protocol": json.dumps({**good, "protocol": 1}), "token-not-proof": json.dumps({"token": "x", **good}),
               "array": "[1, 2]", "garbage": "{not json", "string-time": json.dumps({**good, "time": "now"}),
               "no-hosts": json.dumps({**good, "hosts": []}), "string-n": json.dumps({**good, "n": "2"}),
               "huge-n": json.dumps({**good, "n": 10 ** 9}), "bool-n": json.dumps({**good, "n": True})}
        for name, text in bad.items():
            tmp = run / "joins" / f".{name}.tmp"
            tmp.write_text(text)
            tmp.rename(run / "joins" / f"{name}.req")  # as a joiner writes it: whole, at once
        wait_for("the refusals", lambda: all((run / "joins" / f"{n}.refused").exists() for n in bad), proc, log=log)
        n0 = status(run)["exchanges"]
        wait_for("more exchanges", lambda: status(run).get("exchanges", 0) > n0 + 20, proc, log=log)
        assert len(status(run)["workers"]) == 2
    reasons = {n: json.loads((run / "joins" / f"{n}.refused").read_text())["reason"] for n in bad}
    assert all(r.startswith("malformed join request") for n, r in reasons.items() if n != "token-not-proof"), reasons
    assert "speaks protocol 1" in reasons["old-protocol"] and reasons["token-not-proof"] == "wrong token"


def _worker_pid(run, wid):
    return next(w["pid"] for w in status(run)["workers"] if w["id"] == wid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_worker_leaves_or_crashes_and_training_goes_on(tmp_path, sig):
    with running(tmp_path, 4) as (run, proc, log):
        os.kill(_worker_pid(run, 1), sig)
        wait_for("the worker to be gone", lambda: 1 not in [w["id"] for w in status(run).get("workers", [])],
                 proc, log=log)
        n0 = status(run)["exchanges"]
        wait_for("the others to go on", lambda: status(run).get("exchanges", 0) > n0 + 30, proc, log=log)
    ev = events(run / "trajectory.h5")
    mine = [e for e in ev if e[1] == 1 and e[0] in ("leave", "crash")]
    assert len(mine) == 1
    if sig == signal.SIGTERM:
        assert mine[0][0] == "leave" and mine[0][2] == "left on a signal"
    else:
        assert mine[0][0] == "crash" and "sent nothing for 4 s" in mine[0][2]  # comm.worker_timeout
    with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
        ex = f["exchanges"][...]
        assert f.attrs["status"] == "stopped"
    after = ex[ex["time"] > mine[0][3]]
    assert {0, 2} <= set(after["worker_id"].tolist()) and 1 not in set(after["worker_id"].tolist())


@pytest.mark.parametrize("call,method", [(30, "easgd"), (32, "easgd"), (31, "mgrawa")])
def test_nan_worker_is_reset_to_the_center_not_mixed_in(tmp_path, call, method):
    out = tmp_path / "n"
    # rank 2 (worker 1) gets a NaN loss at its 30th loss evaluation, read (a step late) after its
    # next step; or at its 32nd, the last step before its 8th exchange, read before that exchange;
    # or at its 31st, read after its 32nd, whose gradient norm came from the diverged parameters:
    # the exchange right after the restart is skipped, and none reports a non-finite norm or loss
    p = mpirun(4, "train", "--out", str(out), *QUAD, "--train.epochs", "3", "--run.method", method,
               "--model.kwargs", f'{{"poison_rank": 2, "poison_call": {call}}}')
    assert "restarting from the center" in p.stdout
    ev = events(out / "trajectory.h5")
    diverged = [e for e in ev if e[0] == "diverged"]
    assert [e[1] for e in diverged] == [1] and "nan" in diverged[0][2].lower()
    with h5py.File(out / "trajectory.h5", "r", locking=False) as f:
        assert np.isfinite(f["center/params"][...]).all()
        assert f.attrs["status"] == "complete"
        ex = f["exchanges"][...]
        assert set(ex["worker_id"].tolist()) == {0, 1, 2}  # it went on after the reset
        mine = ex[ex["worker_id"] == 1]
        assert np.isfinite(mine["train_loss"]).all() and np.isfinite(mine["grad_norm"]).all()


@pytest.mark.parametrize("method", ["easgd", "mgrawa", "lsgd"])
def test_nan_gradient_with_a_finite_loss_never_reaches_the_center(tmp_path, method):
    out = tmp_path / "g"
    # rank 2 (worker 1): at its 32nd loss evaluation (the last step before its 8th exchange) the loss is finite but the gradient NaN, so
    # its parameters go bad after that step without its loss saying so (issue 12, item 1)
    p = mpirun(4, "train", "--out", str(out), *QUAD, "--train.epochs", "3", "--run.method", method,
               "--model.kwargs", '{"poison_rank": 2, "poison_call": 32, "poison_grad": true}',
               "--record.center_every", "1")
    assert "non-finite parameters" in p.stdout and "restarting from the center" in p.stdout
    diverged = [e for e in events(out / "trajectory.h5") if e[0] == "diverged"]
    assert [e[1] for e in diverged] == [1]
    with h5py.File(out / "trajectory.h5", "r", locking=False) as f:
        assert np.isfinite(f["center/params"][...]).all() and np.isfinite(f["workers/params"][...]).all()
        assert f.attrs["status"] == "complete"


@pytest.mark.parametrize("path", ["messages", "shared"])
def test_a_hostile_client_costs_only_itself(tmp_path, path):
    """A client that bypasses the worker's guards: non-finite parameters are given the center
    (nothing reaches it), a malformed header gets the sender dropped; the server never fails."""
    script = Path(__file__).resolve().parent / "scripts" / "bad_values.py"
    p = subprocess.run(["mpirun", "-n", "2", sys.executable, str(script), str(tmp_path), path],
                       capture_output=True, text=True, timeout=120, env=mpi_env())
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr
    with h5py.File(tmp_path / f"bad-{path}.h5", "r", locking=False) as f:
        assert np.isfinite(f["center/params"][...]).all()
        kinds = [k.decode() for k in f["events"]["kind"]]
    assert kinds.count("rejected") == 2 and kinds.count("crash") == 1


def _train_and(tmp_path, run, end, *extra, min_exchanges=60):
    """`hpcopt train -n 3` a long run until it has made some exchanges, then end it: "stop"
    (graceful) or "kill" (SIGKILL of every process at once)."""
    log = tmp_path / f"{run.name}.log"
    proc = launch("train", "-n", "3", "--out", str(run), "--train.epochs", "100000", *QUAD, *extra, log=log)
    try:
        wait_for("exchanges", lambda: status(run).get("exchanges", 0) > min_exchanges, proc, log=log)
        if end == "stop":
            stop(proc)
            finish(proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            subprocess.run(["pkill", "-9", "-f", str(run)], check=False)  # ranks are in their own sessions


def _resume_a_while(tmp_path, run, more=40, n=3) -> str:
    log = tmp_path / "resume.log"
    proc = launch("train", "-n", str(n), "--resume", str(run), log=log)
    try:
        n0 = status(run).get("exchanges", 0)
        wait_for("the resumed run", lambda: status(run).get("exchanges", 0) > n0 + more, proc, log=log)
        stop(proc)
        out = finish(proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    return out


def test_sigkill_whole_job_then_resume_with_another_worker_count(tmp_path):
    run, log = tmp_path / "r", tmp_path / "train.log"
    proc = launch("train", "-n", "4", "--out", str(run), "--train.epochs", "100000", *QUAD, log=log)
    try:
        wait_for("a checkpoint", lambda: (run / "checkpoint.h5").exists() and status(run).get("exchanges", 0) > 200,
                 proc, log=log)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # every process at once, mid-training
        proc.wait(timeout=30)
        subprocess.run(["pkill", "-9", "-f", str(run)], check=False)  # ranks are in their own sessions
    with h5py.File(run / "checkpoint.h5", "r") as f:
        ck_exchanges, ck_time = int(f.attrs["exchanges"]), float(f.attrs["time"])
        sizes = json.loads(f.attrs["trajectory_sizes"])
    with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
        assert f.attrs["status"] == "running"
        killed_at = float(f["center/meta"]["time"][-1])
    # lost at most one checkpoint interval (plus the flush it rides on)
    assert killed_at - ck_time <= 0.5 + 0.3 + 0.3

    out = _resume_a_while(tmp_path, run, more=100)
    assert f"resuming {run / 'trajectory.h5'} at exchange {ck_exchanges}" in out
    with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
        assert f.attrs["status"] == "stopped"
        meta = f["center/meta"][...]
        assert f["center/params"].shape[0] == len(meta)
        assert np.all(np.diff(meta["exchanges"]) > 0) and np.all(np.diff(meta["time"]) >= 0)
        assert meta["exchanges"][sizes["center/meta"] - 1] <= ck_exchanges < meta["exchanges"][-1]
        kinds = [e.decode() for e in f["events"]["kind"]]
        assert "resume" in kinds
        assert f["exchanges"]["time"][-1] > ck_time
    assert hpcopt("inspect", str(run / "trajectory.h5")).returncode == 0


def test_graceful_stop_then_resume_continues_every_worker_from_its_saved_state(tmp_path):
    """Issue 12, item 12: after a Ctrl-C, --resume continues each worker (step, schedule, local
    state); nothing starts over at step 0."""
    run = tmp_path / "r"
    _train_and(tmp_path, run, "stop")
    with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
        assert f.attrs["status"] == "stopped"
        before = f["exchanges"][...]
    with h5py.File(run / "checkpoint.h5", "r") as f:
        saved = {int(r["worker_id"]): int(r["step"]) for r in f["workers"][...]}
    assert sorted(saved) == [0, 1] and min(saved.values()) > 0
    with h5py.File(run / "checkpoint.h5", "r") as f:
        counted = {int(r["worker_id"]): int(r["exchanges"]) for r in f["workers"][...]}
    out = _resume_a_while(tmp_path, run)
    assert "no saved state" not in out, out
    with h5py.File(run / "checkpoint.h5", "r") as f:  # each worker's exchanges count over the run
        assert all(int(r["exchanges"]) > counted[int(r["worker_id"])] for r in f["workers"][...])
    with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
        after = f["exchanges"][len(before):]
        center_at = f["center/meta"]["exchanges"]
    assert np.all(np.diff(center_at) > 0), center_at  # one center snapshot per exchange count
    for w, step in saved.items():
        mine = after[after["worker_id"] == w]
        # its first exchange after the resume is tau = 4 steps after where it stopped
        assert len(mine) and mine["step"][0] == step + 4, (w, step, mine["step"][:3])


def test_a_resume_from_a_checkpoint_at_exchange_0_records_its_center_once(tmp_path):
    """Killed after a checkpoint but before any exchange (tau far beyond the run), a resume
    recorded the starting center again (center rows at exchanges 0, 0, 10, ...; one more 0 per resume)."""
    run, log = tmp_path / "r", tmp_path / "train.log"
    proc = launch("train", "-n", "3", "--out", str(run), "--train.epochs", "100000", *QUAD, "--easgd.tau", "1000000",
                  log=log)
    try:
        wait_for("a checkpoint", lambda: (run / "checkpoint.h5").exists(), proc, log=log)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        subprocess.run(["pkill", "-9", "-f", str(run)], check=False)
    with h5py.File(run / "checkpoint.h5", "r") as f:
        assert int(f.attrs["exchanges"]) == 0
    mpirun(3, "train", "--resume", str(run), "--train.epochs", "0.1", "--easgd.tau", "4")
    with h5py.File(run / "trajectory.h5", "r") as f:
        center_at = f["center/meta"]["exchanges"]
    assert center_at[0] == 0 and np.all(np.diff(center_at) > 0), center_at


def test_a_second_training_on_a_live_run_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    """Issue 12, item 13: --resume or --force onto a run that is still training must not touch it."""
    with running(tmp_path, 3, min_exchanges=10) as (run, proc, log):
        for args in (["--resume", str(run)], ["--out", str(run), "--force", *QUAD]):
            p = mpirun(3, "train", *args, check=False)
            assert p.returncode == 2 and "is being trained by pid" in p.stderr, p.stderr
        # the launcher form is refused before it starts anything: it used to start its own
        # ompi-server first, whose URI replaced the live run's (joins to the live run then failed)
        uri = (run / "ompi-server.uri").read_text()
        for args in (["--resume", str(run)], ["--out", str(run), "--force", *QUAD]):
            p = hpcopt("train", "-n", "3", *args)
            assert p.returncode == 2 and "is being launched by another" in p.stderr, p.stdout + p.stderr
            assert "mpirun" not in p.stdout, p.stdout  # nothing was launched
        assert (run / "ompi-server.uri").read_text() == uri
        n0 = status(run)["exchanges"]
        wait_for("more exchanges", lambda: status(run).get("exchanges", 0) > n0 + 20, proc, log=log)
    assert not (run / "lock").exists()  # released at the end
    # a lock left by a training that was killed (its pid is gone) is stale: taken over, said so
    (run / "lock").write_text(json.dumps({"host": os.uname().nodename, "pid": 2 ** 22 + 12345, "since": 0}))
    p = mpirun(3, "train", "--resume", str(run), "--train.epochs", "1", check=False)
    assert "took over a stale lock" in p.stdout and "is gone" in p.stdout, p.stdout + p.stderr


def test_labels_the_model_cannot_predict_are_a_clear_error(tmp_path):
    import h5py as h

    data = tmp_path / "d.h5"
    rng = np.random.default_rng(0)
    with h.File(data, "w") as f:
        f["x_train"], f["y_train"] = rng.standard_normal((200, 40)).astype(np.float32), np.full(200, 12)
        f["x_test"], f["y_test"] = rng.standard_normal((50, 40)).astype(np.float32), np.zeros(50, np.int64)
    p = mpirun(3, "train", "--out", str(tmp_path / "r"), "--data.name", str(data), check=False)
    assert p.returncode == 2 and "y_train has labels 12..12" in p.stderr and "10 classes" in p.stderr, p.stderr
    # a model that cannot take the data at all: one line naming both, no traceback from a worker
    narrow = tmp_path / "narrow.h5"
    with h.File(narrow, "w") as f:
        f["x_train"], f["y_train"] = rng.standard_normal((200, 7)).astype(np.float32), np.zeros(200, np.int64)
        f["x_test"], f["y_test"] = rng.standard_normal((50, 7)).astype(np.float32), np.zeros(50, np.int64)
    p = mpirun(3, "train", "--out", str(tmp_path / "r2"), "--data.name", str(narrow), "--model.name", "cnn1d",
               check=False)
    assert p.returncode == 2 and "model cnn1d cannot take data" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_a_resume_refuses_a_data_file_changed_since_the_run_began(tmp_path):
    """A user's HDF5 data file rewritten in place under the same name (fewer rows) crashed every
    resumed worker (their saved data orders index the old rows). The run keeps the file's digest
    (data.json); a resume refuses another content, changes nothing, and goes on once the file is
    back. The name is kept absolute: given relative, a resume from another folder finds it."""
    import h5py as h

    def write(rows):
        rng = np.random.default_rng(0)
        with h.File(tmp_path / "d.h5", "w") as f:
            f["x_train"], f["y_train"] = rng.standard_normal((rows, 40)).astype(np.float32), np.arange(rows) % 10
            f["x_test"], f["y_test"] = rng.standard_normal((50, 40)).astype(np.float32), np.arange(50) % 10

    write(400)
    run = tmp_path / "r"
    mpirun(3, "train", "--out", str(run), "--data.name", "d.h5", "--train.epochs", "2", "--data.batch_size", "50",
           cwd=tmp_path)
    assert json.loads((run / "data.json").read_text())["file"] == str(tmp_path / "d.h5")
    with h5py.File(run / "trajectory.h5", "r+") as f:
        f.attrs["status"] = "running"  # as a run killed mid-training leaves it
    write(300)
    config = (run / "config.toml").read_text()
    p = mpirun(3, "train", "--resume", str(run), check=False)
    assert p.returncode == 2 and "has changed since the run began" in p.stderr, p.stdout + p.stderr
    assert (run / "config.toml").read_text() == config
    write(400)
    p = mpirun(3, "train", "--resume", str(run), "--data.name", "../d.h5", cwd=run)  # the same file, named otherwise
    assert "resuming" in p.stdout, p.stdout + p.stderr
    # moved: the same content under another name resumes (the digest proves it), another does not
    with h5py.File(run / "trajectory.h5", "r+") as f:
        f.attrs["status"] = "running"
    (tmp_path / "d.h5").rename(tmp_path / "moved.h5")
    write(300)
    p = mpirun(3, "train", "--resume", str(run), "--data.name", str(tmp_path / "d.h5"), check=False)
    assert p.returncode == 2 and "has changed since the run began" in p.stderr, p.stdout + p.stderr
    p = mpirun(3, "train", "--resume", str(run), "--data.name", str(tmp_path / "moved.h5"))
    assert "resuming" in p.stdout, p.stdout + p.stderr
    assert json.loads((run / "data.json").read_text())["file"] == str(tmp_path / "moved.h5")
    assert tomllib.loads((run / "config.toml").read_text())["data"]["name"] == str(tmp_path / "moved.h5")


@pytest.mark.parametrize("args", [["--data.name", "/nope.h5"], ["--model.name", "no_such_module:f"]])
def test_the_launcher_exits_non_zero_when_the_training_fails(tmp_path, args):
    """Issue 12, item 14: recovery-mode mpirun exits 0 whatever the ranks did; `hpcopt train -n`
    must not."""
    log = tmp_path / "l.log"
    proc = launch("train", "-n", "3", "--out", str(tmp_path / "r"), *QUAD, *args, log=log)
    out = finish(proc, log)
    assert proc.returncode == 2, out


def test_a_run_killed_before_its_first_checkpoint_resumes_from_its_last_center_snapshot(tmp_path):
    """Issue 12, item 7."""
    run = tmp_path / "r"
    _train_and(tmp_path, run, "kill", "--record.checkpoint_seconds", "1000")
    assert not (run / "checkpoint.h5").exists()
    with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
        last, t = int(f["center/meta"]["exchanges"][-1]), float(f["center/meta"]["time"][-1])
        kept = f["exchanges"][f["exchanges"]["time"] <= t]  # what the resume keeps: up to that snapshot
        steps = {w: int(kept["step"][kept["worker_id"] == w].max()) for w in (0, 1)}
    out = _resume_a_while(tmp_path, run)
    assert f"no checkpoint: resuming from the trajectory's last center snapshot (exchange {last}" in out, out
    with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
        meta, ex = f["center/meta"][...], f["exchanges"][...]
    assert np.all(np.diff(meta["exchanges"]) > 0)  # the file goes on from that snapshot, no overlap
    resumed = ex[ex["time"] > meta["time"][list(meta["exchanges"]).index(last)]]
    assert resumed["step"].min() >= min(steps.values()) - 4  # the schedule continues, not from step 0


def test_a_damaged_trajectory_is_set_aside_and_the_run_goes_on_from_its_checkpoint(tmp_path):
    """Issue 12, item 6: a kill inside a flush can leave trajectory.h5 unreadable (torn metadata);
    truncating it is the same damage, deterministically."""
    run = tmp_path / "r"
    _train_and(tmp_path, run, "stop")
    with h5py.File(run / "checkpoint.h5", "r") as f:
        ck = int(f.attrs["exchanges"])
    size = (run / "trajectory.h5").stat().st_size
    with open(run / "trajectory.h5", "r+b") as f:
        f.truncate(size // 2)
    # the worst moment: killed at the new file's first flush after it began, before any checkpoint.
    # The checkpoint still counted the rows of the file set aside: every later resume aborted (the
    # new file is shorter), or cut a longer new file back to them and spliced (exchanges 96..180, 100..)
    p = subprocess.run([sys.executable, "-m", "hpcopt", "train", "-n", "3", "--resume", str(run)],
                       env=mpi_env({"HPCOPT_FAILPOINTS": "trajectory.flush.done@2"}), capture_output=True, text=True,
                       timeout=600)  # (a hang guard)
    assert p.returncode != 0 and "cannot be reopened" in p.stdout + p.stderr, p.stdout + p.stderr
    subprocess.run(["pkill", "-9", "-f", str(run)], check=False)
    out = _resume_a_while(tmp_path, run)
    assert "cannot be reopened" not in out, out  # the new file goes on
    assert len(list(run.glob("trajectory.damaged-*.h5"))) == 1
    s = json.loads(hpcopt("inspect", "--json", str(run)).stdout)
    assert s["status"] == "stopped"
    with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
        meta = f["center/meta"][...]
        assert int(meta["exchanges"][0]) == ck and f.attrs["continues"].startswith("trajectory.damaged-")
        assert np.all(np.diff(meta["exchanges"]) > 0), meta["exchanges"]
    # a file with fewer rows than its checkpoint counted (hand-edited): the reopen raised with the
    # file still open under MPI-IO, and setting it aside then aborted the job
    with h5py.File(run / "trajectory.h5", "r+") as f:
        f["exchanges"].resize(1, axis=0)
    out = _resume_a_while(tmp_path, run)
    assert "does not belong to this checkpoint" in out and "a new trajectory file goes on" in out, out
    assert len(list(run.glob("trajectory.damaged-*.h5"))) == 2
    (run / "trajectory.h5").unlink()  # deleted by hand, or a kill between setting one aside and the next
    out = _resume_a_while(tmp_path, run, more=10)
    assert "is not there, and a new trajectory file goes on" in out, out


def test_a_trajectory_file_is_resumed_only_by_a_checkpoint_of_that_very_file(tmp_path):
    import gc

    from hpcopt.io.trajectory import TrajectoryWriter

    kw = dict(n_params=4, lo=0, hi=4, shard_width=4, model_attrs={})
    w = TrajectoryWriter(str(tmp_path / "t.h5"), None, attrs={"run_id": "r"}, **kw)
    sizes = {**w.sizes(), "exchanges": 5}  # more rows than the file has
    w.close()
    with pytest.raises(ValueError, match="does not belong to this checkpoint"):
        TrajectoryWriter(str(tmp_path / "t.h5"), None, attrs={}, resume=sizes, **kw)
    gc.collect()
    os.replace(tmp_path / "t.h5", tmp_path / "aside.h5")
    with h5py.File(tmp_path / "aside.h5", "r+") as f:  # nothing holds it open
        assert f.attrs["file_id"] == sizes["file_id"]
    with pytest.raises(ValueError, match="not the file the checkpoint was taken of"):
        TrajectoryWriter(str(tmp_path / "aside.h5"), None, attrs={}, resume={**sizes, "exchanges": 0,
                                                                           "file_id": "another"}, **kw)


@pytest.mark.parametrize("point", ["trajectory.flush.resized@8", "trajectory.flush.tables@8", "checkpoint.written@3"])
def test_a_kill_inside_a_flush_or_a_checkpoint_leaves_a_readable_run_that_resumes(tmp_path, point):
    """Issue 12, item 6, deterministically: server 0 SIGKILLed at a failpoint inside the
    collective trajectory flush (datasets grown but not written; rows written but attributes not
    flushed) or between writing a checkpoint and renaming it over the old one. The job ends, the
    file reads back, and --resume goes on from the last complete checkpoint."""
    run = tmp_path / "r"
    p = subprocess.run([sys.executable, "-m", "hpcopt", "train", "-n", "3", "--out", str(run), "--train.epochs",
                        "100000", *QUAD], env=mpi_env({"HPCOPT_FAILPOINTS": point}), capture_output=True, text=True,
                       timeout=600)  # a hang guard only: the whole test took 183 s on a loaded machine
    assert p.returncode != 0 and "rank 0" in p.stderr, p.stdout + p.stderr
    wait_for("every process of the killed job to end",
             lambda: not subprocess.run(["pgrep", "-f", f"hpcopt train.*{run}"], capture_output=True).stdout, timeout=30)
    shown = json.loads(hpcopt("inspect", "--json", str(run)).stdout)
    assert shown["status"] == "running" and shown["exchanges"] > 0, shown  # as the kill left it
    with h5py.File(run / "checkpoint.h5", "r") as f:
        ck = int(f.attrs["exchanges"])
    assert ck > 0
    out = _resume_a_while(tmp_path, run)
    assert f"at exchange {ck}\n" in out and "cannot be reopened" not in out, out
    assert json.loads(hpcopt("inspect", "--json", str(run)).stdout)["status"] == "stopped"


def test_a_resumed_run_says_running_before_its_first_flush(tmp_path):
    """`hpcopt status` of a resumed run must not show what the previous launch left (stopped, its
    workers) until the first flush: killed at its first flush, the resumed launch's status.json
    already says running, resumed from the checkpoint."""
    run = tmp_path / "r"
    _train_and(tmp_path, run, "stop")
    assert status(run)["state"] == "stopped"
    with h5py.File(run / "checkpoint.h5", "r") as f:
        ck = int(f.attrs["exchanges"])
    p = subprocess.run([sys.executable, "-m", "hpcopt", "train", "-n", "3", "--resume", str(run)],
                       env=mpi_env({"HPCOPT_FAILPOINTS": "trajectory.flush.resized@1"}), capture_output=True,
                       text=True, timeout=600)  # (a hang guard)
    assert p.returncode != 0, p.stdout + p.stderr
    s = status(run)
    assert s["state"] == "running" and s["resumed_from_exchange"] == ck and s["exchanges"] == ck, s


def test_resuming_a_complete_run_is_refused(tmp_path):
    out = tmp_path / "done"
    mpirun(3, "train", "--out", str(out), *QUAD, "--train.epochs", "1")
    p = mpirun(3, "train", "--resume", str(out), check=False)
    assert p.returncode == 2 and "the run is complete" in p.stderr, p.stderr


def test_resume_with_another_model_or_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "m"
    mpirun(3, "train", "--out", str(out), *QUAD, "--train.epochs", "2")
    with h5py.File(out / "trajectory.h5", "r+") as f:
        f.attrs["status"] = "running"  # as a run killed mid-training leaves it (a complete one is not resumed)
    config = (out / "config.toml").read_text()
    # another model or data set: the workers' states and data order belong to the run's (a smaller
    # train set crashed resumed workers; joiners kept reading the old data.npz)
    for flag, value in (("--model.kwargs", '{"layers": 2}'), ("--data.seed", "7")):
        p = mpirun(3, "train", "--resume", str(out), flag, value, check=False)
        assert p.returncode == 2 and "a resume cannot change it" in p.stderr and flag[2:] in p.stderr, p.stderr
    assert (out / "config.toml").read_text() == config
    other = tmp_path / "other"  # the same model, so every size fits: only the run id tells them apart
    mpirun(3, "train", "--out", str(other), *QUAD, "--train.epochs", "2", "--run.method", "lsgd", "--lsgd.tau_g", "8")
    own = (out / "trajectory.h5").read_bytes()
    with h5py.File(other / "trajectory.h5", "r+") as f:
        f.attrs["status"] = "running"
    # a resume refused by a check after the checkpoint's: it rewrote config.toml and the join token
    # first, so every later resume was refused too
    config, token = (other / "config.toml").read_text(), (other / "token").read_text()
    p = mpirun(3, "train", "--resume", str(other), "--easgd.tau", "3", check=False)
    assert p.returncode == 2 and "must be a multiple of easgd.tau = 3" in p.stderr, p.stderr
    assert (other / "config.toml").read_text() == config and (other / "token").read_text() == token
    foreign = (other / "trajectory.h5").read_bytes()
    (out / "trajectory.h5").write_bytes(foreign)
    p = mpirun(3, "train", "--resume", str(out), check=False)
    assert p.returncode == 2 and "copied in from another run" in p.stderr, p.stderr
    assert (out / "trajectory.h5").read_bytes() == foreign  # refused before anything was cut back or set aside
    (out / "trajectory.h5").write_bytes(own)
    (out / "checkpoint.h5").write_bytes(b"garbage" * 100)
    p = mpirun(3, "train", "--resume", str(out), check=False)
    assert p.returncode == 2 and "corrupt" in p.stderr, p.stderr
    p = mpirun(3, "train", "--resume", str(tmp_path / "nothing"), check=False)
    assert p.returncode == 2 and "config.toml" in p.stderr, p.stderr


@pytest.mark.parametrize("victim", ["server 0", "server 1", "rank 3"])
def test_a_dead_server_ends_every_rank_without_waiting_for_comm_timeout(tmp_path, victim):
    """Issue 12, item 8: with the default comm.timeout (120 s), a dead server ends the job at once,
    non-zero, with the checkpoint intact: server 0 SIGKILLed mid-run, or server 1 SIGKILLed inside
    a collective flush (server 0 waits there in MPI-IO, past every deadline but its watchdog's, and
    the workers for comm.timeout: it took two minutes). The launcher watches every server's pid,
    and every rank's while they set up together (a worker killed there hung the job for good)."""
    run, log = tmp_path / "r", tmp_path / "train.log"
    point = {"server 1": "trajectory.flush.resized.server1@20",  # (about the tenth flush, after a checkpoint)
             "rank 3": "train.setup.rank3@1"}.get(victim, "")
    proc = subprocess.Popen([sys.executable, "-m", "hpcopt", "train", "-n", "4", "--out", str(run), "--train.epochs",
                             "100000", *QUAD, "--run.servers", "2"], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=mpi_env({"HPCOPT_FAILPOINTS": point}))
    try:
        if victim == "server 0":
            wait_for("a checkpoint", lambda: (run / "checkpoint.h5").exists() and status(run).get("exchanges", 0) > 20,
                     proc, log=log)
            os.kill(_rank_pids(run)[0], signal.SIGKILL)
        out = finish(proc, log, timeout=90)  # far less than comm.timeout
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", str(run)], check=False)
    assert proc.returncode == 1, out
    if victim == "rank 3":
        assert "rank 3 (pid" in out and "while the job was setting up" in out, out
        return
    rank = victim[-1]
    assert f"{victim} (rank {rank}, pid" in out and "is gone without an exit status" in out, out
    assert f"--resume {run}` goes on from its last checkpoint" in out, out
    with h5py.File(run / "checkpoint.h5", "r") as f:
        assert np.isfinite(f["center"][...]).all()


def _rank_pids(run) -> dict[int, int]:
    ranks = {}
    for pid in subprocess.run(["pgrep", "-f", f"hpcopt train.*{run}"], capture_output=True, text=True).stdout.split():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [e for e in env if e.startswith(b"OMPI_COMM_WORLD_RANK=")]
        if rank:
            ranks[int(rank[0].split(b"=")[1])] = int(pid)
    return ranks


def test_a_server_hung_inside_the_final_flush_ends_the_job_instead_of_hanging(tmp_path):
    """The final flush has no worker left to time out, and a hung (not dead) server is alive to
    the launcher: server 1 stopped inside it (SIGSTOP) left server 0 in the collective HDF5 write
    forever. A watchdog ends the job after comm.timeout + comm.worker_timeout, with a failing exit
    status, and no process of it is left."""
    run = tmp_path / "r"
    p = subprocess.run([sys.executable, "-m", "hpcopt", "train", "-n", "4", "--run.servers", "2", "--out", str(run),
                        "--train.epochs", "20", *QUAD, "--record.flush_seconds", "1000", "--comm.timeout", "10"],
                       env=mpi_env({"HPCOPT_FAILPOINTS": "trajectory.flush.resized.server1@1:stop"}),
                       capture_output=True, text=True, timeout=300)  # (a hang guard: it used to hang here)
    assert p.returncode != 0, p.stdout + p.stderr
    assert "final flush did not complete within 14 s" in p.stderr, p.stdout + p.stderr
    wait_for("every process of the killed job to end",
             lambda: not subprocess.run(["pgrep", "-f", f"hpcopt train.*{run}"], capture_output=True).stdout, timeout=30)


def _saved_step(run, wid) -> int:
    import torch

    return int(torch.load(run / "workers" / f"worker-{wid:05d}.pt", weights_only=True)["step"])


def _ckpt_rows(run) -> dict[int, int]:
    with h5py.File(run / "checkpoint.h5", "r") as f:
        return {int(r["worker_id"]): int(r["step"]) for r in f["workers"][...]}


def test_a_crashed_worker_is_owed_its_epochs_and_a_resume_continues_it(tmp_path):
    """One worker of three SIGKILLed mid-run, the others finish: the run is stopped, not
    complete (it used to say complete, drop the crashed worker's checkpoint row and refuse
    --resume); the resume continues that worker from its own saved step to the end."""
    run, log = tmp_path / "r", tmp_path / "train.log"
    proc = launch("train", "-n", "4", "--out", str(run), "--train.epochs", "50", *QUAD, log=log)
    try:
        wait_for("worker 1's saved state", lambda: (run / "workers" / "worker-00001.pt").exists()
                 and 1 in [w["id"] for w in status(run).get("workers", [])], proc, log=log)
        os.kill(_worker_pid(run, 1), signal.SIGKILL)
        out = finish(proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", str(run)], check=False)
    assert proc.returncode == 0, out  # not every worker crashed
    assert "the run is stopped, not complete: worker(s) 1 did not finish" in out, out
    ev = events(run / "trajectory.h5")
    assert [e[1] for e in ev if e[0] == "crash"] == [1]
    with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
        assert f.attrs["status"] == "stopped"
        ex = f["exchanges"][...]
    last = {w: int(ex["step"][ex["worker_id"] == w].max()) for w in (0, 1, 2)}
    assert last[0] == last[2] > last[1]  # 0 and 2 finished their epochs, 1 did not
    assert status(run)["state"] == "stopped"
    rows = _ckpt_rows(run)
    assert sorted(rows) == [1] and last[0] > rows[1] >= last[1] > 0, rows  # the crashed worker's row, at its last step
    saved = _saved_step(run, 1)
    assert 0 < saved <= rows[1]

    rlog = tmp_path / "resume.log"
    proc = launch("train", "-n", "2", "--resume", str(run), log=rlog)  # 1 server + 1 worker
    try:
        out = finish(proc, rlog)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert "no saved state" not in out and "not complete" not in out, out
    with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
        assert f.attrs["status"] == "complete"
        after = f["exchanges"][len(ex):]
    assert set(after["worker_id"].tolist()) == {1}
    assert after["step"][0] == saved + 4 and after["step"][-1] == last[0], after["step"][[0, -1]]
    assert status(run)["state"] == "complete"  # (--resume now refuses it)


def test_a_resume_with_fewer_workers_keeps_the_others_for_a_later_one_with_more(tmp_path):
    """2 workers, stop; resume with 1, stop; resume with 2: worker 1, not started by the second
    launch, keeps its checkpoint row and continues from its own saved state in the third (it
    used to be forgotten: a new worker 2 started with no saved state)."""
    run = tmp_path / "r"
    _train_and(tmp_path, run, "stop")
    first = _ckpt_rows(run)
    assert sorted(first) == [0, 1]
    saved = _saved_step(run, 1)
    with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
        n_first = len(f["exchanges"])
    _resume_a_while(tmp_path, run, n=2)  # 1 server + worker 0
    rows = _ckpt_rows(run)
    assert sorted(rows) == [0, 1] and rows[1] == first[1] and rows[0] > first[0], (first, rows)
    with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
        assert f.attrs["status"] == "stopped"
        n_before = len(f["exchanges"])
        assert set(f["exchanges"]["worker_id"][n_first:].tolist()) == {0}
    assert _saved_step(run, 1) == saved
    out = _resume_a_while(tmp_path, run, n=3)  # 1 server + workers 0 and 1
    assert "no saved state" not in out, out
    with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
        after = f["exchanges"][n_before:]
    assert set(after["worker_id"].tolist()) == {0, 1}
    mine = after[after["worker_id"] == 1]
    assert mine["step"][0] == saved + 4, (saved, mine["step"][:3])
