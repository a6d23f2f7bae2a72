"""A training that grows, shrinks and is requeued under Slurm: jobscripts/join.sbatch adds the
third node's workers to a running train.sbatch job, `scancel` of the join job makes them leave,
and preemptible.sbatch survives `scontrol requeue` by resuming the same trajectory file."""

from __future__ import annotations

import os
import signal
import time

import h5py
import numpy as np
import pytest
from slurmlib import has_command, inspect, read_status, wait_for

# every Slurm test on one pytest-xdist worker (make test: --dist loadgroup): they share one
# simulated cluster, which the worker whose session started it stops at its end
pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("slurm")]

# Long enough to be still running when the test is done with it: the test ends it itself.
LONG = ["--train.epochs", "2000", "--record.flush_seconds", "0.5", "--record.eval_seconds", "1",
        "--record.center_every", "10"]


def workers_now(run) -> list[dict]:
    s = read_status(run)
    return s.get("workers", []) if s.get("state") == "running" else []


# Joins between two mpirun jobs on the simulated cluster: each mpirun starts its ranks on its own
# node (DESIGN.md: daemons started through srun on a simulated node lose contact once the jobs connect).
ISOLATED = {"LAUNCHER": "mpirun", "OMPI_MCA_plm": "isolated", "OMPI_MCA_ras": "^slurm"}


def test_join_then_scancel_the_joiners(slurm, tmp_path):
    if not (has_command("join") and has_command("status")):
        pytest.skip("`hpcopt join` / `hpcopt status` are not there yet (issue 4)")
    run, train_out, join_out = tmp_path / "run", tmp_path / "train.out", tmp_path / "join.out"
    train = slurm.sbatch("-N", "2", "-w", "n[1-2]", "--ntasks-per-node=1", f"--output={train_out}",
                         "jobscripts/train.sbatch", str(run), *LONG, env=ISOLATED)
    log = lambda: train_out.read_text()[-3000:] if train_out.exists() else ""
    try:
        wait_for("the training's 2 workers exchanging", lambda: len(workers_now(run)) == 2, 240, log)

        join = slurm.sbatch("-N", "1", "-w", "n3", "--ntasks-per-node=2", f"--output={join_out}",
                            "jobscripts/join.sbatch", str(run), env=ISOLATED)
        jlog = lambda: log() + "\n--- join job\n" + (join_out.read_text()[-3000:] if join_out.exists() else "")
        members = wait_for("2 joined workers", lambda: len(workers_now(run)) == 4 and workers_now(run), 240, jlog)
        assert len({w["id"] for w in members}) == 4

        slurm.cancel(join)  # SIGTERM to every process of the join job: its workers leave
        info = slurm.wait_done(join, timeout=120, log=join_out)
        assert info["JobState"] == "CANCELLED", info
        wait_for("the joiners gone from the status", lambda: len(workers_now(run)) == 2, 120, jlog)
        # training goes on without them
        before = read_status(run)["exchanges"]
        wait_for("exchanges after the leave", lambda: read_status(run).get("exchanges", 0) > before + 10, 120, jlog)
    finally:
        slurm.cancel(train)  # SIGTERM to the servers: they stop the run and close the file
    info = slurm.wait_done(train, timeout=120, log=train_out)
    s = inspect(run / "trajectory.h5")
    assert len(s["workers"]) == 4, s  # 2 of the training + 2 joiners, all in the file
    assert s["events"].get("join", 0) >= 4 and s["events"].get("leave", 0) >= 2, s["events"]
    assert s["events"].get("crash", 0) == 0, s["events"]  # the joiners left cleanly


PREEMPTIBLE = ["--train.epochs", "20", "--record.flush_seconds", "0.5", "--record.eval_seconds", "1",
               "--record.center_every", "10", "--record.checkpoint_seconds", "1"]


def test_preemptible_jobs_resume_the_same_file_after_every_kind_of_stop(slurm, tmp_path):
    """preemptible.sbatch on two nodes, four jobs at once (the waits for Slurm overlap), each
    stopped mid-run in its own way, each requeued and resumed to the end of the same file:
      requeue  SIGTERM to the whole job (an admin, preemption: `scontrol requeue`);
      signal   USR1 to the batch shell (the time-limit warning of --signal=B:USR1@120), which
               stops the run through the ranks and requeues the job itself;
      step     SIGTERM to the training's step alone, as when Slurm cancels the step (the late
               clean-up of a killed step with the same id did, once): it stops cleanly,
               unfinished, and the job script resumes it, counted as a retry;
      kill     server 0 SIGKILLed (as by the OOM killer): every rank ends, the job script sees
               the failure and requeues itself, and the requeued job resumes the run."""
    if not (has_command("status") and "--resume" in slurm.run("bash", "-c", '"$HPCOPT" train --help').stdout):
        pytest.skip("`hpcopt train --resume` / `hpcopt status` are not there yet (issue 4)")
    kinds = ["requeue", "signal", "step", "kill"]
    runs = {k: tmp_path / k for k in kinds}
    outs = {k: tmp_path / f"{k}.out" for k in kinds}
    jobs = {k: slurm.sbatch("-N", "2", "--ntasks-per-node=1", f"--output={outs[k]}", "jobscripts/preemptible.sbatch",
                            str(runs[k]), *PREEMPTIBLE) for k in kinds}

    def mid_run(k) -> bool:
        return read_status(runs[k]).get("exchanges", 0) >= 40 and (runs[k] / "checkpoint.h5").exists()

    waiting, deadline = set(kinds), time.monotonic() + 300
    while waiting:  # stop each as soon as it is mid-run, with a checkpoint
        for k in sorted(waiting):
            if not mid_run(k):
                continue
            waiting.discard(k)
            if k == "requeue":
                slurm.run("scontrol", "requeue", jobs[k])
            elif k == "signal":
                slurm.run("scancel", "--batch", "--signal=USR1", jobs[k])
            elif k == "step":
                slurm.run("scancel", "--signal=TERM", f"{jobs[k]}.0")
            else:
                os.kill(int(read_status(runs[k])["pid"]), signal.SIGKILL)  # the nodes are simulated on this host
        if time.monotonic() > deadline:
            raise AssertionError("not mid-run in 300 s: " + ", ".join(
                f"{k}:\n{outs[k].read_text()[-2000:] if outs[k].exists() else ''}" for k in sorted(waiting)))
        time.sleep(0.2)
    for k in kinds:
        # a requeued job waits cred_expire + 1 s (11 s on the test cluster), then starts by itself
        slurm.wait(jobs[k], lambda i: i.get("Restarts", "0") != "0", 180, f"{k}: requeued", outs[k])
    for k in kinds:
        info = slurm.wait_done(jobs[k], timeout=400, log=outs[k])
        text = outs[k].read_text()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
            f"{k}: {info}\n{text}\n{slurm.controller_log(jobs[k])}"
        assert "start 2 of job" in text and "resuming" in text, f"{k}: {text}"
        if k == "step":
            assert "got SIG" not in text and "stopped unfinished although this job was not told to stop" in text, text
            assert (runs[k] / "failed-starts").read_text().strip() == "1"
        elif k == "kill":
            assert "the training failed" in text, text
            # at least one retry; on the simulated cluster the requeued start can also be cancelled by
            # the late clean-up of the killed step (same step id): the next retry absorbs that too
            assert 1 <= int((runs[k] / "failed-starts").read_text()) <= 3
        else:
            assert ("got SIGUSR1" in text and "requeueing job" in text) if k == "signal" else "got SIGTERM" in text
        s = inspect(runs[k] / "trajectory.h5")
        assert s["status"] == "complete" and s["events"].get("resume", 0) >= 1, (k, s)
        with h5py.File(runs[k] / "trajectory.h5", "r", locking=False) as f:
            snapshots = np.unique(f["center/meta"]["exchanges"][:])
        assert snapshots[0] == 0 and len(snapshots) > 2, (k, snapshots)
        if k != "kill":  # the file goes on from the checkpoint: no hole wider than one snapshot interval
            assert np.diff(snapshots).max() <= 10, (k, snapshots)
