"""A job killed with SIGKILL in the middle of training leaves a readable trajectory file."""

import os
import signal
import subprocess
import sys
import time

import h5py
import pytest

from conftest import hpcopt, mpi_env

pytestmark = pytest.mark.mpi


def rows(path):
    """Center snapshot rows in the file, or -1 while it cannot be read yet."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return f["center/params"].shape[0]
    except (OSError, KeyError):
        return -1


def test_sigkill_mid_training_leaves_a_readable_file(tmp_path):
    out = tmp_path / "k"
    path = out / "trajectory.h5"
    cmd = ["mpirun", "-n", "3", sys.executable, "-m", "hpcopt", "train", "--out", str(out),
           "--train.epochs", "200", "--record.flush_seconds", "0.3", "--record.center_every", "5"]
    proc = subprocess.Popen(cmd, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while rows(path) < 4:  # several flushes have happened
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "no snapshots appeared"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # every rank at once, mid-training
        proc.wait(timeout=30)

    with h5py.File(path, "r", locking=False) as f:
        assert f.attrs["status"] == "running"  # it never got to finish
        n = f["center/params"].shape[0]
        assert n >= 4 and f["center/meta"].shape[0] == n
        assert f["center/meta"]["exchanges"][n - 1] == 5 * (n - 1)
        assert len(f["exchanges"]) >= 5 * (n - 1)
        f["center/params"][n - 1]  # the data is there, not only the extent
    p = hpcopt("inspect", "--json", str(path))
    assert p.returncode == 0, p.stderr
