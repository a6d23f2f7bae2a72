"""The run directory: everything about one run in one place, on a file system every node sees.

    OUT/trajectory.h5     the trajectory (written by the servers through MPI-IO)
    OUT/config.toml       the run's config (a resume and a join read it)
    OUT/data.npz          the generated data set, so joiners read the very same data
    OUT/token             the join token (mode 0600): a join must present it
    OUT/ompi-server.uri   the rendezvous server joins connect through (when joins are enabled)
    OUT/join.json         how to join: the servers' MPI ports
    OUT/joins/            join requests and the servers' answers
    OUT/status.json       live status, rewritten atomically by server 0 (`hpcopt status`)
    OUT/checkpoint.h5     the servers' last checkpoint (atomic; `hpcopt train --resume`)
    OUT/workers/          each worker's own last state (local optimizer, data order), atomic
    OUT/logs/             one log per rank when launched by `hpcopt train -n` / `hpcopt join -n`

Nothing is written outside it (no $HOME, no node-local /tmp), so it works on a shared file
system across nodes.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path


class RunDir:
    def __init__(self, path):
        self.path = Path(path)
        self.trajectory = self.path / "trajectory.h5"
        self.config = self.path / "config.toml"
        self.token = self.path / "token"
        self.server_uri = self.path / "ompi-server.uri"
        self.join_info = self.path / "join.json"
        self.joins = self.path / "joins"
        self.status = self.path / "status.json"
        self.checkpoint = self.path / "checkpoint.h5"
        self.workers = self.path / "workers"
        self.logs = self.path / "logs"

    def worker_state(self, worker_id: int) -> Path:
        return self.workers / f"worker-{worker_id:05d}.pt"

    def new_token(self) -> str:
        token = secrets.token_hex(16)
        write_atomic(self.token, token + "\n", mode=0o600)
        return token

    def read_token(self) -> str:
        try:
            return self.token.read_text().strip()
        except OSError as e:
            raise ValueError(f"cannot read the join token {self.token}: {e.strerror}") from None


def write_atomic(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: readers see the old
    or the new file, never half of one, also after a crash."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)
