"""Server side: the ranks that own the center variable, one contiguous shard each.

Each server serves exchanges in arrival order (no barrier between workers, a slow worker never
holds up the others), chunk by chunk as the parameters arrive, and buffers what the trajectory
file records. Server 0 is also the coordinator: every `flush_seconds` it tells the other servers
(TAG_CONTROL) to enter a collective flush of the trajectory file, and it evaluates the center.

The reply to a chunk of parameters is the center's chunk itself, sent straight from the center
array (no copy); the server moves that chunk toward the worker only once the reply has left, and
holds any other exchange on the same chunk until then, so each exchange sees and moves one
consistent value per chunk and the elastic forces stay exactly equal and opposite.

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
from hpcopt.optim.easgd import center_exchange_
from hpcopt.optim.grawa import inverse_norm_weights
from hpcopt.optim.lsgd import leader

from . import protocol as P
from .wait import BUSY_CAP, IDLE_CAP, Backoff, PeerTimeout, wait_all


# Receives posted ahead per exchange. Open MPI copies every matched large message during one
# progress call, so posting all chunks at once copies the whole vector first (evicting it from
# cache) before anything else happens; a small window interleaves copies, replies and updates
# chunk by chunk.
RECV_WINDOW = 2


@dataclass
class _Exchange:
    """One worker's exchange (or DONE message) in progress on this server."""
    rank: int
    header: np.ndarray
    requests: list = field(default_factory=list)  # one receive per chunk
    next_chunk: int = 0  # next chunk to receive
    next_reply: int = 0  # next chunk whose reply (the old center chunk) is to be sent
    applied: int = 0  # chunks whose center update is done
    snapshot: np.ndarray | None = None  # copy of the received parameters, when sampled
    leader: int = -1  # LSGD: the rank whose parameters this exchange is pulled toward
    arrived: float = 0.0


class CenterServer:
    def __init__(self, *, world: MPI.Comm, servers: MPI.Comm, workers: dict[int, int],
                 bounds: list[tuple[int, int]], center: np.ndarray, alpha: float, chunk: int,
                 timeout: float, center_every: int, worker_every: int, flush_seconds: float,
                 eval_seconds: float, writer, evaluator=None, deterministic: bool = False,
                 start: float, hosts: dict[int, str], log=print, rule: str = "easgd",
                 loss_decay: float = 0.0):
        """`workers` maps world rank -> worker id; `center` is this server's shard (owned)."""
        self.world, self.servers = world, servers
        self.leader = servers.rank == 0
        self.workers = dict(workers)
        self.bounds = bounds
        self.lo, self.hi = bounds[servers.rank]
        self.center = center
        self.center_t = torch.from_numpy(center)
        if rule not in ("easgd", "mgrawa", "lsgd"):
            raise ValueError(f"unknown center rule {rule!r}")
        self.rule = rule
        self.grad_norms: dict[int, float] = {}  # MGRAWA: each worker's latest reported gradient norm
        self.loss_avg: dict[int, float] = {}  # LSGD: each worker's moving average of reported losses
        self.loss_decay = loss_decay
        self.alpha = float(alpha)
        self.timeout = timeout
        self.center_every, self.worker_every = center_every, worker_every
        self.flush_seconds, self.eval_seconds = flush_seconds, eval_seconds
        self.writer, self.evaluator = writer, evaluator
        self.deterministic = deterministic
        self.start, self.hosts, self.log = start, hosts, log
        self.chunks = P.chunk_bounds(0, self.hi - self.lo, chunk)
        self.bytes_per_exchange = 2 * 4 * (bounds[-1][1]) + len(bounds) * P.HEADER_SIZE * 8

        # One receive buffer per worker. The receives of a worker's next exchange are posted as
        # soon as its last one is done, so its parameters flow the moment it sends them, without
        # waiting for the server to notice the header first.
        shard = self.hi - self.lo
        self.recv = {r: np.empty(shard, dtype=np.float32) for r in self.workers}
        # MGRAWA, LSGD: each worker's parameters as of its last exchange served here, chunk by chunk
        self.latest = {r: torch.from_numpy(center.copy()) for r in self.workers} if rule != "easgd" else {}
        self.recv_t = {r: torch.from_numpy(b) for r, b in self.recv.items()}
        self.posted: dict[int, list | None] = {r: None for r in self.workers}
        # per center chunk: the reply in flight from it (request, exchange, since) or None
        self.locks: list[tuple | None] = [None] * len(self.chunks)
        self.inflight: dict[int, _Exchange] = {}  # rank -> its exchange until fully applied
        self.active = set(self.workers)
        self.order = sorted(self.workers)  # round-robin order in deterministic mode
        self.turn = 0
        self.pending: list[_Exchange] = []
        self.last_seen = {r: time.monotonic() for r in self.workers}
        self.exchanges = 0

        # records buffered until the next flush
        self.center_snaps: list[tuple[int, float, np.ndarray]] = [(0, 0.0, center.copy())]
        self.last_snap = 0
        self.worker_snaps: dict[tuple[int, int], tuple[tuple, np.ndarray]] = {}
        self.worker_order: list[tuple[int, int]] = []  # leader: arrival order of worker snapshots
        self.rows: list[tuple] = []  # leader: one per exchange
        self.events: list[np.ndarray] = []  # leader
        self.flush_seq = 0
        self.last_flush = time.monotonic()
        self.last_eval = -np.inf
        self.last_eval_exchanges = -1
        self.rate_mark = (time.monotonic(), 0)
        self.finished = False

        self._header = np.empty(P.HEADER_SIZE, dtype=np.float64)
        self._control = np.empty(P.CONTROL_SIZE, dtype=np.float64)
        self._header_req = None
        self._control_req = None

    # ------------------------------------------------------------------ helpers
    def now(self) -> float:
        return time.monotonic() - self.start

    def event(self, kind: str, rank: int = -1, step: int = -1, detail: str = "") -> None:
        if self.leader:
            self.events.append(schema.event_row(self.now(), kind, self.workers.get(rank, -1), rank,
                                                self.hosts.get(rank, ""), step, detail))

    # ------------------------------------------------------------------ main loop
    def _post(self, rank: int) -> None:
        """Post the first receives of `rank`'s next exchange (its buffer is free)."""
        self.posted[rank] = [self._irecv(rank, c) for c in range(min(RECV_WINDOW, len(self.chunks)))]

    def _irecv(self, rank: int, chunk: int):
        a, b = self.chunks[chunk]
        return self.world.Irecv(self.recv[rank][a:b], source=rank, tag=P.TAG_PARAMS)

    def _report_in(self, ex: _Exchange) -> None:
        """MGRAWA/LSGD: take the worker's reported gradient norm and loss; LSGD picks the leader
        this exchange is pulled toward (fixed for all of its chunks)."""
        self.grad_norms[ex.rank] = float(ex.header[P.GRAD_NORM])
        if self.rule == "lsgd":
            decay, loss = self.loss_decay, float(ex.header[P.TRAIN_LOSS])
            previous = self.loss_avg.get(ex.rank)
            self.loss_avg[ex.rank] = loss if previous is None else decay * previous + (1 - decay) * loss
            ex.leader = leader(self.loss_avg)

    def _grawa_center(self, a: int, b: int) -> None:
        """MGRAWA (Dimlioglu & Choromanska 2024), asynchronous: the center's chunk becomes the
        average of the latest parameters of every worker that has exchanged so far, weighted by
        1 / (its latest gradient norm). Workers not heard from yet do not count."""
        ranks = sorted(self.grad_norms)
        weights = inverse_norm_weights(torch.tensor([self.grad_norms[r] for r in ranks], dtype=torch.float64))
        chunk = self.center_t[a:b]
        chunk.zero_()
        for r, w in zip(ranks, weights.tolist()):
            chunk.add_(self.latest[r][a:b], alpha=w)

    def _release(self, chunk: int) -> bool:
        """If the reply in flight from center chunk `chunk` has left, apply its exchange's update
        to that chunk and unlock it. Returns whether the chunk is free."""
        lock = self.locks[chunk]
        if lock is None:
            return True
        req, ex, _ = lock
        if not req.Test():
            return False
        a, b = self.chunks[chunk]
        if self.rule == "easgd":  # MGRAWA's center was set before the reply
            center_exchange_(self.center_t[a:b], self.recv_t[ex.rank][a:b], self.alpha)
        self.locks[chunk] = None
        ex.applied += 1
        if ex.applied == len(self.chunks):
            self._complete(ex)
        return True

    def _settle(self, rank: int) -> None:
        """The worker sent again, so it has every reply of its last exchange: finish applying
        that exchange now (its sends are complete at the worker; only the Test is missing)."""
        ex = self.inflight.get(rank)
        if ex is None or ex.next_reply < len(self.chunks):
            raise RuntimeError(f"worker rank {rank} started an exchange before its last one was answered")
        for i, lock in enumerate(self.locks):
            if lock is not None and lock[1] is ex:
                wait_all([lock[0]], self.timeout, f"worker rank {rank} to take its reply")
                self._release(i)
        if rank in self.inflight:
            raise RuntimeError(f"the last exchange of worker rank {rank} is incomplete")

    def _poll_locks(self) -> bool:
        """Apply the updates whose replies have left (finishing exchanges that are complete)."""
        progress = False
        for i, lock in enumerate(self.locks):
            if lock is not None and self._release(i):
                progress = True
        return progress

    def _unpost(self, rank: int) -> None:
        for req in self.posted[rank] or []:
            req.Cancel()
            req.Wait()
        self.posted[rank] = None

    def serve(self) -> dict:
        """Serve until every worker has finished; returns a summary (meaningful on the leader).
        Collective over the server communicator (flushes)."""
        self._header_req = self.world.Irecv(self._header, source=MPI.ANY_SOURCE, tag=P.TAG_HEADER)
        for rank in self.workers:
            self._post(rank)
        if not self.leader:
            self._control_req = self.servers.Irecv(self._control, source=0, tag=P.TAG_CONTROL)
            self._control_deadline = time.monotonic() + self.flush_seconds + self.timeout
        backoff = Backoff()
        cpu0, loops = time.process_time(), 0
        while not self.finished:
            loops += 1
            progress = self._poll_headers()
            progress |= self._poll_locks()
            progress |= self._poll_exchanges()
            if self.leader:
                progress |= self._maybe_flush()
                progress |= self._report()
            else:
                progress |= self._poll_control()
            self._check_deadlines()
            if progress:
                backoff.reset()
            else:
                backoff.idle(BUSY_CAP if self.pending else IDLE_CAP)
        if self._header_req is not None:  # nobody will send another header
            self._header_req.Cancel()
            self._header_req.Wait()
        for rank in self.workers:
            self._unpost(rank)
        return {"exchanges": self.exchanges, "wall_seconds": self.now(), "polls": loops,
                "cpu_seconds": time.process_time() - cpu0}

    def _poll_headers(self) -> bool:
        progress = False
        status = MPI.Status()
        while self._header_req.Test(status):
            progress = True
            rank, header = status.Get_source(), self._header.copy()
            self._header_req = self.world.Irecv(self._header, source=MPI.ANY_SOURCE, tag=P.TAG_HEADER)
            if rank not in self.active:
                raise RuntimeError(f"server got a message from rank {rank}, which is not an active worker")
            self.last_seen[rank] = time.monotonic()
            ex = _Exchange(rank, header, arrived=time.monotonic())
            if header[P.KIND] == P.EXCHANGE and self.rule == "mgrawa" and not np.isfinite(header[P.GRAD_NORM]):
                raise RuntimeError(f"worker rank {rank} reported gradient norm {header[P.GRAD_NORM]}")
            if header[P.KIND] == P.EXCHANGE:
                if self.posted[rank] is None:
                    self._settle(rank)
                ex.requests = self.posted[rank]
                self.inflight[rank] = ex
                self.posted[rank] = None
                k = int(header[P.EXCHANGE_INDEX])
                if self.worker_every and k % self.worker_every == 0:
                    ex.snapshot = np.empty(self.hi - self.lo, dtype=np.float32)
            else:
                self._unpost(rank)
            self.pending.append(ex)
        return progress

    def _poll_exchanges(self) -> bool:
        if not self.pending:
            return False
        if self.deterministic:
            expected = self.order[self.turn]
            todo = [ex for ex in self.pending if ex.rank == expected][:1]
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
            self.active.discard(ex.rank)
            self.event("leave", ex.rank, int(ex.header[P.STEP]), "finished its epochs")
            if self.deterministic:
                self.order.remove(ex.rank)
                self.turn = self.turn % len(self.order) if self.order else 0
            self.pending.remove(ex)
            return True
        if kind != P.EXCHANGE:
            raise RuntimeError(f"unknown message kind {kind} from rank {ex.rank}")
        progress = False
        n = len(self.chunks)
        while True:
            # reply to what is in before receiving more, so replies flow while chunks arrive
            if ex.next_reply < ex.next_chunk and self._release(ex.next_reply):
                i = ex.next_reply
                a, b = self.chunks[i]
                if self.rule != "easgd":  # this worker's new parameters, norm and loss count from now on
                    if i == 0:
                        self._report_in(ex)
                    self.latest[ex.rank][a:b] = self.recv_t[ex.rank][a:b]
                    if self.rule == "mgrawa":
                        self._grawa_center(a, b)
                    else:  # LSGD: the reply is the leader's parameters (the leader gets its own back)
                        self.center_t[a:b] = self.latest[ex.leader][a:b]
                self.locks[i] = (self.world.Isend(self.center[a:b], dest=ex.rank, tag=P.TAG_REPLY),
                                 ex, time.monotonic())
                ex.next_reply += 1
            elif ex.next_chunk < n and ex.requests[ex.next_chunk].Test():
                if ex.snapshot is not None:
                    a, b = self.chunks[ex.next_chunk]
                    ex.snapshot[a:b] = self.recv[ex.rank][a:b]
                if ex.next_chunk + RECV_WINDOW < n:
                    ex.requests.append(self._irecv(ex.rank, ex.next_chunk + RECV_WINDOW))
                ex.next_chunk += 1
            else:
                break
            progress = True
        if ex.next_reply == n and ex in self.pending:
            # every reply is out: the next exchange in deterministic order may start
            self.pending.remove(ex)
            if self.deterministic:
                self.turn = (self.turn + 1) % len(self.order)
        return progress

    def _complete(self, ex: _Exchange) -> None:
        """All of the exchange's chunk updates are applied."""
        self.inflight.pop(ex.rank, None)
        self._finish_exchange(ex)
        if ex.rank in self.active:
            self._post(ex.rank)

    def _finish_exchange(self, ex: _Exchange) -> None:
        self.exchanges += 1
        h, t = ex.header, self.now()
        worker_id, step, k = self.workers[ex.rank], int(h[P.STEP]), int(h[P.EXCHANGE_INDEX])
        if self.leader:
            self.rows.append((worker_id, step, k, t, h[P.TRAIN_LOSS], int(h[P.SAMPLES]), h[P.LR],
                              self.bytes_per_exchange, h[P.GRAD_NORM], self.workers.get(ex.leader, -1)))
        if self.exchanges % self.center_every == 0:
            self.center_snaps.append((self.exchanges, t, self.center.copy()))
            self.last_snap = self.exchanges
        if ex.snapshot is not None:
            self.worker_snaps[(worker_id, k)] = ((worker_id, step, k, t), ex.snapshot)
            if self.leader:
                self.worker_order.append((worker_id, k))

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for ex in self.pending:
            if ex.header[P.KIND] == P.EXCHANGE and ex.next_chunk < len(self.chunks) \
                    and now - ex.arrived > self.timeout:
                raise PeerTimeout(f"worker rank {ex.rank} sent an exchange header but not its "
                                  f"parameters within {self.timeout:g} s")
        for lock in self.locks:
            if lock is not None and now - lock[2] > self.timeout:
                raise PeerTimeout(f"worker rank {lock[1].rank} did not take its reply within {self.timeout:g} s")
        for rank in self.active:
            if now - self.last_seen[rank] > self.timeout:
                raise PeerTimeout(f"worker {self.workers[rank]} (rank {rank}) sent nothing for "
                                  f"{self.timeout:g} s (comm.timeout)")
        if not self.leader and now > self._control_deadline:
            raise PeerTimeout(f"server 0 started no flush for {self.flush_seconds + self.timeout:g} s")

    # ------------------------------------------------------------------ flushes
    def _maybe_flush(self) -> bool:
        """Leader: start a collective flush when it is due, or the final one when all are done."""
        final = not self.active and not self.pending and not any(self.locks)
        now = time.monotonic()
        if not final and now - self.last_flush < self.flush_seconds:
            return False
        evaluate = self.evaluator is not None and (final or (
            not self.evaluator.busy and now - self.last_eval >= self.eval_seconds
            and self.exchanges > self.last_eval_exchanges))
        self.flush_seq += 1
        control = np.array([self.flush_seq, final, evaluate], dtype=np.float64)
        reqs = [self.servers.Isend(control, dest=s, tag=P.TAG_CONTROL) for s in range(1, self.servers.size)]
        wait_all(reqs, self.timeout, "the other server ranks to take a flush message")
        self._flush(final, evaluate)
        return True

    def _poll_control(self) -> bool:
        if not self._control_req.Test():
            return False
        _, final, evaluate = (float(v) for v in self._control)
        self._flush(bool(final), bool(evaluate))
        if not self.finished:
            self._control_req = self.servers.Irecv(self._control, source=0, tag=P.TAG_CONTROL)
            self._control_deadline = time.monotonic() + self.flush_seconds + self.timeout
        return True

    def _flush(self, final: bool, evaluate: bool) -> None:
        """Collective over the servers: write what every server has, evaluate, flush the file."""
        comm = self.servers
        if final:
            # every worker got its last reply before it said DONE, so all servers are complete;
            # the last center is always recorded
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
            self.rows, self.events = [], []
        attrs = {"exchanges_total": self.exchanges, "wall_seconds": self.now(),
                 "status": "complete" if final else "running"}
        self.writer.flush(center_rows=[s for _, _, s in snaps], center_meta=center_meta,
                          worker_rows=[s for _, s in taken], worker_meta=worker_meta,
                          tables=tables, attrs=attrs)
        self.last_flush = time.monotonic()
        if final:
            self.writer.close()
            self.finished = True

    def _evaluate(self, final: bool) -> None:
        """Collective: gather the center on the leader and hand it to the evaluator."""
        counts = [hi - lo for lo, hi in self.bounds]
        full = np.empty(self.bounds[-1][1], dtype=np.float32) if self.leader else None
        self.servers.Gatherv(self.center, [full, counts, [lo for lo, _ in self.bounds], MPI.FLOAT]
                             if self.leader else None, root=0)
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
            self.log(f"[{t:7.1f}s] exchanges {exchanges:6d} ({rate:6.1f}/s)  workers {len(self.active)}/"
                     f"{len(self.workers)}  center test acc {100 * acc:5.2f}%  loss {loss:.4f}")
        return bool(lines)
