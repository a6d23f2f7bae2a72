"""Server side: the ranks that own the center variable, one contiguous shard each.

Each server serves exchanges in arrival order (no barrier between workers, a slow worker never
holds up the others), chunk by chunk as the parameters arrive, and buffers what the trajectory
file records. Server 0 is also the coordinator: every `flush_seconds` it tells the other servers
(TAG_CONTROL) to enter a collective flush of the trajectory file, and it evaluates the center.

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

from . import protocol as P
from .wait import BUSY_CAP, IDLE_CAP, Backoff, PeerTimeout, wait_all


# Receives posted ahead per exchange. Open MPI copies every matched large message during one
# progress call, so posting all chunks at once copies the whole vector first (evicting it from
# cache) and only then computes; a small window interleaves copy and compute chunk by chunk, and
# the chunk is still in cache when the elastic update reads it.
RECV_WINDOW = 2


@dataclass
class _Exchange:
    """One worker's exchange (or DONE message) in progress on this server."""
    rank: int
    header: np.ndarray
    requests: list = field(default_factory=list)  # one receive per chunk
    buffer: int = 0  # which of the worker's two receive buffers
    next_chunk: int = 0  # next chunk to receive
    snapshot: np.ndarray | None = None  # copy of the received parameters, when sampled
    arrived: float = 0.0


class CenterServer:
    def __init__(self, *, world: MPI.Comm, servers: MPI.Comm, workers: dict[int, int],
                 bounds: list[tuple[int, int]], center: np.ndarray, alpha: float, chunk: int,
                 timeout: float, center_every: int, worker_every: int, flush_seconds: float,
                 eval_seconds: float, writer, evaluator=None, deterministic: bool = False,
                 start: float, hosts: dict[int, str], log=print):
        """`workers` maps world rank -> worker id; `center` is this server's shard (owned)."""
        self.world, self.servers = world, servers
        self.leader = servers.rank == 0
        self.workers = dict(workers)
        self.bounds = bounds
        self.lo, self.hi = bounds[servers.rank]
        self.center = center
        self.center_t = torch.from_numpy(center)
        self.alpha = float(alpha)
        self.timeout = timeout
        self.center_every, self.worker_every = center_every, worker_every
        self.flush_seconds, self.eval_seconds = flush_seconds, eval_seconds
        self.writer, self.evaluator = writer, evaluator
        self.deterministic = deterministic
        self.start, self.hosts, self.log = start, hosts, log
        self.chunks = P.chunk_bounds(0, self.hi - self.lo, chunk)
        self.bytes_per_exchange = 2 * 4 * (bounds[-1][1]) + len(bounds) * P.HEADER_SIZE * 8

        # Two receive buffers per worker: the reply to one exchange goes out of one (d is computed
        # in place) while the receives for the worker's next exchange are already posted into the
        # other, so its parameters flow as soon as it sends them, without waiting for the server
        # to notice the header first.
        shard = self.hi - self.lo
        self.recv = {r: (np.empty(shard, dtype=np.float32), np.empty(shard, dtype=np.float32))
                     for r in self.workers}
        self.recv_t = {r: tuple(torch.from_numpy(b) for b in bufs) for r, bufs in self.recv.items()}
        self.replies: dict[int, list] = {r: [[], []] for r in self.workers}
        self.next_buffer = {r: 0 for r in self.workers}
        self.posted: dict[int, list | None] = {r: None for r in self.workers}
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
        """Post the receives of `rank`'s next exchange into its free buffer."""
        i = self.next_buffer[rank]
        # the replies sent from this buffer two exchanges ago have arrived: the worker has sent again
        wait_all(self.replies[rank][i], self.timeout, f"worker rank {rank} to take its reply")
        self.replies[rank][i] = []
        self.posted[rank] = [self._irecv(rank, i, c) for c in range(min(RECV_WINDOW, len(self.chunks)))]

    def _irecv(self, rank: int, buffer: int, chunk: int):
        a, b = self.chunks[chunk]
        return self.world.Irecv(self.recv[rank][buffer][a:b], source=rank, tag=P.TAG_PARAMS)

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
        for rank, bufs in self.replies.items():
            self._unpost(rank)
            wait_all(bufs[0] + bufs[1], self.timeout, "workers to take their last replies")
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
            if header[P.KIND] == P.EXCHANGE:
                if self.posted[rank] is None:
                    raise RuntimeError(f"worker rank {rank} started an exchange before its last one ended")
                ex.requests, ex.buffer = self.posted[rank], self.next_buffer[rank]
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
        """Apply the elastic update to every chunk that has arrived; finish the exchange when
        all have. Returns whether anything happened."""
        progress = False
        kind = ex.header[P.KIND]
        if kind == P.EXCHANGE:
            buf, buf_t = self.recv[ex.rank][ex.buffer], self.recv_t[ex.rank][ex.buffer]
            while ex.next_chunk < len(self.chunks) and ex.requests[ex.next_chunk].Test():
                a, b = self.chunks[ex.next_chunk]
                if ex.snapshot is not None:
                    ex.snapshot[a:b] = buf[a:b]
                center_exchange_(buf_t[a:b], self.center_t[a:b], self.alpha)  # buf now holds x - center
                self.replies[ex.rank][ex.buffer].append(self.world.Isend(buf[a:b], dest=ex.rank, tag=P.TAG_REPLY))
                if ex.next_chunk + RECV_WINDOW < len(self.chunks):
                    ex.requests.append(self._irecv(ex.rank, ex.buffer, ex.next_chunk + RECV_WINDOW))
                ex.next_chunk += 1
                progress = True
            if ex.next_chunk < len(self.chunks):
                return progress
            self._finish_exchange(ex)
            self.next_buffer[ex.rank] ^= 1
            self._post(ex.rank)
        elif kind == P.DONE:
            self.active.discard(ex.rank)
            self.event("leave", ex.rank, int(ex.header[P.STEP]), "finished its epochs")
            if self.deterministic:
                self.order.remove(ex.rank)
                self.turn = self.turn % len(self.order) if self.order else 0
        else:
            raise RuntimeError(f"unknown message kind {kind} from rank {ex.rank}")
        self.pending.remove(ex)
        if self.deterministic and kind == P.EXCHANGE:
            self.turn = (self.turn + 1) % len(self.order)
        return True

    def _finish_exchange(self, ex: _Exchange) -> None:
        self.exchanges += 1
        h, t = ex.header, self.now()
        worker_id, step, k = self.workers[ex.rank], int(h[P.STEP]), int(h[P.EXCHANGE_INDEX])
        if self.leader:
            self.rows.append((worker_id, step, k, t, h[P.TRAIN_LOSS], int(h[P.SAMPLES]), h[P.LR],
                              self.bytes_per_exchange))
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
        for rank in self.active:
            if now - self.last_seen[rank] > self.timeout:
                raise PeerTimeout(f"worker {self.workers[rank]} (rank {rank}) sent nothing for "
                                  f"{self.timeout:g} s (comm.timeout)")
        if not self.leader and now > self._control_deadline:
            raise PeerTimeout(f"server 0 started no flush for {self.flush_seconds + self.timeout:g} s")

    # ------------------------------------------------------------------ flushes
    def _maybe_flush(self) -> bool:
        """Leader: start a collective flush when it is due, or the final one when all are done."""
        final = not self.active and not self.pending
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
