"""Helpers of the Slurm tests: start/stop the local cluster (tests/slurm/cluster.sh), submit
jobs, follow their state, read trajectory files. The fixtures are in conftest.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = Path(__file__).resolve().parent / "cluster.sh"
SLURM_DIR = Path(os.environ.get("HPCOPT_SLURM_DIR", "/tmp/hpcopt-slurm"))
# The venv's console script; HPCOPT=/path/to/hpcopt overrides it (another checkout, say).
HPCOPT = os.environ.get("HPCOPT") or str(Path(sys.executable).parent / "hpcopt")

# What a job waits in before it ends, and the states it can end in.
LIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


def slurm_missing() -> str | None:
    """None when Slurm is here or can be installed; otherwise why not."""
    if all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed (slurmctld, slurmd, sbatch, munged) and installing it needs root and apt-get"
    return None


def cluster(cmd: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), cmd], check=False, capture_output=True, text=True, timeout=timeout)


@dataclass
class Slurm:
    """The running test cluster: submit jobs, follow them, read their output."""

    env: dict = field(default_factory=dict)

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), check=False, capture_output=True, text=True, timeout=timeout, env=self.env, cwd=ROOT)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        """Submit from the repository root (the scripts' relative paths start there); returns the job id."""
        proc = subprocess.run(["sbatch", "--parsable", *args], check=False, capture_output=True, text=True, timeout=30,
                              env={**self.env, **(env or {})}, cwd=ROOT)
        if proc.returncode != 0:
            raise AssertionError(f"sbatch {' '.join(args)} failed:\n{proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, NodeList, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        info = {}
        for item in out.split():
            key, _, value = item.partition("=")
            info.setdefault(key, value)
        return info

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait(self, job_id: str, until, timeout: float, what: str = "", log: Path | None = None) -> dict:
        """Poll the job until until(info) is true; fail with its state and output after timeout s."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            if time.monotonic() > deadline:
                text = log.read_text()[-4000:] if log and log.exists() else ""
                raise AssertionError(f"job {job_id}: {what or 'condition'} not reached in {timeout:.0f} s; "
                                     f"state {info.get('JobState')}\n--- job output\n{text}")
            time.sleep(0.5)

    def wait_done(self, job_id: str, timeout: float, log: Path | None = None) -> dict:
        return self.wait(job_id, lambda i: i.get("JobState") not in LIVE, timeout, "the end", log)

    def controller_log(self, job_id: str) -> str:
        """slurmctld's log lines about one job (why it was requeued, failed, or never started)."""
        try:
            lines = (SLURM_DIR / "log" / "slurmctld.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        mine = [line for line in lines if f"JobId={job_id} " in line + " " or f"job {job_id} " in line + " "]
        return "--- slurmctld.log\n" + "\n".join(mine[-40:])

    def cancel(self, job_id: str, *flags: str) -> None:
        self.run("scancel", *flags, job_id, check=False)


def inspect(path: Path) -> dict:
    """`hpcopt inspect --json` of a trajectory file (readable while the servers still write it)."""
    proc = subprocess.run([HPCOPT, "inspect", "--json", str(path)], check=False,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HDF5_USE_FILE_LOCKING": "FALSE"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def has_command(*words: str) -> bool:
    """Whether `hpcopt WORDS... --help` works: the join/resume pieces land separately."""
    proc = subprocess.run([HPCOPT, *words, "--help"], check=False, capture_output=True, text=True, timeout=60)
    return proc.returncode == 0


def read_status(run: Path) -> dict:
    """RUN/status.json (rewritten atomically by server 0), or {} while it is not there yet."""
    try:
        return json.loads((run / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def wait_for(what: str, predicate, timeout: float, detail=lambda: ""):
    """Poll predicate() until it returns something true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout:.0f} s\n{detail()}")
        time.sleep(0.5)
