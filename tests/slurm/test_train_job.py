"""jobscripts/train.sbatch on two nodes of the local Slurm cluster, with either launcher, and
jobscripts/analyze.sbatch on the run it wrote."""

from __future__ import annotations

import pytest
from slurmlib import has_command, inspect

# The first test of a session may install and start the cluster (apt-get: a minute or two).
# every Slurm test on one pytest-xdist worker (make test: --dist loadgroup): they share one
# simulated cluster, which the worker whose session started it stops at its end
pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("slurm")]

SHORT = ["--train.epochs", "5", "--record.flush_seconds", "0.5", "--record.eval_seconds", "0.5"]


def train_job(slurm, tmp_path, launcher: str):
    run, out = tmp_path / "run", tmp_path / "train.out"
    job = slurm.sbatch("-N", "2", "--ntasks-per-node=2", f"--output={out}", "jobscripts/train.sbatch", str(run),
                       *SHORT, env={"LAUNCHER": launcher})
    info = slurm.wait_done(job, timeout=300, log=out)
    return run, job, info, out.read_text()


@pytest.fixture(scope="module")
def srun_run(slurm, tmp_path_factory):
    return train_job(slurm, tmp_path_factory.mktemp("srun"), "srun")


def check_training(slurm, run, job, info, text):
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    # 1 server + 2 workers on the first node, 2 workers on the second, in rank order
    first, second = slurm.run("scontrol", "show", "hostnames", info["NodeList"]).stdout.split()
    assert (run / f"hosts.{job}").read_text().split() == [first] * 3 + [second] * 2
    s = inspect(run / "trajectory.h5")
    assert s["status"] == "complete" and s["servers"] == 1 and len(s["workers"]) == 4
    assert s["exchanges"] > 0 and s["center_snapshots"] > 1
    assert "final center test accuracy" in text  # server 0's progress reached the job's output


def test_train_with_srun_on_two_nodes(slurm, srun_run):
    run, job, info, text = srun_run
    check_training(slurm, run, job, info, text)
    logs = run / "logs" / job
    assert sorted(p.name for p in logs.glob("rank-*.log")) == [f"rank-{r}.log" for r in range(5)]
    assert "joins need LAUNCHER=mpirun" in text


def test_train_with_mpirun_on_two_nodes(slurm, tmp_path):
    run, job, info, text = train_job(slurm, tmp_path, "mpirun")
    check_training(slurm, run, job, info, text)
    assert sorted(p.name for p in (run / "logs" / job / "1").glob("rank.*")) == [f"rank.{r}" for r in range(5)]
    assert (run / "ompi-server.uri").exists() and "ompi-server up" in text  # the run took joins


def test_analyze_job(slurm, srun_run, tmp_path):
    if not has_command("analyze"):
        pytest.skip("`hpcopt analyze` is not there yet")
    run = srun_run[0]
    out = tmp_path / "analyze.out"
    job = slurm.sbatch("-N", "1", "--ntasks-per-node=2", f"--output={out}", "jobscripts/analyze.sbatch", str(run),
                       "--grid", "5x5", "--line-points", "5", "--interp-points", "5", "--samples", "200",
                       "--skip", "hessian,sharpness,density", "--no-report")
    info = slurm.wait_done(job, timeout=300, log=out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out.read_text()
    assert "--time-limit" in out.read_text()  # the job's time limit reached hpcopt analyze
    assert (run / "analysis" / "analysis.h5").exists()
    assert sorted(p.name for p in (run / "logs" / job).glob("rank-*.log")) == ["rank-0.log", "rank-1.log"]
