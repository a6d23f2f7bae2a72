"""The batch scripts' rank count per node under each way Slurm can be asked for GPUs (issue 15):
jobscripts/hpcopt-job.sh's per_node_ranks, run by bash with the variables Slurm sets."""

import subprocess
from pathlib import Path

import pytest

HELPERS = Path(__file__).resolve().parents[2] / "jobscripts" / "hpcopt-job.sh"


def per_node_ranks(env: dict) -> str:
    return subprocess.run(["bash", "-c", f'source "{HELPERS}" && per_node_ranks'], env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("env, ranks", [
    ({"SLURM_GPUS_PER_NODE": "a100:4", "SLURM_NTASKS_PER_NODE": "8"}, "4"),   # --gpus-per-node=a100:4
    ({"SLURM_GPUS_PER_NODE": "2"}, "2"),                                        # --gpus-per-node=2
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "1"}, "4"),          # --gres=gpu:4
    ({"SLURM_JOB_GPUS": "0,1,2", "SLURM_NTASKS_PER_NODE": "1"}, "3"),          # only the ids
    ({"SLURM_NTASKS_PER_NODE": "6"}, "6"),                                      # CPU nodes: one per task
    ({}, "1"),
])
def test_one_rank_per_gpu_however_the_gpus_were_asked_for(env, ranks):
    assert per_node_ranks(env) == ranks
