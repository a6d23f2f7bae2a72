"""Server side: the ranks that own the center variable, one contiguous shard each.

Each server serves exchanges in arrival order (no barrier between workers, a slow worker never
holds up the others), chunk by chunk as the parameters arrive, and buffers what the trajectory
file records. Server 0 is also the coordinator: every `flush_seconds` it tells the other servers
(TAG_CONTROL) to enter a collective flush of the trajectory file, and it evaluates the center.

As each chunk of a worker's parameters arrives, the server moves that chunk of the center and
turns the received chunk, in place, into the worker's new parameters (EASGD: both elastic moves
in two passes over data still in cache, hpcopt.optim.easgd.elastic_exchange_), and sends it back
from that same buffer. So the center is never locked by a reply in flight: a worker that is slow
to take its reply (descheduled, or dead: a dead receiver never takes a rendezvous message) holds
only its own receive buffer, never the other workers.

A worker started with the training on this server's node exchanges in place (hpcopt.comm.shared):
its `recv` buffer is its own parameter vector in a shared-memory window, nothing is received,
the same per-chunk update runs on it where it is, and a one-number answer replaces the replies.

Within one server, exchanges are applied atomically per chunk; across servers the shards of a
snapshot may have absorbed the same exchanges in a slightly different order — that is the
asynchrony of Algorithm 1, not an error. With `deterministic=True` every server serves the
workers in the same fixed round-robin order instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from mpi4py import MPI

from hpcopt.io import schema
from hpcopt.optim.easgd import elastic_exchange_
from hpcopt.optim.grawa import inverse_norm_weights, shard_segments
from hpcopt.optim.lsgd import group_leader, leader, pull_target

from . import protocol as P
from .wait import BUSY_CAP, IDLE_CAP, Backoff, PeerTimeout, wait_all


def _cancel(requests) -> bool:
    """Cancel requests that will never complete (a peer is gone); never waits. Returns False."""
    for req in requests:
        try:
            if req is not None and req != MPI.REQUEST_NULL:
                req.Cancel()
        except MPI.Exception:
            pass
    return False


# Receives posted ahead per exchange. Open MPI copies every matched large message during one
# progress call, so posting all chunks at once copies the whole vector first (evicting it from
# cache) before anything else happens; a small window interleaves copies, replies and updates
# chunk by chunk.
RECV_WINDOW = 2

# In-place exchanges (a worker on this node, hpcopt.comm.shared): chunks updated per pass of the
# serve loop, so one large exchange does not keep the others' messages waiting
SHARED_CHUNKS_PER_POLL = 4
_DONE = np.ones(1)


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
    leader: int = -1  # LSGD: the worker id whose parameters this exchange is pulled toward
    global_leader: int = -1  # two-level LSGD: the global leader, on exchanges with a global pull
    arrived: float = 0.0
    layer_norms: np.ndarray | None = None  # LGRAWA: the worker's per-layer gradient norms
    norms_req: object = None  # LGRAWA: their receive, until it completes
    started: bool = False  # LSGD: the verdict is out
    upload: np.ndarray | None = None  # LSGD: where the worker's parameters go, when it sends them
    leads: bool = False  # LSGD: the worker leads (its upload becomes what others are pulled toward)
    pulled: bool = False  # LSGD: the worker got a pull target


class CenterServer:
    def __init__(self, *, world: MPI.Comm, servers: MPI.Comm, workers: dict[int, tuple],
                 bounds: list[tuple[int, int]], center: np.ndarray, alpha: float, chunk: int,
                 timeout: float, center_every: int, worker_every: int, flush_seconds: float,
                 eval_seconds: float, writer, evaluator=None, deterministic: bool = False,
                 start: float, log=print, rule: str = "easgd", loss_decay: float = 0.0,
                 worker_timeout: float | None = None, membership=None, checkpoint_seconds: float = 0.0,
                 exchanges: int = 0, next_worker_id: int | None = None,
                 layers: list[tuple[int, int]] | None = None, lam_g: float = 0.0, global_every: int = 0,
                 group_size: int = 0, shared: dict[int, np.ndarray] | None = None, sync=lambda: None):
        """`workers` maps worker id -> (its rank in `world`, host[, pid]) for the workers started with
        the run; `center` is this server's shard (owned). `membership` (optional) handles joins,
        the status file and checkpoints (see hpcopt.elastic). `layers` (LGRAWA) are the flat
        slices [lo, hi) of the model's layers (hpcopt.optim.grawa.layer_bounds). Two-level LSGD
        (`global_every` > 0): the leader is the local one (workers grouped by host, or by
        worker id // `group_size`), and every `global_every`-th exchange of a worker adds a pull
        of strength `lam_g` toward the global leader. `shared` maps the world rank of a worker on
        this node to its parameters in a shared-memory window (hpcopt.comm.shared; `sync` is the
        window's memory barrier): exchanges with it happen in place (not LSGD)."""
        self.world, self.servers = world, servers
        self.leader = servers.rank == 0
        self.bounds = bounds
        self.lo, self.hi = bounds[servers.rank]
        self.center = center
        self.center_t = torch.from_numpy(center)
        if rule not in ("easgd", "mgrawa", "lgrawa", "lsgd"):
            raise ValueError(f"unknown center rule {rule!r}")
        if rule == "lgrawa" and not layers:
            raise ValueError("LGRAWA needs the model's layers")
        self.rule = rule
        self.grad_norms: dict[int, float] = {}  # MGRAWA: each worker's latest reported gradient norm
        # LGRAWA: each worker's latest per-layer gradient norms; the parts of layers in this shard
        self.layer_norms: dict[int, np.ndarray] = {}
        self.n_layers = len(layers or [])
        self.segments = shard_segments(layers, self.lo, self.hi) if layers else []
        self.layer_rows: list[np.ndarray] = []  # leader, LGRAWA: one row per exchange row
        self.loss_avg: dict[int, float] = {}  # LSGD: each worker's moving average of reported losses
        self.loss_decay = loss_decay
        self.lam_g, self.global_every, self.group_size = float(lam_g), int(global_every), int(group_size)
        self.alpha = float(alpha)
        self.timeout = timeout
        self.worker_timeout = worker_timeout or timeout
        self.center_every, self.worker_every = center_every, worker_every
        self.flush_seconds, self.eval_seconds = flush_seconds, eval_seconds
        self.checkpoint_seconds = checkpoint_seconds
        self.writer, self.evaluator = writer, evaluator
        self.deterministic = deterministic
        self.start, self.log = start, log
        self.membership = membership
        self.shared = shared if rule != "lsgd" else None
        self.sync = sync
        self.chunks = P.chunk_bounds(0, self.hi - self.lo, chunk)
        self.bytes_per_exchange = 2 * 4 * (bounds[-1][1]) + len(bounds) * P.HEADER_SIZE * 8 \
            + (len(bounds) * 8 * self.n_layers if rule == "lgrawa" else 0)

        self.peers: dict[int, Peer] = {}
        self.links: list[_Link] = []
        # MGRAWA/LGRAWA: each worker's parameters as of its last exchange served here;
        # LSGD: the parameters of the workers that led at their latest exchange (see _lsgd_start)
        self.latest: dict[int, torch.Tensor] = {}
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
        world_link = _Link(world, {})
        self.links.append(world_link)
        for wid, (rank, host, *pid) in sorted(workers.items()):
            self.add_worker(wid, world_link, rank, host, world_rank=rank, pid=pid[0] if pid else -1)
        self.stopping = False  # the run is ending: workers were told to leave
        self.left: dict[int, int] = {}  # how many workers left for each reason
        self.stop_flag = None  # set (e.g. by a signal handler) to end the run gracefully

        # records buffered until the next flush
        self.center_snaps: list[tuple[int, float, np.ndarray]] = [] if exchanges else [(0, 0.0, center.copy())]
        self.last_snap = exchanges
        self.worker_snaps: dict[tuple[int, int], tuple[tuple, np.ndarray]] = {}
        self.worker_order: list[tuple[int, int]] = []  # leader: arrival order of worker snapshots
        self.rows: list[tuple] = []  # leader: one per exchange
        self.events: list[np.ndarray] = []  # leader
        self.flush_seq = 0
        self.last_flush = time.monotonic()
        self.last_checkpoint = time.monotonic()
        self.last_eval = -np.inf
        self.last_eval_exchanges = -1
        self.rate_mark = (time.monotonic(), exchanges)
        self.rate = 0.0
        self.finished = False

        self._control = np.empty(P.CONTROL_SIZE, dtype=np.float64)
        self._control_req = None

    # ------------------------------------------------------------------ membership
    def now(self) -> float:
        return time.monotonic() - self.start

    def event(self, kind: str, wid: int = -1, step: int = -1, detail: str = "") -> None:
        if self.leader:
            peer = self.peers.get(wid)
            self.events.append(schema.event_row(self.now(), kind, wid, peer.world_rank if peer else -1,
                                                peer.host if peer else "", step, detail))

    def add_worker(self, wid: int, link: _Link, rank: int, host: str, world_rank: int = -1, pid: int = -1) -> Peer:
        """A new member (at start, on a join, on a resume): buffers, receives, bookkeeping."""
        shard = self.hi - self.lo
        in_place = bool(self.shared) and link.comm is self.world and rank in self.shared
        recv = self.shared[rank][self.lo:self.hi] if in_place else np.empty(shard, dtype=np.float32)
        peer = Peer(wid, link.comm, rank, host, recv, torch.from_numpy(recv), time.monotonic(),
                    joined=self.now(), world_rank=world_rank, pid=pid, shared=in_place)
        self.peers[wid] = peer
        link.members[rank] = wid
        if link.req is None:
            link.req = link.comm.Irecv(link.buf, source=MPI.ANY_SOURCE, tag=P.TAG_HEADER)
        if self.rule in ("mgrawa", "lgrawa"):
            self.latest[wid] = self.center_t.clone()
        self.active.add(wid)
        self.order.append(wid)
        self.next_worker_id = max(self.next_worker_id, wid + 1)
        self._post(wid)
        return peer

    def add_link(self, comm: MPI.Comm) -> _Link:
        link = _Link(comm, {})
        self.links.append(link)
        return link

    def _remove(self, wid: int, forget: bool = True) -> None:
        """Forget a worker that left or was dropped. MGRAWA's center and LSGD's leader forget it
        too (`forget`), except a worker that finished its epochs: its final parameters stay in
        the average and it may stay the leader, as in the synchronous algorithms' last round."""
        self.active.discard(wid)
        if wid in self.order:
            i = self.order.index(wid)
            self.order.remove(wid)
            if i < self.turn:
                self.turn -= 1
            self.turn = self.turn % len(self.order) if self.order else 0
        if forget:
            self.grad_norms.pop(wid, None)
            self.layer_norms.pop(wid, None)
            self.loss_avg.pop(wid, None)
            self.latest.pop(wid, None)

    def drop(self, wid: int, why: str) -> None:
        """A worker is gone without saying so (killed, node lost, silent): cancel what it owed,
        record a crash, go on (the chunks of a half-received exchange that were served stay
        applied, like the exchanges before them: the elastic moves are per chunk)."""
        if wid not in self.active:
            return
        peer = self.peers[wid]
        self.log(f"[{self.now():7.1f}s] dropping worker {wid} ({peer.host}): {why}")
        self.event("crash", wid, peer.step, why)
        _cancel(peer.posted or [])
        peer.posted = None
        _cancel(self.replies.pop(wid, ([], 0))[0])
        for ex in [e for e in self.pending if e.wid == wid]:
            _cancel(ex.requests + ex.replies + [ex.norms_req])
            self.pending.remove(ex)
        self.fetches = [f for f in self.fetches if f[2] != wid or _cancel(f[0])]  # cancel and forget its
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

    # ------------------------------------------------------------------ main loop
    def _post(self, wid: int) -> None:
        """Post the first receives of the worker's next exchange (its buffer is free). LSGD posts
        them only once it has told the worker to send its parameters."""
        if self.rule == "lsgd" or self.peers[wid].shared:
            self.peers[wid].posted = []
            return
        self.peers[wid].posted = [self._irecv(wid, c) for c in range(min(RECV_WINDOW, len(self.chunks)))]

    def _irecv(self, wid: int, chunk: int, into: np.ndarray | None = None):
        a, b = self.chunks[chunk]
        peer = self.peers[wid]
        return peer.comm.Irecv((peer.recv if into is None else into)[a:b], source=peer.rank, tag=P.TAG_PARAMS)

    def _report_in(self, ex: _Exchange) -> None:
        """MGRAWA/LSGD: take the worker's reported gradient norm and loss; LSGD picks the leader
        this exchange is pulled toward (fixed for all of its chunks)."""
        self.grad_norms[ex.wid] = float(ex.header[P.GRAD_NORM])
        if self.rule == "lgrawa":
            # a worker with no gradient yet (it left before its first tau steps) sends NaN: its
            # parameters do not count until it reports real norms
            norms = ex.layer_norms
            if np.isfinite(norms).all() and (norms >= 0).all():
                self.layer_norms[ex.wid] = norms
        if self.rule == "lsgd":
            decay, loss = self.loss_decay, float(ex.header[P.TRAIN_LOSS])
            previous = self.loss_avg.get(ex.wid)
            self.loss_avg[ex.wid] = loss if previous is None else decay * previous + (1 - decay) * loss
            if self.global_every:  # two-level: the local leader, and the global one when due
                groups = {w: self._group(w) for w in self.loss_avg}
                ex.leader = group_leader(self.loss_avg, groups, ex.wid)
                if int(ex.header[P.EXCHANGE_INDEX]) % self.global_every == 0:
                    ex.global_leader = leader(self.loss_avg)
            else:
                ex.leader = leader(self.loss_avg)

    def _lgrawa_center(self, a: int, b: int) -> None:
        """LGRAWA: like MGRAWA, but every layer (or the part of it in this chunk) is its own
        weighted average, with weights 1 / (the worker's latest gradient norm of that layer)."""
        ids = sorted(self.layer_norms)
        if not ids:  # nobody has reported norms yet: the center stays where it is
            return
        weights = inverse_norm_weights(torch.from_numpy(np.stack([self.layer_norms[w] for w in ids])))
        for layer, s_lo, s_hi in self.segments:
            lo, hi = max(a, s_lo), min(b, s_hi)
            if lo >= hi:
                continue
            part = self.center_t[lo:hi]
            part.zero_()
            for w, weight in zip(ids, weights[:, layer].tolist()):
                part.add_(self.latest[w][lo:hi], alpha=weight)

    def _norms_in(self, ex: _Exchange) -> bool:
        """LGRAWA: whether the exchange's per-layer norms have arrived (needed before its first reply)."""
        if ex.norms_req is not None and ex.norms_req.Test():
            ex.norms_req = None
        return ex.norms_req is None

    def _grawa_center(self, a: int, b: int) -> None:
        """MGRAWA (Dimlioglu & Choromanska 2024), asynchronous: the center's chunk becomes the
        average of the latest parameters of every worker that has exchanged so far, weighted by
        1 / (its latest gradient norm). Workers not heard from yet do not count."""
        ids = sorted(self.grad_norms)
        weights = inverse_norm_weights(torch.tensor([self.grad_norms[w] for w in ids], dtype=torch.float64))
        chunk = self.center_t[a:b]
        chunk.zero_()
        for w, weight in zip(ids, weights.tolist()):
            chunk.add_(self.latest[w][a:b], alpha=weight)

    def _poll_replies(self) -> bool:
        """Workers whose replies are all out get the receives of their next exchange posted."""
        done = [wid for wid, (reqs, _) in self.replies.items() if MPI.Request.Testall(reqs)]
        for wid in done:
            del self.replies[wid]
            if wid in self.active:
                self._post(wid)
        return bool(done)

    def _settle(self, wid: int, post: bool = True) -> None:
        """The worker sent again (or said DONE), so it has every reply of its last exchange:
        complete their sends (only the Test is missing) and free its receive buffer. LSGD: an
        upload the worker has finished sending may still be untaken here; take it first."""
        self._take_uploads(wid)
        if wid in self.replies:
            wait_all(self.replies.pop(wid)[0], self.timeout, f"worker {wid} to take its reply")
        elif post and self.peers[wid].posted is None:
            raise RuntimeError(f"worker {wid} started an exchange before its last one was answered")
        if post and self.peers[wid].posted is None:
            self._post(wid)

    def _take_uploads(self, wid: int | None = None) -> None:
        """LSGD: finish the started exchanges (of worker `wid`, or all), taking their uploads. A
        worker's upload sends may complete (buffered) before this server has received them, so
        the worker can go on, or say DONE, with its upload still in flight to this server."""
        for ex in [e for e in self.pending if e.started and wid in (None, e.wid)]:
            while ex in self.pending:
                if not self._lsgd_advance(ex):
                    wait_all([ex.requests[ex.next_chunk]], self.timeout, f"worker {ex.wid}'s parameters")

    def _poll_fetches(self) -> bool:
        before = len(self.fetches)
        self.fetches = [f for f in self.fetches if not MPI.Request.Testall(f[0])]
        return len(self.fetches) < before

    def serve(self) -> dict:
        """Serve until every worker has left; returns a summary (meaningful on the leader).
        Collective over the server communicator (flushes)."""
        if not self.leader:
            self._control_req = self.servers.Irecv(self._control, source=0, tag=P.TAG_CONTROL)
            self._control_deadline = time.monotonic() + self.flush_seconds + self.timeout
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
            if self.membership is not None:
                progress |= self.membership.poll(self)
            if self.leader:
                progress |= self._maybe_flush()
                progress |= self._report()
            else:
                progress |= self._poll_control()
            self._check_deadlines()
            if self.stop_flag and not self.stopping:
                self.request_stop(f"signal {getattr(self.stop_flag, 'received', '')}")
            if progress:
                backoff.reset()
            else:
                backoff.idle(BUSY_CAP if self.pending or self.fetches else IDLE_CAP)
        for link in self.links:  # nobody will send another header
            _cancel([link.req] if link.req is not None else [])
            link.req = None
        for peer in self.peers.values():
            _cancel(peer.posted or [])
            peer.posted = None
        return {"exchanges": self.exchanges, "wall_seconds": self.now(), "polls": loops,
                "cpu_seconds": time.process_time() - cpu0,
                "all_diverged": self.left.get(P.GAVE_UP, 0) > 0 and len(self.left) == 1}

    def _poll_headers(self) -> bool:
        progress = False
        status = MPI.Status()
        for link in self.links:
            while link.req is not None and link.req.Test(status):
                progress = True
                rank, header = status.Get_source(), link.buf.copy()
                link.req = link.comm.Irecv(link.buf, source=MPI.ANY_SOURCE, tag=P.TAG_HEADER)
                self._on_header(link, rank, header)
        return progress

    def _on_header(self, link: _Link, rank: int, header: np.ndarray) -> None:
        wid = link.members.get(rank)
        kind = header[P.KIND]
        if wid is None or wid not in self.active:
            # a worker dropped earlier (it was only slow): it got a DROPPED notice; ignore it
            if wid is None:
                self.log(f"ignoring a message from unknown rank {rank}")
            return
        peer = self.peers[wid]
        peer.last_seen = time.monotonic()
        peer.step = int(header[P.STEP])
        if kind == P.HEARTBEAT:
            return
        ex = _Exchange(wid, header, arrived=time.monotonic())
        if kind == P.EXCHANGE:
            if self.rule == "mgrawa" and not np.isfinite(header[P.GRAD_NORM]):
                raise RuntimeError(f"worker {wid} reported gradient norm {header[P.GRAD_NORM]}")
            if peer.posted is None:
                self._settle(wid)
            if self.rule == "lgrawa":  # protocol step 2: sent right after the header
                ex.layer_norms = np.empty(self.n_layers, dtype=np.float64)
                ex.norms_req = peer.comm.Irecv(ex.layer_norms, source=peer.rank, tag=P.TAG_LAYER_NORMS)
            ex.requests = peer.posted
            peer.posted = None
            k = int(header[P.EXCHANGE_INDEX])
            if self.rule != "lsgd" and self.worker_every and k % self.worker_every == 0:
                ex.snapshot = np.empty(self.hi - self.lo, dtype=np.float32)
        elif kind in (P.FETCH, P.RESET):
            if kind == P.RESET:
                self.event("diverged", wid, peer.step,
                           f"training loss {header[P.TRAIN_LOSS]:.4g}: reset to the center")
            if self.deterministic:  # a fetch is not a turn
                self._fetch(ex)
                return
        elif kind != P.DONE:
            raise RuntimeError(f"unknown message kind {kind} from worker {wid}")
        self.pending.append(ex)

    def _fetch(self, ex: _Exchange) -> None:
        """FETCH/RESET: send the worker the center as it is now (a copy, so updates may go on)."""
        peer = self.peers[ex.wid]
        snap = self.center.copy()
        reqs = [peer.comm.Isend(snap[a:b], dest=peer.rank, tag=P.TAG_REPLY) for a, b in self.chunks]
        self.fetches.append((reqs, snap, ex.wid, time.monotonic()))

    def _poll_exchanges(self) -> bool:
        if not self.pending:
            return False
        if self.deterministic:
            expected = self.order[self.turn] if self.order else None
            todo = [ex for ex in self.pending if ex.wid == expected][:1]
            todo += [ex for ex in self.pending if ex.header[P.KIND] != P.EXCHANGE and ex not in todo]
        else:
            todo = list(self.pending)
        progress = False
        for ex in todo:
            progress |= self._advance(ex)
        return progress

    def _advance(self, ex: _Exchange) -> bool:
        """Receive the chunks that have arrived and send each one's reply (the center chunk as it
        is now) once no other reply is in flight from that chunk. Returns whether anything happened."""
        kind = ex.header[P.KIND]
        if kind == P.DONE:
            self.pending.remove(ex)
            self._settle(ex.wid, post=False)
            reason = int(ex.header[P.REASON])
            self.left[reason] = self.left.get(reason, 0) + 1
            _cancel(self.peers[ex.wid].posted or [])
            self.peers[ex.wid].posted = None
            self._remove(ex.wid, forget=reason != P.FINISHED)
            self.event("leave", ex.wid, int(ex.header[P.STEP]), P.REASONS.get(reason, f"reason {reason}"))
            if reason != P.FINISHED:
                self.log(f"[{self.now():7.1f}s] worker {ex.wid} ({self.peers[ex.wid].host}) left: "
                         f"{P.REASONS.get(reason)}; {len(self.active)} remain")
            return True
        if kind in (P.FETCH, P.RESET):
            self.pending.remove(ex)
            self._fetch(ex)
            return True
        if self.rule == "lsgd":
            return self._lsgd_advance(ex)
        progress = False
        n = len(self.chunks)
        peer = self.peers[ex.wid]
        # serve each chunk as it arrives: update, reply, and receive one more (RECV_WINDOW ahead);
        # in place, the chunks are there: update a few per call
        budget = SHARED_CHUNKS_PER_POLL if peer.shared else n
        while budget and ex.next_chunk < n and self._norms_in(ex) and (peer.shared or ex.requests[ex.next_chunk].Test()):
            i = ex.next_chunk
            a, b = self.chunks[i]
            if i == 0 and peer.shared:
                self.sync()  # see what the worker's last local steps wrote
            if ex.snapshot is not None:  # the parameters the worker had at this exchange
                ex.snapshot[a:b] = peer.recv[a:b]
            if i + RECV_WINDOW < n and not peer.shared:
                ex.requests.append(self._irecv(ex.wid, i + RECV_WINDOW))
            if i == 0 and self.rule != "easgd":
                self._report_in(ex)
            self._serve_chunk(ex, a, b)
            if not peer.shared:
                ex.replies.append(peer.comm.Isend(peer.recv[a:b], dest=peer.rank, tag=P.TAG_REPLY))
            ex.next_chunk += 1
            budget -= 1
            progress = True
        if ex.next_chunk == n:
            if peer.shared:
                self.sync()  # the worker sees the update once it has the answer
                ex.replies = [peer.comm.Isend(_DONE, dest=peer.rank, tag=P.TAG_DONE_SHARED)]
            self.pending.remove(ex)
            self.replies[ex.wid] = (ex.replies, time.monotonic())
            self._finish_exchange(ex)
            if self.deterministic and self.order:  # the next exchange in that order may start
                self.turn = (self.turn + 1) % len(self.order)
        return progress

    def _serve_chunk(self, ex: _Exchange, a: int, b: int) -> None:
        """Move the center's chunk [a, b) and turn the worker's received chunk into its new
        parameters, x <- x - alpha (x - target), in place (it is the reply)."""
        x = self.peers[ex.wid].recv_t[a:b]
        if self.rule == "easgd":
            elastic_exchange_(self.center_t[a:b], x, self.alpha)
            return
        # the other rules: this worker's new parameters, norm and loss count from now on
        self.latest[ex.wid][a:b] = x
        if self.rule == "mgrawa":
            self._grawa_center(a, b)
        else:
            self._lgrawa_center(a, b)
        x.lerp_(self.center_t[a:b], self.alpha)

    # ------------------------------------------------------------------ LSGD
    def _lsgd_start(self, ex: _Exchange) -> None:
        """LSGD: only leaders' parameters travel. The server keeps the parameters of the workers
        that led at their own latest exchange (`latest`). At an exchange the worker's loss average
        is updated; if it is now the lowest (of its node, with two levels), the worker leads: it
        sends its parameters, which replace what it held, and is not pulled. Otherwise what it held
        is dropped (no longer a leader's) and it is pulled toward the best-loss worker whose
        parameters are held (of its node; and on global exchanges also toward the best overall).
        The verdict [send, rate, leader, global leader] tells the worker what follows: its
        parameters (send; also when a worker snapshot is due), and a target m with
        x <- x + rate (m - x), m = (lam x_L + lam_G x_G) / (lam + lam_G)."""
        ex.started = True
        self._report_in(ex)
        wid, held, peer = ex.wid, self.latest, self.peers[ex.wid]
        sample = bool(self.worker_every and int(ex.header[P.EXCHANGE_INDEX]) % self.worker_every == 0)
        local = [w for w in held if not self.global_every or self._group(w) == self._group(wid)]
        ex.leads = ex.leader == wid
        lead = wid if ex.leads else min((w for w in local if w != wid), key=lambda w: (self.loss_avg[w], w), default=-1)
        pulls = [] if ex.leads or lead < 0 else [(self.alpha, held[lead])]
        if ex.global_leader >= 0:
            if ex.global_leader == wid:
                ex.leads = True  # the global leader leads its node too
            else:
                glob = min((w for w in held if w != wid), key=lambda w: (self.loss_avg[w], w), default=-1)
                if glob >= 0:
                    pulls.append((self.lam_g, held[glob]))
                ex.global_leader = glob
        if not ex.leads:
            held.pop(wid, None)
        ex.leader = lead
        target, rate = pull_target(pulls)  # one target is a held buffer, never written again: sent as is
        send = ex.leads or sample
        verdict = np.array([float(send), rate, float(lead), float(ex.global_leader)], dtype=np.float64)
        ex.replies = [peer.comm.Isend(verdict, dest=peer.rank, tag=P.TAG_VERDICT)]
        if target is not None:
            ex.pulled = True
            t = target.numpy()
            ex.replies += [peer.comm.Isend(t[a:b], dest=peer.rank, tag=P.TAG_REPLY) for a, b in self.chunks]
        if send:
            # a leader's upload goes to a fresh buffer: the one it held may still be read by sends
            ex.upload = np.empty(self.hi - self.lo, dtype=np.float32) if ex.leads else peer.recv
            ex.requests = [self._irecv(wid, c, ex.upload) for c in range(min(RECV_WINDOW, len(self.chunks)))]
        else:
            ex.next_chunk = len(self.chunks)  # nothing to receive

    def _group(self, wid: int):
        return wid // self.group_size if self.group_size else self.peers[wid].host

    def _lsgd_advance(self, ex: _Exchange) -> bool:
        """Start the exchange (in its turn, in deterministic mode), then take the upload, if any."""
        n, progress = len(self.chunks), not ex.started
        if not ex.started:
            self._lsgd_start(ex)
        while ex.next_chunk < n and ex.requests[ex.next_chunk].Test():
            if ex.next_chunk + RECV_WINDOW < n:
                ex.requests.append(self._irecv(ex.wid, ex.next_chunk + RECV_WINDOW, ex.upload))
            ex.next_chunk += 1
            progress = True
        if ex.next_chunk == n:
            self.pending.remove(ex)
            if ex.leads:
                self.latest[ex.wid] = torch.from_numpy(ex.upload)
                self.center_t.copy_(self.latest[ex.wid])  # /center/params: the latest leader upload
            if ex.upload is not None and self.worker_every and int(ex.header[P.EXCHANGE_INDEX]) % self.worker_every == 0:
                ex.snapshot = ex.upload if ex.leads else ex.upload.copy()
            self._lsgd_done(ex)
        return progress

    def _lsgd_done(self, ex: _Exchange) -> None:
        self.replies[ex.wid] = (ex.replies, time.monotonic())
        self._finish_exchange(ex)
        if self.deterministic and self.order:
            self.turn = (self.turn + 1) % len(self.order)

    def _finish_exchange(self, ex: _Exchange) -> None:
        self.exchanges += 1
        h, t = ex.header, self.now()
        step, k = int(h[P.STEP]), int(h[P.EXCHANGE_INDEX])
        self.peers[ex.wid].exchanges += 1
        if self.leader:
            sent = self.bytes_per_exchange
            if self.rule == "lsgd":  # header, verdict, and the parameters that travelled (as seen here)
                sent = len(self.bounds) * 8 * (P.HEADER_SIZE + P.VERDICT_SIZE) \
                    + 4 * self.bounds[-1][1] * ((ex.upload is not None) + ex.pulled)
            self.rows.append((ex.wid, step, k, t, h[P.TRAIN_LOSS], int(h[P.SAMPLES]), h[P.LR],
                              sent, h[P.GRAD_NORM], ex.leader, ex.global_leader))
            if self.rule == "lgrawa":
                self.layer_rows.append(ex.layer_norms)
        if self.exchanges % self.center_every == 0:
            self.center_snaps.append((self.exchanges, t, self.center.copy()))
            self.last_snap = self.exchanges
        if ex.snapshot is not None:
            self.worker_snaps[(ex.wid, k)] = ((ex.wid, step, k, t), ex.snapshot)
            if self.leader:
                self.worker_order.append((ex.wid, k))

    def _check_deadlines(self) -> None:
        """A worker silent beyond worker_timeout is dropped (never waited on forever)."""
        now = time.monotonic()
        limit = self.worker_timeout
        for ex in list(self.pending):
            if ex.header[P.KIND] == P.EXCHANGE and (ex.next_chunk < len(self.chunks) or ex.norms_req is not None) \
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
        if not self.leader and now > self._control_deadline:
            raise PeerTimeout(f"server 0 started no flush for {self.flush_seconds + self.timeout:g} s")

    # ------------------------------------------------------------------ flushes
    def _maybe_flush(self) -> bool:
        """Leader: start a collective flush when it is due, or the final one when all are done."""
        final = not self.active and not self.pending and not self.replies and not self.fetches \
            and not (self.membership is not None and self.membership.busy)
        now = time.monotonic()
        if not final and now - self.last_flush < self.flush_seconds:
            return False
        evaluate = self.evaluator is not None and (final or (
            not self.evaluator.busy and now - self.last_eval >= self.eval_seconds
            and self.exchanges > self.last_eval_exchanges))
        checkpoint = self.membership is not None and (final or now - self.last_checkpoint >= self.checkpoint_seconds)
        self.flush_seq += 1
        control = np.array([self.flush_seq, final, evaluate, checkpoint], dtype=np.float64)
        reqs = [self.servers.Isend(control, dest=s, tag=P.TAG_CONTROL) for s in range(1, self.servers.size)]
        wait_all(reqs, self.timeout, "the other server ranks to take a flush message")
        self._flush(final, evaluate, checkpoint)
        return True

    def _poll_control(self) -> bool:
        if not self._control_req.Test():
            return False
        _, final, evaluate, checkpoint = (float(v) for v in self._control)
        self._flush(bool(final), bool(evaluate), bool(checkpoint))
        if not self.finished:
            self._control_req = self.servers.Irecv(self._control, source=0, tag=P.TAG_CONTROL)
            self._control_deadline = time.monotonic() + self.flush_seconds + self.timeout
        return True

    def _flush(self, final: bool, evaluate: bool, checkpoint: bool = False) -> None:
        """Collective over the servers: write what every server has, evaluate, flush the file;
        then (when due) the checkpoint, which matches the file as flushed."""
        comm = self.servers
        if final:
            # every worker got its last reply before it said DONE, so all servers are complete,
            # except LSGD uploads still in flight to this server (server 0 saw every DONE; this
            # server may not have taken the last uploads yet): take them. The last center is
            # always recorded.
            self._take_uploads()
            if self.last_snap != self.exchanges:
                self.center_snaps.append((self.exchanges, self.now(), self.center.copy()))
                self.last_snap = self.exchanges
        m = comm.allreduce(len(self.center_snaps), op=MPI.MIN)
        snaps, self.center_snaps = self.center_snaps[:m], self.center_snaps[m:]
        center_meta = np.array([(n, t) for n, t, _ in snaps], dtype=schema.CENTER_META)

        keys = comm.bcast(self.worker_order if self.leader else None, root=0)
        have = np.array([k in self.worker_snaps for k in keys], dtype=np.int8)
        if keys:
            comm.Allreduce(MPI.IN_PLACE, have, op=MPI.MIN)
        complete = [k for k, h in zip(keys, have) if h]
        taken = [self.worker_snaps.pop(k) for k in complete]
        worker_meta = np.array([meta for meta, _ in taken], dtype=schema.WORKER_META)
        if self.leader:
            done = set(complete)
            self.worker_order = [k for k in self.worker_order if k not in done]

        if evaluate:
            self._evaluate(final)
        tables = None
        if self.leader:
            if final:
                self.event("end", detail=f"{self.exchanges} exchanges")
            tables = {"exchanges": self.rows, "evals": self.evaluator.take() if self.evaluator else [],
                      "events": self.events}
            if self.rule == "lgrawa":
                tables["layer_grad_norms"] = self.layer_rows
            self.rows, self.events, self.layer_rows = [], [], []
        attrs = {"exchanges_total": self.exchanges, "wall_seconds": self.now(),
                 "status": "complete" if final else "running"}
        self.writer.flush(center_rows=[s for _, _, s in snaps], center_meta=center_meta,
                          worker_rows=[s for _, s in taken], worker_meta=worker_meta,
                          tables=tables, attrs=attrs)
        self.last_flush = time.monotonic()
        if checkpoint:
            full = self._gather(self.center)
            # the leader's list: another server may have dropped a worker a moment earlier or later
            keys = self.servers.bcast(sorted(self.latest) if self.leader else None, root=0)
            latest = {w: self._gather(self.latest.get(w, self.center_t).numpy()) for w in keys}
            if self.leader:
                self.membership.checkpoint(self, full, latest, self.writer.sizes())
            self.last_checkpoint = time.monotonic()
        if self.leader and self.membership is not None:
            self.membership.write_status(self, "complete" if final else "stopping" if self.stopping else "running")
        if final:
            self.writer.close()
            self.finished = True

    def _gather(self, shard: np.ndarray) -> np.ndarray | None:
        """Collective: the full vector on the leader from every server's shard."""
        counts = [hi - lo for lo, hi in self.bounds]
        full = np.empty(self.bounds[-1][1], dtype=np.float32) if self.leader else None
        self.servers.Gatherv(shard, [full, counts, [lo for lo, _ in self.bounds], MPI.FLOAT]
                             if self.leader else None, root=0)
        return full

    def _evaluate(self, final: bool) -> None:
        """Collective: gather the center on the leader and hand it to the evaluator."""
        full = self._gather(self.center)
        if self.leader:
            self.last_eval, self.last_eval_exchanges = time.monotonic(), self.exchanges
            if final:
                self.evaluator.wait()
            self.evaluator.submit(full, self.exchanges, self.now())
            if final:
                self.evaluator.wait()
                self._report()

    def _report(self) -> bool:
        """Leader: a progress line for each finished evaluation."""
        if self.evaluator is None:
            return False
        lines = self.evaluator.new_results()
        for exchanges, t, loss, acc in lines:
            mark_t, mark_n = self.rate_mark
            now = time.monotonic()
            rate = (self.exchanges - mark_n) / max(now - mark_t, 1e-9)
            self.rate_mark = (now, self.exchanges)
            self.rate = rate
            self.log(f"[{t:7.1f}s] exchanges {exchanges:6d} ({rate:6.1f}/s)  workers {len(self.active)}  "
                     f"center test acc {100 * acc:5.2f}%  loss {loss:.4f}")
        return bool(lines)
