"""A real Slurm 22.05 cluster of three simulated nodes (n1, n2, n3) on this machine, for the tests
of the batch scripts in jobscripts/ (no mocked sbatch).

The session fixture `slurm` starts it with tests/slurm/cluster.sh (installing slurm-wlm and munge
with apt-get when they are missing and we are root) and stops it at the end, unless it was already
running before the session. Without Slurm, and without root to install it, the tests are skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from slurmlib import HPCOPT, SLURM_DIR, Slurm, cluster, slurm_missing


@pytest.fixture(scope="session")
def slurm():
    why = slurm_missing()
    if why:
        pytest.skip(why)
    was_running = cluster("status", 30).returncode == 0
    started = cluster("start", 600)  # includes apt-get install the first time
    if started.returncode != 0:
        raise RuntimeError(f"tests/slurm/cluster.sh start failed:\n{started.stdout}\n{started.stderr}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update({
        "SLURM_CONF": str(SLURM_DIR / "etc" / "slurm.conf"),
        # The simulated nodes share one host: Open MPI's shared-memory transport mixes them up.
        "OMPI_MCA_btl": "self,tcp",
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "HPCOPT": HPCOPT,
        "PYTHONUNBUFFERED": "1",
    })
    yield Slurm(env=env)
    if not was_running:
        cluster("stop", 120)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return tmp_path / "run"
