"""Chaos: a real training under injected faults, and whether it survived each one.

    .venv/bin/python benchmarks/chaos.py --minutes 30 --mtbf 20 --seed 7
    .venv/bin/python benchmarks/chaos.py --faults 12 --mtbf 2 --seed 3 --epochs 100000 --no-reference  # the test's

`hpcopt train -n 1+W` (the launcher: joins enabled, recovery mode) trains MNIST-1D; from a seed,
faults arrive with exponential gaps of mean --mtbf seconds until --minutes have passed, then the
run is left to finish its epochs. Faults: a worker SIGKILLed, a worker leaving on SIGTERM, a join
of 1-2 ranks, two joins at once, an abandoned join (a valid request whose joiner never connects),
a malformed and a wrong-token join request, NaN or Inf in a worker's parameters, a NaN gradient
under a finite loss (chaos_model.py), a graceful stop of the whole run and a kill -9 of the
whole job, each of the last two followed by `--resume` with another number of workers. A fault is
survived when the run goes on afterwards (more exchanges, the joiner admitted, the request
refused, the resumed run moving), within --deadline seconds.

With --faults N, exactly N faults are injected (every kind once in an order from the seed, then
again), whatever the machine's speed, and the run is then stopped gracefully: that form is the
test's, with epochs enough that the run cannot end by itself first (if it does, that is said and
the exit status is 1).

Then a fault-free run of the same config and seed, and one table: faults by kind, injected and
survived; whether every center snapshot is finite; whether the trajectory reads back
(`hpcopt inspect`); rows recorded; workers that started their schedule over (a step that goes
back further than one checkpoint interval after a resume: none expected), and the steps
replayed; workers reset for a finite blow-up of their loss; final center accuracy against the fault-free run; server 0's
resident memory at the first and last reading of its longest-lived process (a resume starts a
new one). The last line is `survived N/N faults`. Exit status 0 only when every fault was survived,
every snapshot finite and the file readable.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import hmac
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


CHECKPOINT_SECONDS = 3.0
KINDS = ("worker_kill", "worker_term", "join", "joins_at_once", "abandoned_join", "malformed_join", "wrong_token",
         "stop_resume", "kill9_resume", "nan_params", "inf_params", "nan_grad")


def env(poison: Path | None = None) -> dict:
    e = dict(os.environ)
    e.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "PYTHONUNBUFFERED": "1",
              "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), e.get("PYTHONPATH", "")])})
    if poison is not None:  # chaos_model.py: where the NaN/Inf faults are ordered
        e["HPCOPT_CHAOS_POISON"] = str(poison)
    return e


def hpcopt(*args, log: Path, poison: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "hpcopt", *args], env=env(poison), stdout=open(log, "a"),
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def status(run: Path) -> dict:
    try:
        return json.loads((run / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def wait(predicate, deadline: float) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def kill_job(proc: subprocess.Popen, run: Path) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    subprocess.run(["pkill", "-9", "-f", f"hpcopt train.*{run}"], check=False)  # ranks: own sessions
    subprocess.run(["pkill", "-9", "-f", f"ompi-server.*{run}"], check=False)


class Chaos:
    def __init__(self, args, run: Path):
        self.args, self.run, self.rng = args, run, random.Random(args.seed)
        self.logs = run.parent / "logs"
        self.logs.mkdir(exist_ok=True)
        self.poison = run.parent / "poison"
        self.poison.mkdir(exist_ok=True)
        self.train_args = ["--config", args.config, "--model.name", "chaos_model:model", "--train.epochs", str(args.epochs),
                           "--run.seed", str(args.seed), "--comm.timeout", str(args.deadline),
                           "--record.checkpoint_seconds", str(CHECKPOINT_SECONDS)]
        self.proc: subprocess.Popen | None = None
        self.joiners: list[subprocess.Popen] = []
        self.injected, self.survived = collections.Counter(), collections.Counter()
        self.rss: list[tuple[int, int]] = []  # (server pid, kB)
        self.launches = 0
        self.cut_short = self.stop_failed = False

    def launch(self, resume: bool, workers: int) -> None:
        self.launches += 1
        log = self.logs / f"train-{self.launches}.log"
        args = ["--resume", str(self.run)] if resume else ["--out", str(self.run), *self.train_args]
        self.proc = hpcopt("train", "-n", str(1 + workers), *args, log=log, poison=self.poison)

    def exchanges(self) -> int:
        return int(status(self.run).get("exchanges", 0))

    def goes_on(self, more: int = 20) -> bool:
        """More exchanges, or the run ending as it should (every worker done)."""
        n0 = self.exchanges()
        return wait(lambda: self.exchanges() > n0 + more or self.ending(), self.args.deadline)

    def finished(self) -> bool:
        """The run ended by itself: every worker finished (complete), or left (stopped)."""
        return self.proc is not None and self.proc.poll() is not None

    def ending(self) -> bool:
        s = status(self.run)
        return self.finished() or (s.get("state") == "running" and not s.get("workers"))

    def workers(self) -> list[dict]:
        s = status(self.run)
        return s.get("workers", []) if s.get("state") == "running" else []

    def sample_rss(self) -> None:
        pid = status(self.run).get("pid")
        if pid and (kb := rss_kb(int(pid))):
            self.rss.append((int(pid), kb))

    # ------------------------------------------------------------------ faults
    def fault(self, kind: str) -> bool:
        ws = self.workers()
        if kind in ("worker_kill", "worker_term"):
            if len(ws) < 2:
                return False  # never the last worker: the run would simply end
            w = self.rng.choice(ws)
            try:
                os.kill(int(w["pid"]), signal.SIGKILL if kind == "worker_kill" else signal.SIGTERM)
            except ProcessLookupError:
                return False
            self.injected[kind] += 1
            return self.goes_on()
        if kind in ("join", "joins_at_once"):
            if len(ws) > 8:
                return False
            sizes = [self.rng.choice((1, 2))] if kind == "join" else [1, 2]
            logs = []
            for n in sizes:
                logs.append(self.logs / f"join-{len(self.joiners)}.log")
                self.joiners.append(hpcopt("join", str(self.run), "-n", str(n), log=logs[-1], poison=self.poison))
            self.injected[kind] += 1

            def answered(log: Path) -> bool:  # admitted, or told the run is ending or over (also right)
                text = log.read_text() if log.exists() else ""
                return "joined " in text or any(f" is {x}" in text for x in ("ending", "stopping", "stopped", "complete"))

            return wait(lambda: all(answered(x) for x in logs), self.args.deadline) and self.goes_on()
        if kind in ("malformed_join", "wrong_token", "abandoned_join"):
            rid = f"chaos-{kind}-{self.rng.randrange(1 << 30)}"
            self.injected[kind] += 1
            self._request(rid, kind)
            ok, refused = self.run / "joins" / f"{rid}.ok", self.run / "joins" / f"{rid}.refused"
            if kind == "abandoned_join":  # approved (or refused: the run is ending), never connected
                return wait(lambda: ok.exists() or refused.exists() and "ending" in refused.read_text(),
                            self.args.deadline) and self.goes_on()
            return wait(refused.exists, self.args.deadline) and self.goes_on()
        if kind in ("nan_params", "inf_params", "nan_grad"):
            if not ws:
                return False
            order = self.poison / str(self.rng.choice(ws)["pid"])
            order.write_text(kind.split("_")[0] if kind != "nan_grad" else kind)
            self.injected[kind] += 1
            # taken at the worker's next step (or never: it left or ended first), then the run goes on
            return wait(lambda: not order.exists() or self.ending(), self.args.deadline) and self.goes_on()
        if kind in ("stop_resume", "kill9_resume"):
            if not ws:
                return False
            self.injected[kind] += 1
            if kind == "stop_resume":
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout=self.args.deadline)
                except subprocess.TimeoutExpired:
                    return False
            else:
                kill_job(self.proc, self.run)
            for j in self.joiners:  # the joiners of the old job end with it
                if j.poll() is None:
                    kill_job(j, self.run)
            self.joiners = []
            self.sample_rss()
            self.launch(resume=True, workers=self.rng.choice((2, 3, 4)))
            ok = wait(lambda: status(self.run).get("state") == "running" and self.exchanges() > 0
                      and status(self.run).get("pid") != None, self.args.deadline)  # noqa: E711
            return ok and self.goes_on()
        raise ValueError(kind)

    def _request(self, rid: str, kind: str) -> None:
        from hpcopt.comm import protocol as P
        from hpcopt.comm.joins import proof

        joins = self.run / "joins"
        if kind == "malformed_join":
            text = self.rng.choice(["[1, 2]", "{not json", json.dumps({"n": "2", "time": "now"})])
        else:
            req = {"n": 1, "hosts": ["nowhere"], "pids": [1], "n_parameters": 5210, "time": time.time(),
                   "protocol": P.PROTOCOL_VERSION}
            token = (self.run / "token").read_text().strip() if kind == "abandoned_join" else "not-the-token"
            req["proof"] = proof(token, rid, req)
            text = json.dumps(req)
        tmp = joins / f".{rid}.tmp"
        tmp.write_text(text)
        tmp.rename(joins / f"{rid}.req")

    # ------------------------------------------------------------------ the run
    def go(self) -> None:
        kinds = self.args.kinds.split(",")
        self.launch(resume=False, workers=self.args.workers)
        if not wait(lambda: self.exchanges() > 20, 120):
            raise SystemExit(f"the training did not start; see {self.logs}")
        self.sample_rss()
        counted = self.args.faults is not None
        end = float("inf") if counted else time.monotonic() + 60 * self.args.minutes

        def more() -> bool:
            return sum(self.injected.values()) < self.args.faults if counted else time.monotonic() < end

        cycle: list[str] = []
        while more() and not self.finished():
            time.sleep(min(self.rng.expovariate(1 / self.args.mtbf), max(0.0, end - time.monotonic())))
            if not more() or self.finished():
                break
            if not cycle:  # every kind once, in an order from the seed, then again
                cycle = self.rng.sample(kinds, len(kinds))
            kind = cycle.pop()
            before = sum(self.injected.values())
            ok = self.fault(kind)
            if sum(self.injected.values()) == before:
                cycle.insert(0, kind)  # not possible now (e.g. one worker left): later
                if len(cycle) == 1 and kind in ("worker_kill", "worker_term", "stop_resume") and "join" in kinds:
                    cycle.append("join")  # nothing else left to try: a worker more makes it possible
            else:
                self.survived[kind] += ok
                print(f"[{time.strftime('%H:%M:%S')}] {kind:15s} {'survived' if ok else 'NOT SURVIVED'}", flush=True)
            self.sample_rss()
        if counted:
            self.cut_short = self.finished()
            if self.cut_short:
                print(f"the run ended by itself after {sum(self.injected.values())} of {self.args.faults} faults: "
                      "give it more --epochs", flush=True)
            else:
                print("faults over; the run is stopped gracefully", flush=True)
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout=self.args.deadline)
                except subprocess.TimeoutExpired:
                    self.stop_failed = True
                    print(f"the graceful stop took more than {self.args.deadline:.0f} s", flush=True)
        else:  # the run finishes its epochs (every worker finishes; a stopped one would need a resume)
            print("faults over; the run finishes its epochs", flush=True)
            if not wait(lambda: self.proc.poll() is not None, 60 * max(5.0, self.args.minutes)):
                self.proc.send_signal(signal.SIGINT)
                self.proc.wait(timeout=120)
        for j in self.joiners:
            try:
                j.wait(timeout=self.args.deadline)
            except subprocess.TimeoutExpired:
                kill_job(j, self.run)


def started_over(ex: np.ndarray, window: float) -> tuple[int, int]:
    """Workers whose step went back further than a resume may take it, and the steps replayed.

    A worker resumes from its own last saved state, saved every checkpoint interval at an
    exchange, while the trajectory is cut back to the servers' checkpoint, taken independently:
    up to about one interval of its steps may be recorded and then done again. Going back
    further than where the worker stood `window` seconds before is starting over."""
    restarts, replayed = 0, 0
    for w in np.unique(ex["worker_id"]):
        mine = ex[ex["worker_id"] == w]
        steps, times = mine["step"], mine["time"]
        back = np.nonzero(np.diff(steps) < 0)[0]
        for i in back:
            earlier = np.searchsorted(times, times[i] - window, side="right") - 1
            floor = int(steps[earlier]) if earlier >= 0 else 0
            if steps[i + 1] < floor:
                restarts += 1
                break
            replayed += int(steps[i] - steps[i + 1])
    return restarts, replayed


def finite_resets(logs: Path) -> int:
    """Resets for a finite loss above the guard's limit ("training loss 1144 > 23.02 for 3 steps",
    "mean training loss ... > ..."), as the workers log them. The limit is train.diverge_factor x
    the run's untrained loss, so these are blow-ups of the training itself, never ordinary noise
    (with a joiner's own first loss as the reference, noise of 0.5 against a limit of 0.2 used to
    reset healthy workers). The injected faults are NaN/Inf ones and show as such (a NaN gradient
    on the step before an exchange as "non-finite parameters")."""
    n = 0
    for log in logs.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if ("restarting from the center" in line or "leaving" in line) and " > " in line:
                n += 1
    return n


def accuracy(path: Path) -> float:
    with h5py.File(path, "r", locking=False) as f:
        ev = f["evals"][...]
    return float(ev["test_accuracy"][-1]) if len(ev) else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="how long faults are injected")
    ap.add_argument("--faults", type=int, help="inject exactly this many faults (instead of --minutes), then stop")
    ap.add_argument("--mtbf", type=float, default=20.0, help="mean seconds between two faults")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=float, default=400.0, help="epochs per worker (long enough to outlast --minutes)")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--config", default="configs/mnist1d_easgd.toml", help="the training (any asynchronous method)")
    ap.add_argument("--deadline", type=float, default=60.0, help="seconds a fault may take to be survived")
    ap.add_argument("--out", help="directory for the runs (default: a temporary one)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"faults to inject, from: {', '.join(KINDS)}")
    ap.add_argument("--no-reference", action="store_true", help="skip the fault-free run")
    args = ap.parse_args()
    if not set(args.kinds.split(",")) <= set(KINDS):
        ap.error(f"--kinds: unknown fault(s) {sorted(set(args.kinds.split(',')) - set(KINDS))}")
    base = Path(args.out or tempfile.mkdtemp(prefix="hpcopt-chaos-"))
    base.mkdir(parents=True, exist_ok=True)
    run = base / "chaos"
    chaos = Chaos(args, run)
    try:
        chaos.go()
    finally:
        if chaos.proc is not None and chaos.proc.poll() is None:
            kill_job(chaos.proc, run)
    traj = run / "trajectory.h5"
    with h5py.File(traj, "r", locking=False) as f:
        finite = all(np.isfinite(f["center/params"][i]).all() for i in range(f["center/params"].shape[0]))
        ex = f["exchanges"][...]
    readable = subprocess.run([PY, "-m", "hpcopt", "inspect", str(traj)], capture_output=True, env=env()).returncode == 0
    restarts, replayed = started_over(ex, window=2 * CHECKPOINT_SECONDS)
    blowups = finite_resets(run.parent / "logs")
    ref = float("nan")
    if not args.no_reference:
        ref_run = base / "reference"
        p = subprocess.run([PY, "-m", "hpcopt", "train", "-n", str(1 + args.workers), "--out", str(ref_run),
                            *chaos.train_args], env=env(), cwd=ROOT, capture_output=True, text=True)
        ref = accuracy(ref_run / "trajectory.h5") if p.returncode == 0 else float("nan")
    n_in, n_ok = sum(chaos.injected.values()), sum(chaos.survived.values())
    print(f"\n{'fault':<16} {'injected':>8} {'survived':>8}")
    for kind in sorted(chaos.injected):
        print(f"{kind:<16} {chaos.injected[kind]:>8} {chaos.survived[kind]:>8}")
    # the longest-lived server 0 (a resume starts a new one): its growth is what a leak would show
    readings = collections.defaultdict(list)
    for pid, kb in chaos.rss:
        readings[pid].append(kb)
    last_pid = max(readings, key=lambda pid: len(readings[pid])) if readings else None
    same = readings.get(last_pid, [])
    print(f"\ncenter finite at every snapshot  {'yes' if finite else 'NO'}")
    print(f"trajectory reads back            {'yes' if readable else 'NO'} ({traj})")
    print(f"rows recorded                    {len(ex)}")
    print(f"workers that started over        {restarts}")
    print(f"steps replayed after resumes     {replayed} (workers continue from their own last saved state)")
    print(f"resets for a finite blow-up      {blowups} (loss > train.diverge_factor x the untrained loss)")
    print(f"final center accuracy            {100 * accuracy(traj):.2f}% (fault-free run: {100 * ref:.2f}%)")
    if same:
        print(f"server 0 resident memory         {same[0] / 1024:.0f} MB at its first reading, {same[-1] / 1024:.0f} MB "
              f"at its last ({len(same)} readings of pid {last_pid}; {chaos.launches} launches in all)")
    print(f"survived {n_ok}/{n_in} faults")
    good = n_ok == n_in and finite and readable and restarts == 0 and not chaos.cut_short and not chaos.stop_failed
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
