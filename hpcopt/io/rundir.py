"""The run directory: everything about one run in one place, on a file system every node sees.

    OUT/trajectory.h5     the trajectory (written by the servers through MPI-IO)
    OUT/config.toml       the run's config (a resume and a join read it)
    OUT/data.npz          the generated data set, so joiners read the very same data
    OUT/data.json         or, for a user's data file, its digest: resumes and joins refuse a changed file
    OUT/token             the join token (mode 0600): a join must present it
    OUT/ompi-server.uri   the rendezvous server joins connect through (when joins are enabled)
    OUT/join.json         joins are open: how many servers (each request gets its own ports)
    OUT/joins/            join requests and the servers' answers
    OUT/status.json       live status, rewritten atomically by server 0 (`hpcopt status`)
    OUT/checkpoint.h5     the servers' last checkpoint (atomic; `hpcopt train --resume`)
    OUT/workers/          each worker's own last state (local optimizer, data order), atomic
    OUT/center.pt         the center when the training last ended, as a PyTorch state_dict of the
                          run's model (server 0, atomic; hpcopt.export)
    OUT/logs/             one log per rank when launched by `hpcopt train -n` / `hpcopt join -n`
    OUT/tensorboard/      live metrics as TensorBoard event files (record.tensorboard; server 0)
    OUT/lock              who trains this run now (host, pid), refreshed at every flush
    OUT/launch.lock       held (flock) by the `hpcopt train -n` launcher for as long as it runs

Nothing is written outside it (no $HOME, no node-local /tmp), so it works on a shared file
system across nodes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from pathlib import Path


class RunLocked(ValueError):
    """Another training owns the run directory."""


_WORKER_FILE = re.compile(r"worker-\d+\.pt")  # RunDir.worker_state
_JOIN_FILE = re.compile(r"\d{8}T\d{6}-[0-9a-f]{8}\.(req|ok|refused|port-\d+)")  # hpcopt.comm.joins
_TEMP = re.compile(r"\.(.+)\.\d+\.tmp")  # write_atomic's temporary beside a file


def _is_own(pattern: re.Pattern, name: str) -> bool:
    """A file hpcopt writes in workers/ or joins/ (`pattern`), or write_atomic's temporary of one."""
    temp = _TEMP.fullmatch(name)
    return bool(pattern.fullmatch(temp[1] if temp else name))


_HELD: set[str] = set()  # the run directories whose lock this process took and has not released


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
        self.checkpoint_sums = self.path / "checkpoint.h5.sha256"  # io.checkpoint.sums_path
        self.center_model = self.path / "center.pt"
        self.workers = self.path / "workers"
        self.logs = self.path / "logs"
        self.lock_file = self.path / "lock"
        self.launch_lock_file = self.path / "launch.lock"

    def clear_previous(self, tensorboard_dir=None, *, trajectory: bool = True) -> None:
        """Delete what an earlier run in this directory left, before a new one is written there:
        its trajectory (unless `trajectory=False`), checkpoint, status, join info, center.pt, the
        workers' states, join requests, its analysis (OUT/analysis) and its training's
        TensorBoard events in `tensorboard_dir` (OUT/tensorboard when None). Call it holding the
        lock; other files (logs, the data) stay."""
        import shutil

        from hpcopt.io import tensorboard as tb

        for stale in ((self.trajectory,) if trajectory else ()) + (self.checkpoint, self.checkpoint_sums, self.status,
                                                                  self.join_info, self.center_model):
            stale.unlink(missing_ok=True)
        tb.clear(tensorboard_dir or self.path / "tensorboard", tb.TRAIN_SUFFIX)  # events over the same steps
        for d, own in ((self.workers, _WORKER_FILE), (self.joins, _JOIN_FILE)):
            if d.is_symlink():  # never follow it: the folder it points to is not this run's
                d.unlink()
            elif d.is_dir():
                for f in d.iterdir():  # only hpcopt's own files (and its temporaries); nothing else
                    if _is_own(own, f.name) and (f.is_file() or f.is_symlink()):
                        f.unlink()
        shutil.rmtree(self.path / "analysis", ignore_errors=True)  # measured on the previous trajectory

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


    def hold_launch(self) -> int:
        """An exclusive flock on OUT/launch.lock for as long as the returned descriptor is open
        (the kernel drops it with the process). Two launchers of one run both passed the run-lock
        check before either's rank 0 took the lock, and each started an ompi-server whose URI
        replaced the other's: the loser's dead rendezvous broke every later join of the winner.
        Raises RunLocked while another launcher holds it, or when it cannot be taken."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunLocked(f"cannot make the run directory {self.path}: {e.strerror}") from None
        try:
            fd = hold_flock(self.launch_lock_file)
        except OSError as e:  # a folder or a symlink there: never taken for "no other launcher"
            raise RunLocked(f"cannot lock {self.launch_lock_file} ({e.strerror}): it must be a plain file; "
                            f"remove it") from None
        if fd is None:
            try:
                holder = self.launch_lock_file.read_text().strip() or "?"
            except OSError:
                holder = "?"
            raise RunLocked(f"{self.path} is being launched by another `hpcopt train -n` (pid {holder}; it holds "
                            f"{self.launch_lock_file}); stop it first, or wait for it to end")
        os.ftruncate(fd, 0)  # who holds it, for the refusal's message
        os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
        return fd

    # ------------------------------------------------------------------ the lock
    def lock(self, stale_seconds: float) -> str | None:
        """Take the run for this process (one training at a time; a second `train` or `--resume`
        on a live run would cut its file back under it). A lock whose process is gone (same
        host), or that nobody refreshed for `stale_seconds` (another host), is stale and taken
        over, and so is one of this very process that it no longer holds (a `hpcopt.Recorder` left
        open and collected; its interpreter lives on, as a notebook's kernel does); returns a note
        saying so, else None. Raises RunLocked while the owner lives."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        note = None
        for _ in range(3):
            tmp = self.path / f".lock.{me['host']}.{me['pid']}"
            write_atomic(tmp, json.dumps(me) + "\n")
            try:
                os.link(tmp, self.lock_file)  # atomic: fails if a lock is there
                _HELD.add(self._key())
                return note
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
            why = self.stale(stale_seconds)
            if why is None:
                owner = _read_lock(self.lock_file)
                if _mine(owner):
                    raise RunLocked(f"{self.path} is being recorded or trained by this process (pid {owner.get('pid')}):"
                                    f" close() the hpcopt.Recorder that writes it (or del it) first")
                raise RunLocked(f"{self.path} is being trained by pid {owner.get('pid')} on {owner.get('host')} "
                                f"(since {time.strftime('%H:%M:%S', time.localtime(owner.get('since', 0)))}); "
                                f"stop it first, or wait for it to end")
            note = f"took over a stale lock of {self.path}: {why}"
            try:  # move it aside (atomic); whoever loses a race to do the same retries
                os.replace(self.lock_file, self.path / f".lock.stale.{me['pid']}")
                (self.path / f".lock.stale.{me['pid']}").unlink(missing_ok=True)
            except FileNotFoundError:
                pass
        raise RunLocked(f"could not take the lock of {self.path}")

    def stale(self, stale_seconds: float) -> str | None:
        """Why the lock's owner is dead (its pid gone on this host; elsewhere, no refresh for
        `stale_seconds`), or None while it looks alive."""
        owner = _read_lock(self.lock_file)
        if not owner:
            return "it was unreadable"
        if _mine(owner) and self._key() not in _HELD:
            return "it is this process's own, left by a writer it no longer holds (a Recorder never closed)"
        if owner.get("host") == socket.gethostname():
            try:
                os.kill(int(owner["pid"]), 0)
            except ProcessLookupError:
                return f"its process {owner['pid']} is gone"
            except (PermissionError, KeyError, ValueError, TypeError):
                pass
            else:
                if _zombie(int(owner["pid"])):  # killed, not yet reaped by its parent
                    return f"its process {owner['pid']} is gone (a zombie)"
                return None
        try:
            age = time.time() - self.lock_file.stat().st_mtime
        except FileNotFoundError:
            return "it vanished"
        return f"nobody refreshed it for {age:.0f} s" if age > stale_seconds else None

    def touch_lock(self) -> None:
        try:
            os.utime(self.lock_file)
        except OSError:
            pass

    def unlock(self) -> None:
        """Release the lock if this process holds it."""
        _HELD.discard(self._key())
        if _mine(_read_lock(self.lock_file)):
            self.lock_file.unlink(missing_ok=True)

    def _key(self) -> str:
        return os.path.realpath(self.path)


def _mine(owner: dict) -> bool:
    """The lock `owner` is this process."""
    return owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _read_lock(path: Path) -> dict:
    try:
        out = json.loads(path.read_text())
        return out if isinstance(out, dict) else {}
    except (OSError, ValueError):
        return {}


def hold_flock(path: Path) -> int | None:
    """A descriptor holding an exclusive flock on `path` (created; a symlink is not followed) for
    as long as it is open, or None while another process holds it. The kernel drops the lock with
    the process, so a killed holder leaves none behind."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_atomic(path: Path, data, mode: int = 0o644) -> None:
    """Write `data` (str, bytes, or a function that writes into the binary file it is given) to
    a temporary file beside `path`, then rename it over `path`: readers see the old or the new
    file, never half of one, also after a crash."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not also keep half a file
        raise


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)
