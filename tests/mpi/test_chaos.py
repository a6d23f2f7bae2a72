"""The chaos benchmark's short form (twelve faults, every kind once, however fast the machine): a real MNIST-1D training under random faults (worker
kills and leaves, joins, two joins at once, abandoned, malformed and wrong-token joins, a graceful
stop and a kill -9 of the whole job, each resumed) survives every one of them."""

import subprocess
import sys

import pytest

from conftest import ROOT, mpi_env

pytestmark = pytest.mark.mpi


def test_a_training_survives_two_minutes_of_faults(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--faults", "12", "--mtbf", "2",
                        "--seed", "3", "--epochs", "100000", "--no-reference", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=mpi_env(), timeout=600)
    last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    assert p.returncode == 0 and last.startswith("survived "), p.stdout + p.stderr
    done, injected = (int(x) for x in last.split()[1].split("/"))
    assert done == injected == 12, p.stdout
    assert "center finite at every snapshot  yes" in p.stdout and "workers that started over        0" in p.stdout
