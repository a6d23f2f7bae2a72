"""jobscripts/train.sbatch on two nodes of the local Slurm cluster, with either launcher."""

from __future__ import annotations

import pytest
from slurmlib import inspect

# The first test of a session may install and start the cluster (apt-get: a minute or two).
pytestmark = pytest.mark.timeout(900)

EPOCHS = ["--train.epochs", "5", "--record.flush_seconds", "0.5", "--record.eval_seconds", "0.5"]


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_train_on_two_nodes_writes_the_trajectory(slurm, run_dir, launcher):
    out = run_dir.parent / "job.out"
    job = slurm.sbatch("-N", "2", "--ntasks-per-node=2", f"--output={out}", "jobscripts/train.sbatch", str(run_dir),
                       *EPOCHS, env={"LAUNCHER": launcher})
    info = slurm.wait_done(job, timeout=300, log=out)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert info["NodeList"] in ("n[1-2]", "n[1-3]", "n[2-3]", "n[1,3]"), info["NodeList"]

    # 1 server + 2 workers on the first node, 2 workers on the second, in rank order
    first, second = slurm.run("scontrol", "show", "hostnames", info["NodeList"]).stdout.split()
    assert (run_dir / f"hosts.{job}").read_text().split() == [first] * 3 + [second] * 2
    s = inspect(run_dir / "trajectory.h5")
    assert s["status"] == "complete" and s["servers"] == 1 and len(s["workers"]) == 4
    assert s["exchanges"] > 0 and s["center_snapshots"] > 1
    assert "final center test accuracy" in text  # server 0's progress reached the job's output
    logs = run_dir / "logs" / job
    if launcher == "srun":
        assert sorted(p.name for p in logs.glob("rank-*.log")) == [f"rank-{r}.log" for r in range(5)]
    else:
        assert sorted(p.name for p in (logs / "1").glob("rank.*")) == [f"rank.{r}" for r in range(5)]
        assert (run_dir / "ompi-server.uri").exists()  # joins were possible
