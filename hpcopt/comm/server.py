"""Server side of the exchanges: the ranks that own the center variable, one contiguous shard each.

This module is transport: peers, headers, the chunk pipeline, in-place windows, replies and
deadlines. What an exchange does to the center is the center rule's (hpcopt.optim.center); what
the trajectory file records is the recorder's (hpcopt.io.recorder); joins are hpcopt.comm.joins'.

Each server serves exchanges in arrival order (no barrier between workers, a slow worker never
holds up the others), chunk by chunk as the parameters arrive. As each chunk of a worker's
parameters arrives, the rule moves that chunk of the center and turns the received chunk, in
place, into the worker's new parameters, which go back from that same buffer. So the center is
never locked by a reply in flight: a worker that is slow to take its reply (descheduled, or dead:
a dead receiver never takes a rendezvous message) holds only its own receive buffer.

A worker started with the training on this server's node exchanges in place (hpcopt.comm.shared):
its `recv` buffer is its own parameter vector in a shared-memory window, nothing is received,
the same per-chunk update runs on it where it is, and a one-number answer replaces the replies.
LSGD's exchanges differ on the wire (only leaders' parameters travel): see _start_lead.

Server 0 is also the coordinator: every record.flush_seconds it tells the other servers
(TAG_CONTROL) to enter a collective flush with it. Within one server, exchanges are applied
atomically per chunk; across servers the shards of a snapshot may have absorbed the same
exchanges in a slightly different order — that is the asynchrony of Algorithm 1, not an error.
With `deterministic=True` every server serves the workers in the same fixed round-robin order.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from mpi4py import MPI

from hpcopt.config import CommConfig
from hpcopt.optim.center import CenterRule, Verdict

from . import codec
from . import protocol as P
from .flushes import Flushes
from .wait import BUSY_CAP, IDLE_CAP, Backoff, PeerTimeout, cancel, wait_all

# Receives posted ahead per exchange. Open MPI copies every matched large message during one
# progress call, so posting all chunks at once copies the whole vector first (evicting it from
# cache) before anything else happens; a small window interleaves copies, replies and updates
# chunk by chunk.
RECV_WINDOW = 2

# In-place exchanges (a worker on this node, hpcopt.comm.shared): chunks updated per pass of the
# serve loop, so one large exchange does not keep the others' messages waiting
SHARED_CHUNKS_PER_POLL = 4
_DONE = np.ones(1)


def _finite(x: torch.Tensor) -> bool:
    """Whether the parameters may be mixed in: one vectorised pass (a sum), 4x cheaper than
    torch.isfinite(x).all(). The sum is NaN/Inf when any element is, and also when the values
    are so large (~1e33) that it overflows: parameters of that size are rejected too."""
    return math.isfinite(float(x.sum()))


class _Malformed(RuntimeError):
    """A worker broke the protocol (a message of the wrong size): it is dropped."""


def _arrived(req, count: int, dtype) -> bool:
    """Whether a receive completed with exactly `count` elements; a short or long message
    (MPI truncates a long one with an error) is _Malformed, never stale bytes."""
    status = MPI.Status()
    try:
        if not req.Test(status):
            return False
    except MPI.Exception as e:
        raise _Malformed(f"sent a message longer than {count} elements ({e.Get_error_string()})") from None
    if status.Get_count(dtype) != count:
        raise _Malformed(f"sent {status.Get_count(dtype)} elements where {count} were due")
    return True


@dataclass
class Peer:
    """A worker as this server sees it."""
    wid: int  # worker id, unique over the whole run (joins and resumes included)
    comm: MPI.Comm  # MPI.COMM_WORLD, or the intercommunicator of its join
    rank: int  # its rank in `comm` (in the remote group for an intercommunicator)
    host: str
    recv: np.ndarray  # its receive buffer (one shard)
    recv_t: torch.Tensor
    last_seen: float
    posted: list | None = None  # receives posted for its next exchange
    step: int = 0  # its local step at its last message
    exchanges: int = 0  # exchanges served here
    joined: float = 0.0  # run time it joined at
    world_rank: int = -1  # for the records: its rank in the job it was started in
    pid: int = -1
    shared: bool = False  # `recv` is the worker's own parameters (shared memory): exchanges in place
    ref: _Reference | None = None  # compressed exchanges: what this server and the worker share


class _Reference:
    """Compressed exchanges with one worker (protocol.py): the reference `x` both sides keep of
    its parameters (this shard), the move the worker still owes after rounding (`err`, error
    feedback), and the payload buffers of one exchange, up and down. `synced` once a plain
    exchange or a fetch set `x`: only then may the worker send changes."""

    def __init__(self, n: int, sizes: list[int]):
        self.x = np.zeros(n, dtype=np.float32)
        self.err = np.zeros(n, dtype=np.float32)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.up = np.empty(int(self.offsets[-1]), dtype=np.uint8)
        self.down = np.empty(int(self.offsets[-1]), dtype=np.uint8)
        self.synced = False

    def set(self, a: int, b: int, values: np.ndarray) -> None:
        self.x[a:b] = values
        self.err[a:b] = 0


@dataclass
class _Link:
    """A communicator workers send headers on, with its standing any-source header receive."""
    comm: MPI.Comm
    members: dict[int, int]  # rank in comm -> worker id
    buf: np.ndarray = field(default_factory=lambda: np.empty(P.HEADER_SIZE, dtype=np.float64))
    req: object = None


@dataclass(eq=False)  # compared by identity (in lists of pending exchanges)
class _Exchange:
    """One worker's exchange, fetch or DONE message in progress on this server."""
    wid: int
    header: np.ndarray
    requests: list = field(default_factory=list)  # one receive per chunk
    next_chunk: int = 0  # next chunk to receive (all before it are served and their replies sent)
    replies: list = field(default_factory=list)  # one send per served chunk
    snapshot: np.ndarray | None = None  # copy of the received parameters, when sampled
    arrived: float = 0.0
    layer_norms: np.ndarray | None = None  # LGRAWA: the worker's per-layer gradient norms
    norms_req: object = None  # LGRAWA: their receive, until it completes
    verdict: Verdict | None = None  # LSGD: what the exchange does, once decided
    rejected: bool = False  # it carried non-finite parameters: none of them reached the center
    upload: np.ndarray | None = None  # LSGD: where the worker's parameters go, when it sends them
    counted_compressed: bool = False  # sent as EXCHANGE_Q, served in place here

    @property
    def kind(self) -> float:
        return self.header[P.KIND]

    @property
    def compressed(self) -> bool:
        return self.header[P.KIND] == P.EXCHANGE_Q

    @property
    def k(self) -> int:
        return int(self.header[P.EXCHANGE_INDEX])


@dataclass
class ServeSummary:
    exchanges: int
    wall_seconds: float
    polls: int
    cpu_seconds: float
    all_diverged: bool  # every worker that left gave up after diverging
    all_crashed: bool  # no worker left by itself: every one crashed (was dropped)


class CenterServer:
    def __init__(self, *, world: MPI.Comm, servers: MPI.Comm, workers: dict[int, tuple],
                 bounds: list[tuple[int, int]], rule: CenterRule, recorder, comm: CommConfig,
                 start: float, deterministic: bool = False, log=print, exchanges: int = 0,
                 next_worker_id: int | None = None, n_layers: int = 0, group_size: int = 0,
                 shared: dict[int, np.ndarray] | None = None, sync=lambda: None, joins=None,
                 at_center: bool = False):
        """`workers` maps worker id -> (its rank in `world`, host[, pid]) for the workers started with
        the run; `rule` owns this server's shard of the center (hpcopt.optim.center); `recorder`
        (hpcopt.io.recorder) what the trajectory file gets; `joins` (optional) admits workers
        that join later (hpcopt.comm.joins). `n_layers`: LGRAWA's per-layer norms per exchange.
        `group_size`: two-level LSGD's node of a worker is worker id // group_size (0: its host).
        `shared` maps the world rank of a worker on this node to its parameters in a
        shared-memory window (hpcopt.comm.shared; `sync` is the window's memory barrier):
        exchanges with it happen in place (rules that carry parameters only). `at_center`: the
        workers in `workers` start from the center as it is now (a fresh run, not a resume), so
        compressed exchanges need no plain first exchange to share a reference."""
        self.world, self.servers = world, servers
        self.coordinator = servers.rank == 0  # server 0 starts the flushes and keeps the tables
        self.bounds = bounds
        self.lo, self.hi = bounds[servers.rank]
        self.rule, self.recorder, self.joins = rule, recorder, joins
        self.center = rule.center.numpy()
        self.n_layers, self.group_size = n_layers, group_size
        self.timeout, self.worker_timeout = comm.timeout, comm.worker_timeout
        self.deterministic = deterministic
        self.start, self.log = start, log
        self.shared = shared if rule.carries_params else None
        self.sync = sync
        self.chunks = P.chunk_bounds(0, self.hi - self.lo, max(1, int(comm.chunk_mb * 1e6 / 4)))
        # a chunk of float32 for the compressed path, reused (no allocation per chunk)
        self.scratch = np.empty(max((b - a for a, b in self.chunks), default=0), dtype=np.float32)
        n_params, S = bounds[-1][1], len(bounds)
        self.bytes_per_exchange = 2 * 4 * n_params + S * P.HEADER_SIZE * 8 + S * 8 * n_layers
        # compressed exchanges over messages (comm.compress): the format, and (server 0, for the
        # records) the bytes of one, all shards cut into chunks as each server cuts its own
        self.codec = comm.compress if comm.compress != "none" and rule.carries_params else None
        if self.codec:
            codec.warm(self.codec)  # (a training's servers did before its clock started: then a no-op)
            step = max(1, int(comm.chunk_mb * 1e6 / 4))
            self.q_bytes = self.bytes_per_exchange - 2 * 4 * n_params + 2 * sum(
                codec.payload_size(self.codec, b - a) for lo, hi in bounds for a, b in P.chunk_bounds(0, hi - lo, step))

        self.peers: dict[int, Peer] = {}
        self.links: list[_Link] = []
        # worker id -> (reply sends, since) of its served exchange: its receive buffer is busy
        # until they are out, then the receives of its next exchange are posted
        self.replies: dict[int, tuple[list, float]] = {}
        self.fetches: list[tuple] = []  # (requests, center copy, worker id, since): FETCH/RESET replies
        self.active: set[int] = set()
        self.order: list[int] = []  # round-robin order in deterministic mode
        self.turn = 0
        self.pending: list[_Exchange] = []
        self.exchanges = exchanges
        self.next_worker_id = max(workers, default=-1) + 1 if next_worker_id is None else next_worker_id
        self.stopping = False  # the run is ending: workers were told to leave
        world_link = _Link(world, {})
        self.links.append(world_link)
        for wid, (rank, host, *pid) in sorted(workers.items()):
            peer = self.add_worker(wid, world_link, rank, host, world_rank=rank, pid=pid[0] if pid else -1)
            if at_center and self._reference(peer) is not None:  # both sides hold the initial point
                peer.ref.set(0, self.center.size, self.center)
                peer.ref.synced = True
        self.left: dict[int, int] = {}  # how many workers left for each reason
        # workers owed more work: those that left on a signal or a stop (having saved their
        # state), those dropped as crashed (their last periodic state, if any), and on a resume the
        # checkpoint's workers not started in this launch. A resume continues them (their
        # checkpoint rows, kept from when they left); the run is complete only when there are none
        self.departed: dict[int, tuple] = {}
        self.crashed = 0  # workers dropped
        self.stop_flag = None  # set (e.g. by a signal handler) to end the run gracefully
        self.flushes = Flushes(self)
        self.finished = False

    # ------------------------------------------------------------------ membership
    def now(self) -> float:
        return time.monotonic() - self.start

    def event(self, kind: str, wid: int = -1, step: int = -1, detail: str = "") -> None:
        peer = self.peers.get(wid)
        self.recorder.event(kind, wid, peer.world_rank if peer else -1, peer.host if peer else "", step, detail)

    def add_worker(self, wid: int, link: _Link, rank: int, host: str, world_rank: int = -1, pid: int = -1) -> Peer:
        """A new member (at start, on a join, on a resume): buffers, receives, bookkeeping."""
        in_place = bool(self.shared) and link.comm is self.world and rank in self.shared
        recv = self.shared[rank][self.lo:self.hi] if in_place else np.empty(self.hi - self.lo, dtype=np.float32)
        peer = Peer(wid, link.comm, rank, host, recv, torch.from_numpy(recv), time.monotonic(),
                    joined=self.now(), world_rank=world_rank, pid=pid, shared=in_place)
        self.peers[wid] = peer
        link.members[rank] = wid
        if link.req is None:
            link.req = link.comm.Irecv(link.buf, source=MPI.ANY_SOURCE, tag=P.TAG_HEADER)
        self.rule.add(wid, wid // self.group_size if self.group_size else host)
        self.active.add(wid)
        self.order.append(wid)
        self.next_worker_id = max(self.next_worker_id, wid + 1)
        self._post(wid)
        if self.stopping:  # admitted after the stop began (its join was under way): it leaves too
            peer.comm.Isend(np.array([P.STOP]), dest=peer.rank, tag=P.TAG_NOTICE)
        return peer

    def add_link(self, comm: MPI.Comm) -> _Link:
        link = _Link(comm, {})
        self.links.append(link)
        return link

    # what joins (hpcopt.comm.joins) ask of the server
    def refuses_joins(self) -> str | None:
        """Why a join cannot be admitted now, or None."""
        return "the run is ending" if self.stopping or not self.active else None

    def reserve_ids(self, n: int) -> int:
        """Server 0: the first of n fresh worker ids."""
        base = self.next_worker_id
        self.next_worker_id += n
        return base

    def median_step(self) -> int:
        steps = [self.peers[w].step for w in self.active]
        return int(statistics.median(steps)) if steps else 0

    def admit(self, inter: MPI.Comm, first_id: int, hosts: list[str], pids: list[int], start_step: int,
              what: str) -> None:
        """The ranks of a join's intercommunicator become workers first_id, first_id + 1, ..."""
        link = self.add_link(inter)
        for i, host in enumerate(hosts):
            self.add_worker(first_id + i, link, i, host, world_rank=i, pid=pids[i])
            self.event("join", first_id + i, start_step, f"joined from {host} (pid {pids[i]}, {what})")

    def resumable(self) -> list[tuple]:
        """The checkpoint's rows (io.checkpoint.WORKER): every worker a resume continues."""
        rows = {w: (w, self.peers[w].step, self.peers[w].exchanges, *self.rule.worker_scalars(w)) for w in self.active}
        rows.update(self.departed)
        return [rows[w] for w in sorted(rows)]

    def members(self) -> list[dict]:
        """The active workers, for the status file."""
        now = time.monotonic()
        return [{"id": w, "host": p.host, "rank": p.world_rank, "pid": p.pid, "step": p.step,
                 "exchanges": p.exchanges, "joined_at": round(p.joined, 3),
                 "silent_seconds": round(now - p.last_seen, 3)}
                for w, p in sorted(self.peers.items()) if w in self.active]

    def _remove(self, wid: int, forget: bool = True) -> None:
        """Forget a worker that left or was dropped. The center rule forgets it too (`forget`),
        except a worker that finished its epochs: its final parameters stay in MGRAWA's average
        and it may stay LSGD's leader, as in the synchronous algorithms' last round."""
        self.active.discard(wid)
        if wid in self.order:
            i = self.order.index(wid)
            self.order.remove(wid)
            if i < self.turn:
                self.turn -= 1
            self.turn = self.turn % len(self.order) if self.order else 0
        if forget:
            self.rule.forget(wid)
        # state follows the live run, not its history: the departed worker's receive buffer (a
        # shard of the model) goes, and a join whose workers have all left is no longer polled
        peer = self.peers[wid]
        peer.ref = None
        if not peer.shared:
            peer.recv = np.empty(0, dtype=np.float32)
            peer.recv_t = torch.from_numpy(peer.recv)
        for link in self.links:
            if link.comm is peer.comm and link.comm is not self.world and link.req is not None \
                    and not any(w in self.active for w in link.members.values()):
                cancel([link.req])
                link.req = None

    def drop(self, wid: int, why: str) -> None:
        """A worker is gone without saying so (killed, node lost, silent): cancel what it owed,
        record a crash, go on (the chunks of a half-received exchange that were served stay
        applied, like the exchanges before them: the elastic moves are per chunk)."""
        if wid not in self.active:
            return
        peer = self.peers[wid]
        self.log(f"[{self.now():7.1f}s] dropping worker {wid} ({peer.host}): {why}")
        self.crashed += 1
        self.event("crash", wid, peer.step, why)
        # it did not finish its epochs: its checkpoint row stays (before the rule forgets it), so
        # the run ends stopped and a resume continues it from its last saved state
        self.departed[wid] = (wid, peer.step, peer.exchanges, *self.rule.worker_scalars(wid))
        cancel(peer.posted or [])
        peer.posted = None
        cancel(self.replies.pop(wid, ([], 0))[0])
        for ex in [e for e in self.pending if e.wid == wid]:
            cancel(ex.requests + ex.replies + [ex.norms_req])
            self.pending.remove(ex)
        self.fetches = [f for f in self.fetches if f[2] != wid or cancel(f[0])]  # cancel and forget its
        self._remove(wid)
        try:  # tell it, in case it is only slow: it stops with a clear error instead of timing out
            peer.comm.Isend(np.array([P.DROPPED]), dest=peer.rank, tag=P.TAG_NOTICE)
        except MPI.Exception:
            pass

    def request_stop(self, why: str) -> None:
        """End the run: every worker makes a last exchange and leaves; then the final flush."""
        if self.stopping:
            return
        self.stopping = True
        self.log(f"[{self.now():7.1f}s] stopping the run ({why}): asking {len(self.active)} worker(s) to leave")
        self.event("stop", detail=why)
        for wid in sorted(self.active):
            peer = self.peers[wid]
            peer.comm.Isend(np.array([P.STOP]), dest=peer.rank, tag=P.TAG_NOTICE)

    # ------------------------------------------------------------------ the serve loop
    def serve(self) -> ServeSummary:
        """Serve until every worker has left. Collective over the server communicator (flushes)."""
        # status.json says this launch is running from the start, not what the last one left
        # ("stopped", its workers) until the first flush (server 0 only; a no-op elsewhere)
        self.recorder.write_status("running", exchanges=self.exchanges, members=self.members())
        self.flushes.begin()
        backoff = Backoff()
        cpu0, loops = time.process_time(), 0
        while not self.finished:
            loops += 1
            progress = self._poll_headers()
            if self.replies:
                progress |= self._poll_replies()
            progress |= self._poll_exchanges()
            if self.fetches:
                progress |= self._poll_fetches()
            if self.joins is not None:
                progress |= self.joins.poll(self)
            progress |= self.flushes.poll()
            if self.coordinator:
                progress |= self.recorder.report(self.exchanges, len(self.active))
            self._check_deadlines()
            if self.stop_flag and not self.stopping:
                self.request_stop(f"signal {getattr(self.stop_flag, 'received', '')}")
            if progress:
                backoff.reset()
            else:
                backoff.idle(BUSY_CAP if self.pending or self.fetches else IDLE_CAP)
        for link in self.links:  # nobody will send another header
            cancel([link.req])
            link.req = None
        for peer in self.peers.values():
            cancel(peer.posted or [])
            peer.posted = None
        return ServeSummary(exchanges=self.exchanges, wall_seconds=self.now(), polls=loops,
                            cpu_seconds=time.process_time() - cpu0,
                            all_diverged=self.left.get(P.GAVE_UP, 0) > 0 and len(self.left) == 1,
                            all_crashed=self.crashed > 0 and not self.left)

    def _post(self, wid: int) -> None:
        """Post the first receives of the worker's next exchange (its buffer is free). LSGD posts
        them only once it has told the worker to send its parameters."""
        if not self.rule.carries_params or self.peers[wid].shared:
            self.peers[wid].posted = []
            return
        self.peers[wid].posted = [self._irecv(wid, c) for c in range(min(RECV_WINDOW, len(self.chunks)))]

    def _irecv(self, wid: int, chunk: int, into: np.ndarray | None = None):
        a, b = self.chunks[chunk]
        peer = self.peers[wid]
        return peer.comm.Irecv((peer.recv if into is None else into)[a:b], source=peer.rank, tag=P.TAG_PARAMS)

    def _poll_headers(self) -> bool:
        progress = False
        status = MPI.Status()
        for link in self.links:
            while link.req is not None:
                try:
                    if not link.req.Test(status):
                        break
                    bad = None if status.Get_count(MPI.DOUBLE) == P.HEADER_SIZE else \
                        f"a header of {status.Get_count(MPI.DOUBLE)} numbers, not {P.HEADER_SIZE}"
                except MPI.Exception as e:
                    bad = f"a header longer than {P.HEADER_SIZE} numbers ({e.Get_error_string()})"
                progress = True
                rank, header = status.Get_source(), link.buf.copy()
                link.req = link.comm.Irecv(link.buf, source=MPI.ANY_SOURCE, tag=P.TAG_HEADER)
                if bad is None:
                    self._on_header(link, rank, header)
                elif link.members.get(rank) in self.active:
                    self.drop(link.members[rank], f"sent {bad}")
        return progress

    def _on_header(self, link: _Link, rank: int, header: np.ndarray) -> None:
        wid = link.members.get(rank)
        if wid is None or wid not in self.active:
            # a worker dropped earlier (it was only slow): it got a DROPPED notice; ignore it
            if wid is None:
                self.log(f"ignoring a message from unknown rank {rank}")
            return
        problem = P.header_problem(header)
        if problem is not None:
            self.drop(wid, f"sent a malformed header ({problem})")
            return
        peer = self.peers[wid]
        peer.last_seen = time.monotonic()
        peer.step = int(header[P.STEP])
        ex = _Exchange(wid, header, arrived=time.monotonic())
        if ex.kind == P.HEARTBEAT:
            return
        if self.rule.carries_params and any(e.wid == wid for e in self.pending):
            # its exchange is not complete (the worker waits for every reply before it sends
            # again): two at once would share its buffers, a DONE would leave one half served
            self.drop(wid, "sent a new message before its exchange was complete")
            return
        if ex.compressed and peer.shared:  # nothing travels in place: a plain exchange here, but the
            ex.header[P.KIND] = P.EXCHANGE  # worker's other shards went compressed (the records count them so)
            ex.counted_compressed = True
        if ex.compressed and not (peer.ref is not None and peer.ref.synced):
            self.drop(wid, "sent a compressed exchange without a reference in common "
                           "(none yet, or comm.compress differs)")
            return
        if ex.kind in P.EXCHANGES:
            if peer.posted is None or wid in self.replies:
                self._settle(wid)
            if self.n_layers:  # LGRAWA, protocol step 2: sent right after the header
                ex.layer_norms = np.empty(self.n_layers, dtype=np.float64)
                ex.norms_req = peer.comm.Irecv(ex.layer_norms, source=peer.rank, tag=P.TAG_LAYER_NORMS)
            if ex.compressed:  # every chunk's receive at once (small); the plain ones stay posted
                ref = peer.ref
                ex.requests = [peer.comm.Irecv(ref.up[ref.offsets[i]:ref.offsets[i + 1]], source=peer.rank,
                                               tag=P.TAG_PARAMS_Q) for i in range(len(self.chunks))]
            else:
                ex.requests = peer.posted
                peer.posted = None
            if self.rule.carries_params and self.recorder.wants_worker(ex.k):
                ex.snapshot = np.empty(self.hi - self.lo, dtype=np.float32)
        elif ex.kind in (P.FETCH, P.RESET):
            if ex.kind == P.RESET:
                self.event("diverged", wid, peer.step,
                           f"training loss {header[P.TRAIN_LOSS]:.4g}: reset to the center")
            if self.deterministic:  # a fetch is not a turn
                self._fetch(ex)
                return
        self.pending.append(ex)

    def _fetch(self, ex: _Exchange) -> None:
        """FETCH/RESET: send the worker the center as it is now (a copy, so updates may go on)."""
        peer = self.peers[ex.wid]
        snap = self.center.copy()
        reqs = [peer.comm.Isend(snap[a:b], dest=peer.rank, tag=P.TAG_REPLY) for a, b in self.chunks]
        if self._reference(peer) is not None:  # what the worker takes as its parameters
            peer.ref.set(0, snap.size, snap)
            peer.ref.synced = True
        self.fetches.append((reqs, snap, ex.wid, time.monotonic()))

    def _poll_exchanges(self) -> bool:
        if not self.pending:
            return False
        if self.deterministic:
            expected = self.order[self.turn] if self.order else None
            todo = [ex for ex in self.pending if ex.wid == expected][:1]
            todo += [ex for ex in self.pending if ex.kind not in P.EXCHANGES and ex not in todo]
        else:
            todo = list(self.pending)
        progress = False
        for ex in todo:
            try:
                progress |= self._advance(ex)
            except _Malformed as e:
                self.drop(ex.wid, str(e))
                progress = True
        return progress

    def _advance(self, ex: _Exchange) -> bool:
        """Move one pending message on as far as it can go now; returns whether anything happened."""
        if ex.kind == P.DONE:
            self._leave(ex)
            return True
        if ex.kind in (P.FETCH, P.RESET):
            self.pending.remove(ex)
            self._fetch(ex)
            return True
        if not self.rule.carries_params:
            return self._advance_lead(ex)
        if ex.compressed:
            return self._advance_compressed(ex)
        return self._advance_params(ex)

    def _reference(self, peer: Peer) -> _Reference | None:
        """The worker's compressed-exchange state, made on first use (None: none over this link)."""
        if not self.codec or peer.shared:
            return None
        if peer.ref is None:
            peer.ref = _Reference(self.hi - self.lo, [codec.payload_size(self.codec, b - a) for a, b in self.chunks])
        return peer.ref

    def _leave(self, ex: _Exchange) -> None:
        self.pending.remove(ex)
        self._settle(ex.wid, post=False)
        reason = int(ex.header[P.REASON])
        self.left[reason] = self.left.get(reason, 0) + 1
        if reason in (P.SIGNALLED, P.STOPPED):  # it saved its state first
            peer = self.peers[ex.wid]
            self.departed[ex.wid] = (ex.wid, int(ex.header[P.STEP]), peer.exchanges, *self.rule.worker_scalars(ex.wid))
        cancel(self.peers[ex.wid].posted or [])
        self.peers[ex.wid].posted = None
        self._remove(ex.wid, forget=reason != P.FINISHED)
        self.event("leave", ex.wid, int(ex.header[P.STEP]), P.REASONS.get(reason, f"reason {reason}"))
        if reason != P.FINISHED:
            self.log(f"[{self.now():7.1f}s] worker {ex.wid} ({self.peers[ex.wid].host}) left: "
                     f"{P.REASONS.get(reason)}; {len(self.active)} remain")

    def _report(self, ex: _Exchange) -> None:
        h = ex.header
        self.rule.report(ex.wid, loss=float(h[P.TRAIN_LOSS]), grad_norm=float(h[P.GRAD_NORM]), exchange=ex.k,
                         layer_norms=ex.layer_norms)

    def _advance_params(self, ex: _Exchange) -> bool:
        """Serve each chunk as it arrives: the rule's update, the reply, and one more receive
        (RECV_WINDOW ahead). In place the chunks are there: update a few per call."""
        progress = False
        n = len(self.chunks)
        peer = self.peers[ex.wid]
        budget = SHARED_CHUNKS_PER_POLL if peer.shared else n
        while budget and ex.next_chunk < n and self._norms_in(ex) and (peer.shared or self._chunk_in(ex)):
            i = ex.next_chunk
            a, b = self.chunks[i]
            if i == 0 and peer.shared:
                self.sync()  # see what the worker's last local steps wrote
            if ex.snapshot is not None:  # the parameters the worker had at this exchange
                ex.snapshot[a:b] = peer.recv[a:b]
            if i + RECV_WINDOW < n and not peer.shared:
                ex.requests.append(self._irecv(ex.wid, i + RECV_WINDOW))
            if i == 0:
                self._report(ex)
            x = peer.recv_t[a:b]
            if _finite(x):
                self.rule.exchange_(ex.wid, x, a, b)
            else:  # never into the center: the worker gets the center's chunk instead (a reset)
                x.copy_(self.rule.center[a:b])
                ex.rejected = True
            if self._reference(peer) is not None:  # the worker's parameters, exactly: in common now
                peer.ref.set(a, b, peer.recv[a:b])
                peer.ref.synced = i == n - 1 or peer.ref.synced
            if not peer.shared:
                ex.replies.append(peer.comm.Isend(peer.recv[a:b], dest=peer.rank, tag=P.TAG_REPLY))
            ex.next_chunk += 1
            budget -= 1
            progress = True
        if ex.next_chunk == n:
            if peer.shared:
                self.sync()  # the worker sees the update once it has the answer
                ex.replies = [peer.comm.Isend(_DONE, dest=peer.rank, tag=P.TAG_DONE_SHARED)]
            self._served(ex)
        return progress

    def _advance_compressed(self, ex: _Exchange) -> bool:
        """A compressed exchange (protocol.py), chunk by chunk as the changes arrive: the
        reference becomes the server's view of the worker's parameters, the rule moves the center
        and says where the worker goes, and the move (plus what rounding withheld from the last
        ones) goes back compressed; the reference follows the decoded move, as the worker's does."""
        peer, ref, fmt = self.peers[ex.wid], self.peers[ex.wid].ref, self.codec
        progress = False
        while ex.next_chunk < len(self.chunks) and self._norms_in(ex) and self._chunk_in(ex, compressed=True):
            i = ex.next_chunk
            a, b = self.chunks[i]
            o, p = ref.offsets[i], ref.offsets[i + 1]
            if i == 0:
                self._report(ex)
            view = ref.x[a:b]
            one = self.scratch[:b - a]
            codec.apply(fmt, ref.up[o:p], b - a, plus=(view,))  # the worker's parameters, as this server knows them
            if not _finite(torch.from_numpy(view)):  # its own values were checked before it sent: a broken sender
                raise _Malformed("sent a compressed change that decodes to non-finite (or overflowing) parameters")
            if ex.snapshot is not None:
                ex.snapshot[a:b] = view
            np.copyto(one, view)
            self.rule.exchange_(ex.wid, torch.from_numpy(one), a, b)  # one: where the worker goes
            # the move, view - one, with what rounding withheld from the last ones (err, which then
            # keeps what it withholds now) goes back; view follows what it decodes to, as the worker's does
            codec.encode_change(fmt, view, one, ref.down[o:p], err=ref.err[a:b], minus=view)
            ex.replies.append(peer.comm.Isend(ref.down[o:p], dest=peer.rank, tag=P.TAG_REPLY_Q))
            ex.next_chunk += 1
            progress = True
        if ex.next_chunk == len(self.chunks):
            self._served(ex)
        return progress

    def _chunk_in(self, ex: _Exchange, compressed: bool = False) -> bool:
        """Whether the exchange's next chunk has arrived (whole); progress restarts its deadline."""
        a, b = self.chunks[ex.next_chunk]
        if compressed:
            n, dtype = codec.payload_size(self.codec, b - a), MPI.BYTE
        else:
            n, dtype = b - a, MPI.FLOAT
        if not _arrived(ex.requests[ex.next_chunk], n, dtype):
            return False
        ex.arrived = time.monotonic()  # a slow but healthy worker is not dropped as dead
        return True

    def _norms_in(self, ex: _Exchange) -> bool:
        """LGRAWA: whether the exchange's per-layer norms have arrived (needed before its first reply)."""
        if ex.norms_req is not None and _arrived(ex.norms_req, self.n_layers, MPI.DOUBLE):
            ex.norms_req = None
        return ex.norms_req is None

    # ------------------------------------------------------------------ LSGD on the wire
    def _start_lead(self, ex: _Exchange) -> None:
        """LSGD: the rule's verdict [send, rate, leader, global leader] tells the worker what
        follows: its parameters (send), and a pull target m it moves toward, x <- x + rate (m - x)."""
        h, peer = ex.header, self.peers[ex.wid]
        v = ex.verdict = self.rule.verdict(ex.wid, loss=float(h[P.TRAIN_LOSS]), grad_norm=float(h[P.GRAD_NORM]),
                                           exchange=ex.k, sample=self.recorder.wants_worker(ex.k))
        answer = np.array([float(v.send), v.rate, float(v.leader), float(v.global_leader)], dtype=np.float64)
        ex.replies = [peer.comm.Isend(answer, dest=peer.rank, tag=P.TAG_VERDICT)]
        if v.target is not None:
            t = v.target.numpy()
            ex.replies += [peer.comm.Isend(t[a:b], dest=peer.rank, tag=P.TAG_REPLY) for a, b in self.chunks]
        if v.send:
            # a leader's upload goes to a fresh buffer: the one it held may still be read by sends
            ex.upload = np.empty(self.hi - self.lo, dtype=np.float32) if v.leads else peer.recv
            ex.requests = [self._irecv(ex.wid, c, ex.upload) for c in range(min(RECV_WINDOW, len(self.chunks)))]
        else:
            ex.next_chunk = len(self.chunks)  # nothing to receive

    def _advance_lead(self, ex: _Exchange) -> bool:
        """Start the exchange (in its turn, in deterministic mode), then take the upload, if any."""
        n, progress = len(self.chunks), ex.verdict is None
        if ex.verdict is None:
            self._start_lead(ex)
        while ex.next_chunk < n and self._chunk_in(ex):
            if ex.next_chunk + RECV_WINDOW < n:
                ex.requests.append(self._irecv(ex.wid, ex.next_chunk + RECV_WINDOW, ex.upload))
            ex.next_chunk += 1
            progress = True
        if ex.next_chunk == n:
            if ex.upload is not None and not _finite(torch.from_numpy(ex.upload)):
                ex.rejected = True
                self.rule.forget(ex.wid)  # its loss average no longer makes it a leader either
            elif ex.verdict.leads:
                self.rule.upload(ex.wid, torch.from_numpy(ex.upload))
            if ex.upload is not None and self.recorder.wants_worker(ex.k):
                ex.snapshot = ex.upload if ex.verdict.leads else ex.upload.copy()
            self._served(ex)
        return progress

    def take_uploads(self, wid: int | None = None) -> None:
        """LSGD: finish the started exchanges (of worker `wid`, or all), taking their uploads. A
        worker's upload sends may complete (buffered) before this server has received them, so
        the worker can go on, or say DONE, with its upload still in flight to this server."""
        for ex in [e for e in self.pending if e.verdict is not None and wid in (None, e.wid)]:
            while ex in self.pending:
                try:
                    if not self._advance_lead(ex):
                        wait_all([ex.requests[ex.next_chunk]], self.worker_timeout, f"worker {ex.wid}'s parameters")
                except (_Malformed, PeerTimeout) as e:  # it died (or lied) mid-upload: it alone pays
                    self.drop(ex.wid, f"did not complete its upload: {e}")

    # ------------------------------------------------------------------ after an exchange
    def _served(self, ex: _Exchange) -> None:
        """The exchange is complete here: its replies are in flight; count and record it."""
        if ex.rejected:
            ex.snapshot = None
            self.event("rejected", ex.wid, int(ex.header[P.STEP]), "sent non-finite parameters: they were "
                       "not mixed into the center" + (", the worker got the center's" if self.rule.carries_params else ""))
        self.pending.remove(ex)
        self.replies[ex.wid] = (ex.replies, time.monotonic())
        self.exchanges += 1
        h, t = ex.header, self.now()
        step, k = int(h[P.STEP]), ex.k
        self.peers[ex.wid].exchanges += 1
        rec = self.recorder
        if self.coordinator:
            sent, lead, glob = self.q_bytes if ex.compressed or ex.counted_compressed else self.bytes_per_exchange, -1, -1
            if ex.verdict is not None:  # LSGD: header, verdict, and the parameters that travelled (as seen here)
                v = ex.verdict
                sent = len(self.bounds) * 8 * (P.HEADER_SIZE + P.VERDICT_SIZE) \
                    + 4 * self.bounds[-1][1] * ((ex.upload is not None) + (v.target is not None))
                lead, glob = v.leader, v.global_leader
            rec.row((ex.wid, step, k, t, h[P.TRAIN_LOSS], int(h[P.SAMPLES]), h[P.LR], sent, h[P.GRAD_NORM],
                     lead, glob), ex.layer_norms if self.n_layers else None)
        rec.counted(self.exchanges, self.center)
        if ex.snapshot is not None:
            rec.worker((ex.wid, k), (ex.wid, step, k, t), ex.snapshot)
        if self.deterministic and self.order:  # the next exchange in that order may start
            self.turn = (self.turn + 1) % len(self.order)

    def all_done(self) -> bool:
        """Every worker has left and nothing is in flight: the final flush may begin."""
        return not self.active and not self.pending and not self.replies and not self.fetches \
            and not (self.joins is not None and self.joins.busy)

    def _poll_replies(self) -> bool:
        """Workers whose replies are all out get the receives of their next exchange posted."""
        done = [wid for wid, (reqs, _) in self.replies.items() if MPI.Request.Testall(reqs)]
        for wid in done:
            del self.replies[wid]
            if wid in self.active and self.peers[wid].posted is None:  # (a compressed one left them posted)
                self._post(wid)
        return bool(done)

    def _settle(self, wid: int, post: bool = True) -> None:
        """The worker sent again (or said DONE), so it has every reply of its last exchange:
        complete their sends (only the Test is missing) and free its receive buffer. LSGD: an
        upload the worker has finished sending may still be untaken here; take it first."""
        self.take_uploads(wid)
        if wid in self.replies:
            wait_all(self.replies.pop(wid)[0], self.timeout, f"worker {wid} to take its reply")
        elif post and self.peers[wid].posted is None:
            raise RuntimeError(f"worker {wid} started an exchange before its last one was answered")
        if post and self.peers[wid].posted is None:
            self._post(wid)

    def _poll_fetches(self) -> bool:
        before = len(self.fetches)
        self.fetches = [f for f in self.fetches if not MPI.Request.Testall(f[0])]
        return len(self.fetches) < before

    def _check_deadlines(self) -> None:
        """A worker silent beyond worker_timeout is dropped (never waited on forever)."""
        now = time.monotonic()
        limit = self.worker_timeout
        for ex in list(self.pending):
            if ex.kind in P.EXCHANGES and (ex.next_chunk < len(self.chunks) or ex.norms_req is not None) \
                    and now - ex.arrived > limit:
                self.drop(ex.wid, f"sent an exchange header but not its parameters within {limit:g} s")
        for wid, (_, since) in list(self.replies.items()):
            if now - since > limit:
                self.drop(wid, f"did not take its reply within {limit:g} s")
        for f in list(self.fetches):
            if now - f[3] > limit:
                self.drop(f[2], f"did not take the center within {limit:g} s")
        for wid in list(self.active):
            if now - self.peers[wid].last_seen > limit:
                self.drop(wid, f"sent nothing for {limit:g} s (comm.worker_timeout)")
        self.flushes.check_deadline(now)
