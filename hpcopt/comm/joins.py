"""Joins: workers that come into a running training, both sides (the servers' `Joins`, and
`request_join` / `connect` for `hpcopt join`).

Joins go through MPI's dynamic process calls. On Open MPI 4.1 two separately started jobs can
connect only through an `ompi-server` that both mpiruns know (the environment variable
OMPI_MCA_pmix_server_uri=file:URI, or `mpirun --ompi-server file:URI`); `hpcopt train -n` and
`hpcopt join -n` set that up. A join is a handshake through the run directory first, then MPI:

 1. the joiner writes OUT/joins/<id>.req (0600): its number of ranks, hosts and pids, the protocol
    version, and an HMAC of all that under the token (never the token itself);
 2. every server checks the token against OUT/token. A wrong one: server 0 answers
    <id>.refused, records a "refused" event, and nothing else happens. A right one: each server
    opens an MPI port for this request alone, writes it to <id>.port-<server> (0600) and accepts
    on it in a background thread (MPI_Comm_accept blocks, so the serving loop goes on
    meanwhile), and server 0 answers <id>.ok with the new worker ids and the step to start at;
 3. the joiner connects to every server's port for its request (its ranks are the remote group of each
    intercommunicator); each server sends a random challenge over the new connection and admits
    the joiner only when its rank 0 answers with the HMAC of it under the token (whoever reaches a
    port without the token gets nothing), then the joiner fetches the center and trains like any
    other worker.
"""

from __future__ import annotations

import hashlib
import json
import hmac
import os
import queue
import threading
import time
import uuid

from hpcopt.io.rundir import RunDir, read_json, write_atomic, write_json

from . import protocol as P
from .wait import PeerTimeout, wait_all

SCAN_SECONDS = 0.25  # how often servers look for join requests


def joins_possible() -> bool:
    """Whether this MPI job was started so that other jobs can connect to it."""
    return bool(os.environ.get("OMPI_MCA_pmix_server_uri") or os.environ.get("PMIX_SERVER_URI_JOIN"))


class Joins:
    """Server side: takes join requests from the run directory and admits the joiners through the
    server's narrow interface (refuses_joins, reserve_ids, median_step, admit, event, now).
    Collective construction over the servers."""

    def __init__(self, run: RunDir, servers, *, n_params: int, timeout: float, log=print):
        from mpi4py import MPI

        self.run, self.servers, self.log, self.timeout = run, servers, log, timeout
        self.leader = servers.rank == 0
        self.n_params = n_params
        self.enabled = joins_possible()
        self.token = run.read_token()
        self.started = time.time()
        self.queue: queue.Queue = queue.Queue()
        self.accepting: dict[str, tuple[float, str]] = {}  # request id -> (since (monotonic), its port)
        self.seen: set[str] = set()
        self.last_scan = 0.0
        if self.leader:
            run.joins.mkdir(exist_ok=True)
            if self.enabled:
                write_json(run.join_info, {"servers": servers.size, "pid": os.getpid()})
                uri = os.environ.get("OMPI_MCA_pmix_server_uri", "")
                if uri.startswith("file:") and os.path.abspath(uri[5:]) != os.path.abspath(run.server_uri):
                    try:  # joiners find the rendezvous in the run directory
                        run.server_uri.write_text(open(uri[5:]).read())
                    except OSError:
                        pass
            elif run.join_info.exists():
                run.join_info.unlink()

    @property
    def busy(self) -> bool:
        return bool(self.accepting)

    # ------------------------------------------------------------------ joins
    def poll(self, server) -> bool:
        progress = False
        while not self.queue.empty():
            rid, inter, request, answer = self.queue.get()
            progress = True
            entry = self.accepting.pop(rid, None)
            if entry is None:  # it connected after it was given up on: its ids may be reused, never admit
                self.log(f"join {rid}: the joiner connected after it was abandoned; not admitted")
                inter.Free()
                continue
            from mpi4py import MPI

            MPI.Close_port(entry[1])  # it served its one join
            self._admit(server, rid, inter, request, answer)
        now = time.monotonic()
        # the joiner never connected: give up on it after comm.timeout, or, once no worker is left
        # (the run would end but for this join), after comm.worker_timeout
        limit = self.timeout if server.active else min(self.timeout, server.worker_timeout)
        for rid, (since, _) in list(self.accepting.items()):
            if now - since > limit:
                self.accepting.pop(rid)
                self.log(f"join {rid}: the joiner never connected within {limit:g} s; abandoned")
                server.event("refused", detail=f"join {rid}: never connected")
        if now - self.last_scan < SCAN_SECONDS:
            return progress
        self.last_scan = now
        try:
            names = sorted(e.name for e in os.scandir(self.run.joins) if e.name.endswith(".req"))
        except OSError:
            return progress
        for name in names:
            rid = name[:-4]
            if rid in self.seen:
                continue
            self.seen.add(rid)
            try:
                request = read_json(self.run.joins / name)
            except OSError:
                self.seen.discard(rid)  # vanished or unreadable for now: look again next scan
                continue
            except ValueError as e:
                request, problem = None, f"not JSON ({e})"
            else:
                problem = request_problem(request)
            progress = True
            if problem is not None:  # hand-made or hostile: refused, never trusted
                self._refuse(server, rid, "?", f"malformed join request: {problem}")
                continue
            if request["time"] < self.started - 1:
                continue  # left over from before this server started
            self._consider(server, rid, request)
        return progress

    def _refuse(self, server, rid: str, host: str, why: str) -> None:
        if self.leader:
            self.log(f"[{server.now():7.1f}s] refused a join from {host}: {why}")
            server.event("refused", detail=f"join from {host}: {why}"[:250])
            write_json(self.run.joins / f"{rid}.refused", {"reason": why})

    def _consider(self, server, rid: str, request: dict) -> None:
        why = None
        if not self.enabled:
            why = "joins are disabled: the training was started without an ompi-server"
        elif not hmac.compare_digest(request["proof"].encode(), proof(self.token, rid, request).encode()):
            why = "wrong token"
        elif server.refuses_joins():
            why = server.refuses_joins()
        elif request.get("n_parameters") != self.n_params:
            why = f"the joiner's model has {request.get('n_parameters')} parameters, the run's {self.n_params}"
        n = request["n"]
        if why is not None:
            self._refuse(server, rid, request["hosts"][0], why)
            return
        answer = None
        if self.leader:
            answer = {"first_worker_id": server.reserve_ids(n), "start_step": server.median_step()}
        # A port of its own per request: a connect can only meet the accept of its own request,
        # so joins at the same moment (or after an abandoned one) never pair with each other's,
        # and every server pairs the same way. The port is told only to the requester (0600).
        from mpi4py import MPI

        port = MPI.Open_port()
        self.accepting[rid] = (time.monotonic(), port)
        write_atomic(self.run.joins / f"{rid}.port-{self.servers.rank}", port + "\n", mode=0o600)

        def accept():
            from mpi4py import MPI

            inter = MPI.COMM_SELF.Accept(port)
            proven = challenge(inter, self.token, rid, self.timeout)
            self.queue.put((rid, inter, request, answer if proven else _UNPROVEN))

        threading.Thread(target=accept, name=f"hpcopt-accept-{rid}", daemon=True).start()
        if self.leader:  # only now: the joiner connects once it reads this
            write_json(self.run.joins / f"{rid}.ok", answer)

    def _admit(self, server, rid: str, inter, request: dict, answer: dict | None) -> None:
        n = request["n"]
        if answer is _UNPROVEN:
            self.log(f"[{server.now():7.1f}s] join {rid}: the connection did not prove the token; not admitted")
            server.event("refused", detail=f"join {rid}: no proof of the token over the connection")
            inter.Free()  # never Disconnect: collective, it would wait for the other side
            return
        if inter.Get_remote_size() != n:  # its ids were reserved for n ranks: refuse, never guess
            self.log(f"[{server.now():7.1f}s] join {rid}: the joining job has {inter.Get_remote_size()} "
                     f"rank(s), its request said {n}; not admitted")
            server.event("refused", detail=f"join {rid}: {inter.Get_remote_size()} ranks, the request said {n}")
            inter.Free()
            return
        if answer is None:  # not the leader: server 0's answer is in the run directory by now
            answer = read_json(self.run.joins / f"{rid}.ok")
            server.next_worker_id = max(server.next_worker_id, answer["first_worker_id"] + n)
        base, hosts, pids = answer["first_worker_id"], request["hosts"], request["pids"]  # checked: n of each
        server.admit(inter, base, hosts, pids, answer["start_step"], f"join {rid}")
        if self.leader:
            self.log(f"[{server.now():7.1f}s] {n} worker(s) joined from {sorted(set(hosts))}: "
                     f"ids {base}..{base + n - 1}; {len(server.active)} workers now")

    def close(self) -> None:
        pass  # each request's port is closed once its join is admitted (an abandoned one stays open)


# ---------------------------------------------------------------------- the joining side
MAX_JOIN_RANKS = 1 << 16


def request_problem(request) -> str | None:
    """What is wrong with a join request read from the run directory, or None. Every server
    checks it the same way before it believes a word of it."""
    if not isinstance(request, dict):
        return f"a JSON object was expected, got {type(request).__name__}"
    types = {"proof": str, "protocol": int, "n": int, "hosts": list, "pids": list, "n_parameters": int,
             "time": (int, float)}
    for key, kind in types.items():
        value = request.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{key!r} must be {getattr(kind, '__name__', 'a number')}, got {value!r}"[:200]
    if request["protocol"] != P.PROTOCOL_VERSION:
        return (f"the joiner speaks protocol {request['protocol']} (hpcopt {request.get('hpcopt', '?')}), "
                f"the run {P.PROTOCOL_VERSION}: join with the run's hpcopt version")
    n = request["n"]
    if not 1 <= n <= MAX_JOIN_RANKS:
        return f"'n' = {n} ranks is out of range (1..{MAX_JOIN_RANKS})"
    if len(request["hosts"]) != n or not all(isinstance(h, str) and 0 < len(h) <= 255 for h in request["hosts"]):
        return f"'hosts' must be {n} host names"
    if len(request["pids"]) != n or not all(isinstance(p, int) and not isinstance(p, bool) for p in request["pids"]):
        return f"'pids' must be {n} integers"
    if request["time"] != request["time"] or abs(request["time"]) == float("inf"):
        return "'time' is not finite"
    return None


def proof(token: str, rid: str, request: dict) -> str:
    """What a join request carries instead of the token: an HMAC of the request under it, bound
    to the request's id and content, so a request file (readable or not) never reveals the token
    and cannot be replayed under another id or with other hosts."""
    body = f"{rid}|{request['n']}|{request['hosts']}|{request['pids']}|{request['n_parameters']}|{request['time']!r}"
    return hmac.new(token.encode(), body.encode(), hashlib.sha256).hexdigest()


_UNPROVEN = object()  # the answer slot of a join whose connection failed the challenge


def challenge(inter, token: str, rid: str, timeout: float) -> bool:
    """Server side, on a new join's intercommunicator: send a random challenge to the joiner's
    rank 0 and check its answer (the HMAC of challenge and request id under the token) within
    `timeout` seconds. The token itself never crosses the connection."""
    nonce, got = os.urandom(32), bytearray(32)
    try:
        wait_all([inter.Isend(nonce, dest=0, tag=P.TAG_JOIN_PROOF),
                  inter.Irecv(got, source=0, tag=P.TAG_JOIN_PROOF)], timeout, "a joiner's answer to its challenge")
    except PeerTimeout:
        return False
    expected = hmac.new(token.encode(), nonce + rid.encode(), hashlib.sha256).digest()
    return hmac.compare_digest(bytes(got), expected)


def answer_challenge(inter, token: str, rid: str, timeout: float) -> None:
    """Joiner side, on its rank 0 (the servers talk to remote rank 0): answer a server's challenge."""
    nonce = bytearray(32)
    wait_all([inter.Irecv(nonce, source=0, tag=P.TAG_JOIN_PROOF)], timeout, "the run's server's challenge")
    mac = hmac.new(token.encode(), bytes(nonce) + rid.encode(), hashlib.sha256).digest()
    wait_all([inter.Isend(mac, dest=0, tag=P.TAG_JOIN_PROOF)], timeout, "the run's server to take the answer")


class JoinRefused(RuntimeError):
    pass


def not_running(run: RunDir, stale_seconds: float = float("inf")) -> str | None:
    """Why no training in `run` can answer a join (None: one may): the directory is missing or no
    run's, status.json says the run ended, or its lock is stale (server 0's process is gone, or on
    another host nobody refreshed it for `stale_seconds`). A join would otherwise wait comm.timeout."""
    if not run.path.is_dir():
        return f"the run directory {run.path} does not exist"
    if not run.config.exists():
        return f"{run.path} is not a run directory (no config.toml)"
    resume = f"; continue it with `hpcopt train -n N --resume {run.path}`, then join it"
    try:
        state = read_json(run.status).get("state")
    except (OSError, ValueError, AttributeError):
        state = None  # not written yet (a training that is starting), or unreadable: not ours to judge
    if state == "complete":
        return f"the run in {run.path} is complete: there is nothing to join"
    if state not in (None, "running"):
        return f"the run in {run.path} is {state}, not running{resume}"
    # server 0 holds the lock while it trains (refreshed at every flush); a killed one leaves it behind
    stale = run.stale(stale_seconds) if run.lock_file.exists() else None
    if stale is not None:
        return f"the run in {run.path} is not running: its lock is stale ({stale}){resume}"
    return None


def request_join(run: RunDir, *, token: str, hosts: list[str], pids: list[int], n_params: int,
                 timeout: float, stale_seconds: float = float("inf")) -> dict:
    """Joiner's rank 0: ask the run to take len(hosts) workers; returns the servers' answer
    (first worker id, start step) and their ports, or raises JoinRefused, at once when the run
    is not running (`not_running`)."""
    why = not_running(run, stale_seconds)
    if why is not None:
        raise JoinRefused(why)
    if not run.join_info.exists():
        raise JoinRefused(f"{run.path} accepts no joins: the training was started without an "
                          f"ompi-server (start it with `hpcopt train -n N ...`, which sets one up)")
    servers = int(read_json(run.join_info)["servers"])
    from hpcopt import __version__

    rid = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    request = {"n": len(hosts), "hosts": hosts, "pids": pids, "n_parameters": n_params, "time": time.time(),
               "protocol": P.PROTOCOL_VERSION, "hpcopt": __version__}
    request["proof"] = proof(token, rid, request)
    write_atomic(run.joins / f"{rid}.req", json.dumps(request) + "\n", mode=0o600)
    deadline = time.monotonic() + timeout
    ok, refused = run.joins / f"{rid}.ok", run.joins / f"{rid}.refused"
    checked = time.monotonic()
    while time.monotonic() < deadline:
        if refused.exists():
            raise JoinRefused(f"the run refused the join: {read_json(refused)['reason']}")
        ports = [run.joins / f"{rid}.port-{s}" for s in range(servers)]
        if ok.exists() and all(p.exists() for p in ports):  # every server accepts on a port for this request
            answer = read_json(ok)
            answer["ports"], answer["request"] = [p.read_text().strip() for p in ports], rid
            return answer
        if time.monotonic() - checked > 1.0:  # the training may die while we wait for its answer
            checked = time.monotonic()
            why = not_running(run, stale_seconds)
            if why is not None:
                raise JoinRefused(why)
        time.sleep(0.05)
    raise JoinRefused(f"no answer from the run in {run.path} within {timeout:g} s: is it still running? "
                      f"(hpcopt status {run.path})")


def connect(comm, port: str | None, timeout: float):
    """Collective over `comm`: MPI_Comm_connect to a server's port, with a deadline (the call
    itself has none, so it runs in a thread; on timeout the process must exit)."""
    result: dict = {}

    def run():
        try:
            result["inter"] = comm.Connect(port, root=0)
        except Exception as e:  # reported below
            result["error"] = e

    thread = threading.Thread(target=run, name="hpcopt-connect", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"could not connect to the run's server within {timeout:g} s")
    if "error" in result:
        raise result["error"]
    return result["inter"]

