"""Worker side of an exchange with the center (sharded over the server ranks)."""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

from . import codec
from . import protocol as P
from hpcopt.launch.env import JobFatal
from hpcopt.optim.lsgd import pull_

from .wait import BUSY_CAP, WAIT_SHARE, Backoff, PeerTimeout, cancel, wait_all

SEND_WINDOW = 2
LIVENESS_EVERY = 1.0  # seconds between two gone() checks of a waiting client


class Dropped(RuntimeError):
    """A server gave up on this worker (it was silent beyond comm.worker_timeout)."""


class CenterLost(PeerTimeout, JobFatal):
    """A server did not answer within comm.timeout: without its shard of the center the run
    cannot go on, so this ends the whole job (not only this worker)."""


class CenterClient:
    """Sends the worker's flat parameters to the server ranks and receives its new parameters
    back, straight into the same buffer (the servers compute the move). `links[s]` is
    (communicator, rank) of the server owning shard s: a worker started with the training reaches
    them on MPI.COMM_WORLD, a joined worker on the intercommunicators of its join. Every wait has
    `timeout`. A server in `shared` (indices) is on this worker's node and updates `params`, which
    then live in a shared-memory window, in place (hpcopt.comm.shared): the exchange with it is
    the header and a DONE_SHARED answer; `sync` is the window's memory barrier.
    `compress` (comm.compress, not LSGD): exchanges over messages send the change since the
    reference both sides keep, in that codec, except the first (and after a fetch nothing is
    needed, nor from the start of a fresh run: at_center) and every `exact_every`-th (record.worker_every: its snapshot is recorded exactly)."""

    def __init__(self, links: list[tuple[MPI.Comm, int]], bounds: list[tuple[int, int]],
                 params: torch.Tensor, *, chunk: int, timeout: float,
                 layer_norms: np.ndarray | None = None, leaders: bool = False,
                 shared: set[int] = frozenset(), sync=lambda: None, compress: str = "none",
                 exact_every: int = 0, gone=None):
        if params.device.type != "cpu" or not params.is_contiguous():
            raise ValueError("exchanges need a contiguous CPU parameter buffer")
        self.links, self.bounds, self.timeout = links, bounds, timeout
        # gone(): why the servers are known dead (a joined worker reads the run's lock: its
        # server 0's pid gone), else None; asked every LIVENESS_EVERY s of a wait. A joined worker
        # is in no MPI job with the servers, so nothing else tells it before comm.timeout
        self.gone, self._next_liveness = gone, 0.0
        self.params = params
        self.x = params.numpy()  # shares memory with params: sends and replies copy nothing more
        self.chunks = [P.chunk_bounds(lo, hi, chunk) for lo, hi in bounds]
        self.last_sent = time.monotonic()
        # a standing receive per server for its notices (stop, dropped)
        self._notice = [np.zeros(P.NOTICE_SIZE) for _ in links]
        self._notice_reqs = [comm.Irecv(buf, source=rank, tag=P.TAG_NOTICE)
                             for (comm, rank), buf in zip(links, self._notice)]
        self.stop_requested = False
        # LGRAWA: per-layer gradient norms (float64, filled by the local trainer) that every
        # exchange ships to every server after its header (protocol step 2)
        self.layer_norms = layer_norms
        # LSGD: only leaders send their parameters; the others get a target and move themselves
        self.leaders = leaders
        self.target: np.ndarray | None = None  # LSGD: the pull target as it arrives
        self.verdicts = np.zeros((len(links), P.VERDICT_SIZE))
        if shared and leaders:
            raise ValueError("LSGD exchanges go over messages only")
        self.shared, self.sync = set(shared), sync
        self._done = np.zeros(len(links))
        # compressed exchanges: the reference (whole vector; the shards over messages count), the
        # payload buffers per server and chunk, and whether the servers share the reference yet
        self.codec = compress if compress != "none" and not leaders and len(self.shared) < len(links) else None
        self.exact_every = exact_every
        self.synced = False
        self._ahead = None  # encode_ahead's exchange: None, "encoded", then "received"
        if self.codec:
            self.ref = np.zeros_like(self.x)
            self.offsets = [np.concatenate([[0], np.cumsum([codec.payload_size(self.codec, b - a) for a, b in c])])
                            .astype(int) for c in self.chunks]
            self.up = [np.empty(int(o[-1]), dtype=np.uint8) for o in self.offsets]
            self.down = [np.empty(int(o[-1]), dtype=np.uint8) for o in self.offsets]

    # ------------------------------------------------------------------ notices
    def poll_notices(self) -> bool:
        """True once a server has asked this worker to stop (the run is ending). Raises Dropped
        if a server has given up on it."""
        for i, req in enumerate(self._notice_reqs):
            if req is not None and req.Test():
                if self._notice[i][0] == P.DROPPED:
                    self._notice_reqs[i] = None
                    raise Dropped(f"server {i} dropped this worker: it was silent for longer than "
                                  f"comm.worker_timeout (a step slower than that needs a larger value)")
                self.stop_requested = True  # and keep listening: a DROPPED may still follow
                comm, rank = self.links[i]
                self._notice_reqs[i] = comm.Irecv(self._notice[i], source=rank, tag=P.TAG_NOTICE)
        return self.stop_requested

    def heartbeat(self, worker_id: int, step: int, every: float) -> None:
        """Tell the servers this worker is alive if it has sent nothing for `every` seconds."""
        if time.monotonic() - self.last_sent < every:
            return
        self._headers(P.make_header(P.HEARTBEAT, worker_id, step))

    def _headers(self, header: np.ndarray) -> None:
        reqs = [comm.Isend(header, dest=rank, tag=P.TAG_HEADER) for comm, rank in self.links]
        self._wait(reqs, "the servers to take a header")
        self.last_sent = time.monotonic()

    # ------------------------------------------------------------------ exchanges
    def exchange(self, header: np.ndarray, moves: np.ndarray | None = None, ahead: bool = False) -> None:
        """One elastic exchange: the parameters go to the servers, which move the center and
        reply with the worker's new parameters (EASGD: x - alpha (x - center); the other rules:
        see protocol.py); each reply chunk lands in place as soon as that chunk's send is done.
        `moves` (a float32 vector like x; only where moves_only(header)): the exchange writes
        the move there instead, x - moves being the new parameters, and leaves x as it was sent
        (an overlapped worker applies the move to parameters that went on meanwhile).
        `ahead`: send what encode_ahead() encoded and keep the answers for apply_ahead()."""
        if (moves is not None or ahead) and not self.moves_only(header):
            raise ValueError("this exchange replies with parameters (or updates them in place), not moves")
        if ahead != (self._ahead == "encoded"):
            raise ValueError("exchange(ahead=True) sends what encode_ahead() encoded, and only that")
        if self.leaders:
            self._lead_exchange(header)
        elif self._compresses(header):
            self._compressed_exchange(header, moves, ahead)
        else:
            self._transfer(header, send=True)
            self._synced()

    def _compresses(self, header: np.ndarray) -> bool:
        return bool(self.codec and self.synced and not (
            self.exact_every and int(header[P.EXCHANGE_INDEX]) % self.exact_every == 0))

    def moves_only(self, header: np.ndarray) -> bool:
        """Whether exchange(header) can hand back the move alone: compressed, and no server
        updates x in place (a decoded move is what both sides apply; a plain reply is parameters)."""
        return self._compresses(header) and not self.shared

    def encode_ahead(self, header: np.ndarray, source: np.ndarray) -> None:
        """comm.overlap on the CPU: the change of `source` -- the parameters being trained, read
        here in the training's thread between two steps, so no copy of them is needed -- encoded
        now for exchange(header, ahead=True), which only sends it and keeps the answers;
        apply_ahead() then applies the move. Only where moves_only(header)."""
        if not self.moves_only(header) or self._ahead is not None:
            raise ValueError("encode_ahead() is for a compressed exchange over messages, one at a time")
        for s in range(len(self.links)):
            for i, (a, b) in enumerate(self.chunks[s]):
                o, p = self.offsets[s][i], self.offsets[s][i + 1]
                codec.encode_change(self.codec, source[a:b], self.ref[a:b], self.up[s][o:p], plus=self.ref[a:b])
        self._ahead = "encoded"

    def apply_ahead(self, target: np.ndarray) -> None:
        """target -= the move the last exchange(ahead=True) received, as its decode is applied to
        the reference: one pass per chunk, in the caller's thread."""
        if self._ahead != "received":
            raise ValueError("apply_ahead() follows an exchange(ahead=True) that completed")
        for s in range(len(self.links)):
            for i, (a, b) in enumerate(self.chunks[s]):
                o, p = self.offsets[s][i], self.offsets[s][i + 1]
                codec.apply(self.codec, self.down[s][o:p], b - a, minus=(target[a:b], self.ref[a:b]))
        self._ahead = None

    def fetch(self, header: np.ndarray) -> None:
        """x <- center (a FETCH when joining, a RESET after divergence): the servers send the
        center and do not move it."""
        self._transfer(header, send=False)
        self._synced()

    def at_center(self) -> None:
        """The worker starts from the center the servers start from (a fresh run): the reference
        is shared already, and the first exchange may be compressed too."""
        self._synced()

    def _synced(self) -> None:
        """After a plain exchange or a fetch the servers hold exactly what this worker holds."""
        if self.codec:
            self.ref[:] = self.x
            self.synced = True

    def _compressed_exchange(self, header: np.ndarray, moves: np.ndarray | None, ahead: bool = False) -> None:
        """protocol.py, compressed: per chunk, the change x - ref goes up in the codec's format
        (ref += its decoded value, as on the server) and the move comes back (x, or `moves` :=,
        and ref -= its decoded value; `ahead`: encoded already, and kept for apply_ahead).
        Servers in `shared` exchange in place as in _transfer."""
        header = header.copy()
        header[P.KIND] = P.EXCHANGE_Q
        fmt, x, ref = self.codec, self.x, self.ref
        in_place = sorted(self.shared)
        recvs = []
        if in_place:
            self.sync()
            recvs = [(self.links[s][0].Irecv(self._done[s:s + 1], source=self.links[s][1], tag=P.TAG_DONE_SHARED),
                      None) for s in in_place]
        headers = [comm.Isend(header, dest=rank, tag=P.TAG_HEADER) for comm, rank in self.links]
        if self.layer_norms is not None:
            headers += [comm.Isend(self.layer_norms, dest=rank, tag=P.TAG_LAYER_NORMS) for comm, rank in self.links]
        over = [s for s in range(len(self.links)) if s not in self.shared]
        to_send = {s: list(enumerate(self.chunks[s])) for s in over}
        flying: dict[int, list] = {s: [] for s in over}
        for s in over:  # the moves land in their own buffers: every receive can wait from the start
            comm, rank = self.links[s]
            o = self.offsets[s]
            recvs += [(comm.Irecv(self.down[s][o[i]:o[i + 1]], source=rank, tag=P.TAG_REPLY_Q), (s, i, a, b))
                      for i, (a, b) in enumerate(self.chunks[s])]

        def send_more(s):
            comm, rank = self.links[s]
            flying[s] = [r for r in flying[s] if not r.Test()]
            while to_send[s] and len(flying[s]) < SEND_WINDOW:
                i, (a, b) = to_send[s].pop(0)
                o, p = self.offsets[s][i], self.offsets[s][i + 1]
                if not ahead:
                    codec.encode_change(fmt, x[a:b], ref[a:b], self.up[s][o:p], plus=ref[a:b])
                flying[s].append(comm.Isend(self.up[s][o:p], dest=rank, tag=P.TAG_PARAMS_Q))

        deadline, backoff = time.monotonic() + self.timeout, Backoff(cap=BUSY_CAP, relative=WAIT_SHARE)
        requests = [r for r, _ in recvs]  # one Testsome over them all: a Test each cost ~10 ms of
        left = len(requests)  # CPU per exchange with 37 chunks (the completed become REQUEST_NULL)
        while left or any(flying.values()) or any(to_send.values()):
            progress = False
            for s in over:
                before = (len(to_send[s]), len(flying[s]))
                send_more(s)
                progress |= (len(to_send[s]), len(flying[s])) != before
            for j in (MPI.Request.Testsome(requests) or []) if left else []:
                left -= 1
                progress = True
                if recvs[j][1] is not None and not ahead:
                    s, i, a, b = recvs[j][1]
                    o, p = self.offsets[s][i], self.offsets[s][i + 1]
                    if moves is None:
                        codec.apply(fmt, self.down[s][o:p], b - a, minus=(x[a:b], ref[a:b]))
                    else:
                        codec.apply(fmt, self.down[s][o:p], b - a, out=moves[a:b], minus=(ref[a:b],))
            self._pace(progress, deadline, backoff,
                       lambda: [r for r in requests if r != MPI.REQUEST_NULL] + [r for f in flying.values() for r in f])
        self._wait(headers, "the servers to take the exchange header")
        if in_place:
            self.sync()
        if ahead:
            self._ahead = "received"
        self.last_sent = time.monotonic()

    def _transfer(self, header: np.ndarray, *, send: bool) -> None:
        in_place = self.shared if send else set()
        recvs: list = []
        if in_place:
            self.sync()  # the servers read what the last local steps wrote
            recvs = [self.links[s][0].Irecv(self._done[s:s + 1], source=self.links[s][1], tag=P.TAG_DONE_SHARED)
                     for s in sorted(in_place)]
        headers = [comm.Isend(header, dest=rank, tag=P.TAG_HEADER) for comm, rank in self.links]
        if send and self.layer_norms is not None:
            headers += [comm.Isend(self.layer_norms, dest=rank, tag=P.TAG_LAYER_NORMS) for comm, rank in self.links]
        servers = range(len(self.links))
        # Per server: chunks still to send, sends in flight (at most SEND_WINDOW: a backlog of
        # rendezvous sends would clog the shared-memory queues the replies come back through),
        # and the chunks whose reply receive is posted. A reply lands in x[a:b] itself, so its
        # receive is posted only once that chunk's send is complete (MPI forbids a receive into
        # a buffer a pending send reads), and in chunk order (replies match receives in order).
        to_send = {s: list(self.chunks[s]) if send and s not in in_place else [] for s in servers}
        flying: dict[int, list] = {s: [] for s in servers}  # [(request, (a, b))] in chunk order
        to_recv = {s: list(self.chunks[s]) if s not in in_place else [] for s in servers}

        def post(s):
            comm, rank = self.links[s]
            while flying[s] and flying[s][0][0].Test():
                flying[s].pop(0)
            while to_recv[s] and (not send or len(to_recv[s]) > len(to_send[s]) + len(flying[s])):
                a, b = to_recv[s].pop(0)  # its send is complete (or there was none)
                recvs.append(comm.Irecv(self.x[a:b], source=rank, tag=P.TAG_REPLY))
            while to_send[s] and len(flying[s]) < SEND_WINDOW:
                a, b = to_send[s].pop(0)
                flying[s].append((comm.Isend(self.x[a:b], dest=rank, tag=P.TAG_PARAMS), (a, b)))

        deadline = time.monotonic() + self.timeout
        backoff = Backoff(cap=BUSY_CAP, relative=WAIT_SHARE)
        total = len(recvs) + sum(len(c) for c in to_recv.values())
        done = 0
        while done < total:
            before = (done, len(recvs), sum(len(f) for f in flying.values()))
            for s in servers:
                post(s)
            while done < len(recvs) and recvs[done].Test():
                done += 1
            self._pace((done, len(recvs), sum(len(f) for f in flying.values())) != before, deadline, backoff,
                       lambda: recvs[done:] + [r for f in flying.values() for r, _ in f])
        self._wait(headers, "the servers to take the exchange header")
        if in_place:
            self.sync()  # see what the servers wrote
        self.last_sent = time.monotonic()

    def _lead_exchange(self, header: np.ndarray) -> None:
        """LSGD (protocol.py): the header, then each server's verdict; the parameters go only
        where asked (the worker leads, or a snapshot is due), and a pull target, where one comes,
        moves x <- x + rate (target - x), chunk by chunk once that chunk's send (if any) is done."""
        verdict_reqs = [comm.Irecv(self.verdicts[s], source=rank, tag=P.TAG_VERDICT)
                        for s, (comm, rank) in enumerate(self.links)]
        headers = [comm.Isend(header, dest=rank, tag=P.TAG_HEADER) for comm, rank in self.links]
        self._wait(verdict_reqs + headers, "the servers' verdicts")
        if self.target is None and self.verdicts[:, 1].any():
            self.target = np.empty_like(self.x)
        # per chunk: where its send goes (None: no send), its send, its reply receive, rate, a, b
        work = []
        for s, (comm, rank) in enumerate(self.links):
            send, rate = bool(self.verdicts[s, 0]), float(self.verdicts[s, 1])
            for a, b in self.chunks[s]:
                recv = comm.Irecv(self.target[a:b], source=rank, tag=P.TAG_REPLY) if rate > 0 else None
                work.append({"to": (comm, rank) if send else None, "send": None, "recv": recv, "rate": rate,
                             "a": a, "b": b})
        unsent = [w for w in work if w["to"] is not None]
        flying: list[dict] = []
        pending = list(range(len(work)))
        deadline, backoff = time.monotonic() + self.timeout, Backoff(cap=BUSY_CAP, relative=WAIT_SHARE)
        while pending:
            progress = False
            for w in [w for w in flying if w["send"].Test()]:
                w["to"] = None  # sent: x[a:b] may change now
                flying = [f for f in flying if f is not w]
                progress = True
            while unsent and len(flying) < SEND_WINDOW:  # at most SEND_WINDOW sends in flight
                w = unsent.pop(0)
                comm, rank = w["to"]
                w["send"] = comm.Isend(self.x[w["a"]:w["b"]], dest=rank, tag=P.TAG_PARAMS)
                flying.append(w)
            for i in list(pending):
                w = work[i]
                if w["to"] is not None or (w["recv"] is not None and not w["recv"].Test()):
                    continue
                if w["recv"] is not None:
                    a, b = w["a"], w["b"]
                    pull_(self.params[a:b], torch.from_numpy(self.target[a:b]), w["rate"])
                pending.remove(i)
                progress = True
            self._pace(progress, deadline, backoff, lambda: [w["send"] for w in flying] + [w["recv"] for w in work])
        self.last_sent = time.monotonic()

    def _pace(self, progress: bool, deadline: float, backoff: Backoff, outstanding) -> None:
        """One turn of an exchange's wait loop: go on at once after progress, else back off; past
        the deadline cancel `outstanding()` and end the job (CenterLost), unless a server has
        dropped this worker (poll_notices raises Dropped: a clearer error)."""
        if progress:
            backoff.reset()
        elif time.monotonic() > deadline:
            cancel(outstanding())
            self.poll_notices()
            raise CenterLost(f"no reply from the center within {self.timeout:g} s (comm.timeout)")
        else:
            if any(r is not None for r in self._notice_reqs):
                self.poll_notices()
            self._check_liveness(outstanding)
            backoff.idle()

    def _check_liveness(self, outstanding) -> None:
        """Raise CenterLost (cancelling `outstanding()`) once gone() says the servers are dead."""
        if self.gone is None or time.monotonic() < self._next_liveness:
            return
        self._next_liveness = time.monotonic() + LIVENESS_EVERY
        why = self.gone()
        if why:
            cancel(outstanding())
            raise CenterLost(f"the run's servers are gone ({why})")

    def _wait(self, requests: list, what: str) -> None:
        """wait_all with comm.timeout; a server that dropped this worker says so (Dropped), any
        other silence ends the job (CenterLost)."""
        try:
            wait_all(requests, self.timeout, what, relative=WAIT_SHARE,
                     check=None if self.gone is None else lambda: self._check_liveness(lambda: requests))
        except PeerTimeout as e:
            self.poll_notices()
            raise CenterLost(str(e)) from None

    def done(self, worker_id: int, step: int, reason: int = P.FINISHED) -> None:
        """Tell every server this worker has stopped, and why."""
        self._headers(P.make_header(P.DONE, worker_id, step, reason=reason))
        cancel(self._notice_reqs)
