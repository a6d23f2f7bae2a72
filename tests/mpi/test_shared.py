"""Exchanges in place through shared memory (hpcopt.comm.shared), mixed with exchanges over
messages in one exchange, under real mpirun."""

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from conftest import mpi_env

SCRIPT = Path(__file__).resolve().parent / "scripts" / "mixed_exchange.py"


def test_one_exchange_in_place_with_one_server_and_over_messages_with_the_other(tmp_path):
    p = subprocess.run(["mpirun", "-n", "3", sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True,
                       text=True, timeout=120, env=mpi_env())
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr
    xs, centers = np.load(tmp_path / "xs.npy"), np.load(tmp_path / "centers.npy")
    with h5py.File(tmp_path / "mixed.h5", "r", locking=False) as f:
        # both shards recorded what the worker had (server 0 read it in place, server 1 received it)
        np.testing.assert_array_equal(f["workers/params"][()], xs)
        np.testing.assert_allclose(f["center/params"][()], centers, rtol=1e-5, atol=1e-6)
