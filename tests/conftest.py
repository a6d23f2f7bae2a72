"""Shared helpers: run real `mpirun` jobs of hpcopt (no mocks) and read their files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"
sys.path.insert(0, str(PLUGINS))  # the test plugins (quadratic) import here and on every rank


def mpi_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        # ranks may outnumber the 2 cores of a CI machine
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
        "PYTHONPATH": os.pathsep.join([str(PLUGINS), env.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def mpirun(n: int, *args: str, timeout: float = 240, check: bool = True, env: dict | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `mpirun -n N python -m hpcopt ARGS` and return the finished process."""
    cmd = ["mpirun", "-n", str(n), sys.executable, "-m", "hpcopt", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=mpi_env(env), cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def hpcopt(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m hpcopt ARGS` as a single process (no mpirun)."""
    return subprocess.run([sys.executable, "-m", "hpcopt", *args], capture_output=True, text=True,
                          timeout=timeout, env=mpi_env(env))


@pytest.fixture
def tiny_mnist1d(tmp_path) -> list[str]:
    """Flags for a short MNIST-1D training into tmp_path/run."""
    return ["--out", str(tmp_path / "run"), "--train.epochs", "3", "--run.method", "eamsgd", "--train.lr", "0.1", "--record.flush_seconds", "0.5",
            "--record.eval_seconds", "0.5", "--easgd.tau", "4"]
