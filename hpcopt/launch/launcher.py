"""`hpcopt train -n N ...` and `hpcopt join RUN -n N`: start the MPI job for the user.

Run outside mpirun, these start an `ompi-server` for the run (its URI in OUT/ompi-server.uri, so
later joins can connect: Open MPI 4.1 connects separately started jobs only through one), then
`mpirun -n N` with

  OMPI_MCA_pmix_server_uri=file:OUT/ompi-server.uri   every job of the run uses that rendezvous;
  OMPI_MCA_orte_enable_recovery=1                     (training only) a worker that dies does not take
                                                      the job down (mpirun's default is to kill every rank).

A first Ctrl-C (or SIGTERM) is passed on as SIGUSR1, which mpirun forwards to every rank: workers
make a last exchange and leave, servers checkpoint and close the file. A second one stops mpirun.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

UNDER_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_STEP_ID")


def under_mpi_launcher() -> bool:
    return any(v in os.environ for v in UNDER_MPI_VARS[:3])


def _mpirun() -> str:
    exe = os.environ.get("HPCOPT_MPIRUN") or shutil.which("mpirun")
    if not exe:
        raise SystemExit("hpcopt: mpirun not found on PATH (set HPCOPT_MPIRUN)")
    return exe


def _die_with_parent():
    """For Popen's preexec_fn: the child gets SIGTERM when this process dies, also by SIGKILL,
    which no handler or `finally` of ours sees (Linux's PR_SET_PDEATHSIG; elsewhere nothing). An
    ompi-server or mpirun left behind would serve, or train, for nobody."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None)
    parent = os.getpid()

    def arm():  # runs in the child, between fork and exec (the setting survives the exec)
        libc.prctl(1, ctypes.c_ulong(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before that: no signal will come
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def start_ompi_server(run_dir: Path, timeout: float = 30.0) -> subprocess.Popen | None:
    """Start an ompi-server whose URI goes to RUN/ompi-server.uri, unless one answers there."""
    uri = run_dir / "ompi-server.uri"
    if uri.exists():
        uri.unlink()  # a stale one from an earlier launch
    exe = shutil.which("ompi-server")
    if exe is None:
        print("hpcopt: ompi-server not found; joins will be disabled", file=sys.stderr)
        return None
    log = open(run_dir / "ompi-server.log", "ab")
    proc = subprocess.Popen([exe, "--no-daemonize", "-r", str(uri)], stdout=log, stderr=log,
                            start_new_session=True, preexec_fn=_die_with_parent())
    deadline = time.monotonic() + timeout
    while not (uri.exists() and uri.stat().st_size > 0):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"hpcopt: ompi-server did not start (see {run_dir / 'ompi-server.log'})")
        time.sleep(0.05)
    return proc


def launch(n: int, hpcopt_args: list[str], run_dir: Path, *, own_server: bool,
           mpirun_args: list[str] | None = None) -> int:
    """Run `mpirun -n N python -m hpcopt ARGS` with the run's rendezvous; returns its exit code."""
    from hpcopt.launch.signals import early_signal, ignore_leave_signals

    if early_signal() is not None:  # (catch_early, in cli) told to stop before anything started
        print(f"hpcopt: {signal.Signals(early_signal()).name} before the launch: nothing was started",
              file=sys.stderr, flush=True)
        return 0
    if own_server:  # (a join only goes to a run directory that is there)
        run_dir.mkdir(parents=True, exist_ok=True)
    server = start_ompi_server(run_dir) if own_server else None
    uri = run_dir / "ompi-server.uri"
    if not own_server and not uri.exists():
        raise SystemExit(f"hpcopt: {uri} is missing: the run was not started with joins enabled "
                         f"(start it with `hpcopt train -n N ...`)")
    env = dict(os.environ)
    if uri.exists():
        env["OMPI_MCA_pmix_server_uri"] = f"file:{uri.resolve()}"
    outcome = None
    if own_server:  # the training: a crashed worker must not take the servers down. (Not for a
        # join: its exit status, which recovery mode hides, tells whether the join worked.)
        env.setdefault("OMPI_MCA_orte_enable_recovery", "1")
        # recovery mode makes mpirun exit 0 whatever happened: rank 0 says how the run ended
        _remove_stale_outcomes(run_dir)
        outcome = run_dir / f".outcome-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(outcome, ignore_errors=True)
        outcome.mkdir()
        env["HPCOPT_OUTCOME"] = str(outcome.resolve())
    if os.geteuid() == 0:  # root in a container or CI: Open MPI wants explicit consent
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    cmd = [_mpirun(), "--oversubscribe", "-n", str(n), *(mpirun_args or []),
           sys.executable, "-m", "hpcopt", *hpcopt_args]
    print("hpcopt: " + " ".join(cmd), flush=True)
    # mpirun in a session of its own: a terminal's Ctrl-C (SIGINT to the foreground process group)
    # reaches this launcher only, which turns it into the graceful stop below; mpirun given the
    # SIGINT itself would abort every rank, racing the stop (rank 0 killed after its final
    # flush: no center.pt, a stale lock). SIGTERM from _die_with_parent still ends it with us
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent(), start_new_session=True)
    started = time.time()
    # A graceful stop is passed on once the ranks catch it: when rank 0 holds the run's lock,
    # every rank is past MPI_Init, so past catch_early. Sent sooner, mpirun would forward it to
    # ranks still starting Python, whose default action for SIGUSR1 is to die.
    signals = {"n": 0, "pending": early_signal() is not None}

    def ready() -> bool:
        return outcome is None or _rank0_started(run_dir, started)

    def forward(signum, frame):
        signals["n"] += 1
        if proc.poll() is not None:
            return
        if signals["n"] == 1 and not ready():
            signals["pending"] = True  # (the wait below passes it on)
            return
        # first: a graceful stop through every rank; then: let mpirun end the job
        proc.send_signal(signal.SIGUSR1 if signals["n"] == 1 else signal.SIGTERM)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, forward)
    if signals["pending"]:  # it came while ompi-server and mpirun started
        signals["n"] = 1
    lost = ""  # the essential rank whose death ended the job
    try:
        while True:
            if signals["pending"] and signals["n"] == 1 and ready() and proc.poll() is None:
                signals["pending"] = False
                proc.send_signal(signal.SIGUSR1)
            try:
                code = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if outcome is not None and not lost and (lost := _essential_gone(outcome)):
                    print(f"hpcopt: {lost} is gone without an exit status: ending the job"
                          f"{_after_loss(run_dir, outcome)}", file=sys.stderr, flush=True)
                    _end(proc)
        if outcome is None:
            return code
        return 1 if lost else _run_outcome(outcome, code)
    finally:
        # the job is over: a second SIGTERM (scancel, timeout) must not kill this process while it
        # tidies up and exits with the job's status (Python restores the default handlers at exit)
        ignore_leave_signals()
        if outcome is not None:
            shutil.rmtree(outcome, ignore_errors=True)
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


def _run_outcome(folder: Path, mpirun_code: int) -> int:
    """The training's exit status: rank 0's (server 0, or rank 0 of a synchronous run), which
    holds the run; a worker that crashed is not a failed run. No status from rank 0 at all (it
    was killed) is a failure."""
    try:
        code = int((folder / "0").read_text())
    except (OSError, ValueError):
        print("hpcopt: rank 0 ended without an exit status (killed?); the training failed", file=sys.stderr)
        return mpirun_code or 1
    return code  # (mpirun's own status says nothing in recovery mode, or how a signal ended it)


def _rank0_started(run_dir: Path, since: float) -> bool:
    """Whether this launch's rank 0 took the run's lock (so every rank is running hpcopt)."""
    import json

    try:
        return float(json.loads((run_dir / "lock").read_text())["since"]) >= since
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _essential_gone(outcome: Path) -> str:
    """Which rank the training cannot lose died without an exit status, if one did. Every rank
    from its start (OUTCOME/started/RANK: the setup is collective, one rank's death would leave
    the others in it), except an asynchronous worker once it is set up (OUTCOME/ready/RANK: the
    run goes on without it). Named as rank 0 says in OUTCOME/essential.json. In recovery mode nothing else ends the job: the others would
    wait in a collective, or for replies until comm.timeout. Only ranks on this host can be
    checked; on others the deadlines remain."""
    import json

    here = socket.gethostname()
    watched: dict[int, tuple[int, str, str]] = {}
    started, ready = outcome / "started", outcome / "ready"
    for f in started.glob("*") if started.is_dir() else ():
        try:
            if not (ready / f.name).exists():
                pid, host = f.read_text().split()
                watched[int(f.name)] = (int(pid), host, f"rank {int(f.name)}")
        except (OSError, ValueError):
            pass  # (half written: seen at the next poll)
    try:
        named = json.loads((outcome / "essential.json").read_text())["ranks"]
        for r, (pid, host, what) in named.items():
            if int(r) in watched:
                watched[int(r)] = (int(pid), host, what)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for rank, (pid, host, what) in sorted(watched.items()):
        if host != here or (outcome / str(rank)).exists():
            continue  # another host's, or it ended properly
        try:
            os.kill(pid, 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        return f"{what} (pid {pid})" if what == f"rank {rank}" else f"{what} (rank {rank}, pid {pid})"
    return ""


def _remove_stale_outcomes(run_dir: Path) -> None:
    """The outcome folders of this host's launchers that are gone (killed with SIGKILL, they
    could not remove theirs). Another host's are left alone: their PIDs mean nothing here."""
    prefix = f".outcome-{socket.gethostname()}-"
    for old in run_dir.glob(prefix + "*"):
        try:
            pid = int(old.name[len(prefix):])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            continue


def _after_loss(run_dir: Path, outcome: Path) -> str:
    """What is left of the run once an essential rank died: what the user can do next."""
    import json

    try:
        resumable = bool(json.loads((outcome / "essential.json").read_text())["resumable"])
    except FileNotFoundError:
        return " (it died while the job was setting up: nothing was trained in this launch)"
    except (OSError, ValueError, KeyError, TypeError):
        resumable = False
    try:
        state = json.loads((run_dir / "status.json").read_text()).get("state")
    except (OSError, ValueError, AttributeError):
        state = None
    if state == "complete":
        return " (the training had completed: its trajectory is whole)"
    if not resumable:
        return " (a synchronous run cannot be resumed: start it again)"
    if not (run_dir / "checkpoint.h5").exists():
        snapshots = _center_snapshots(run_dir / "trajectory.h5")
        if snapshots == 0:
            return (" (no checkpoint yet and no center snapshot in the trajectory: nothing to resume from; start "
                    "the run again, with --force)")
        return (f" (no checkpoint yet: `hpcopt train -n N --resume {run_dir}` goes on from the trajectory's last "
                f"center snapshot{'' if snapshots else ', if it has one'})")
    return f" (`hpcopt train -n N --resume {run_dir}` goes on from its last checkpoint)"


def _center_snapshots(path: Path) -> int | None:
    """Whether the trajectory holds a finite center snapshot (what a resume without a checkpoint
    starts from): 1, 0, or None when that is unknown (a server died writing the file, or its
    last rows are not finite: a resume looks further back than the launcher does)."""
    try:
        import h5py
        import numpy as np

        with h5py.File(path, "r", locking=False) as f:
            rows = int(min(f["center/params"].shape[0], f["center/meta"].shape[0]))
            if rows == 0:
                return 0
            return 1 if any(np.isfinite(f["center/params"][i]).all() for i in range(rows - 1, max(rows - 3, 0) - 1, -1)) \
                else None
    except Exception:  # (a half-written file, a missing one: unknown, not "none")
        return None


def _end(proc: subprocess.Popen) -> None:
    proc.terminate()  # mpirun ends every rank
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
