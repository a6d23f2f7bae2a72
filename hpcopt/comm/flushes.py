"""When the servers flush, together: server 0 decides (every record.flush_seconds, and once at the
end) and tells the other servers with a TAG_CONTROL message, which each acknowledges; then all of
them enter the recorder's collective flush, and the checkpoint when one is due.

A dead server is never waited on in a collective: server 0 waits for the acknowledgements at most
comm.worker_timeout, and a server that hears nothing from server 0 for flush_seconds +
comm.worker_timeout gives up; either ends the whole job (the checkpoint stays as it was)."""

from __future__ import annotations

import time

import numpy as np

from hpcopt.launch.env import watchdog

from . import protocol as P
from .wait import PeerTimeout, wait_all


class Flushes:
    def __init__(self, server):
        self.server, self.servers = server, server.servers
        self.seq = 0
        self._control = np.empty(P.CONTROL_SIZE, dtype=np.float64)
        self._acks = np.empty((max(self.servers.size - 1, 0), P.CONTROL_SIZE), dtype=np.float64)
        self._req = None
        self._deadline, self._window_then = float("inf"), 0.0

    def _window(self) -> float:
        return self.server.recorder.cfg.flush_seconds + self._patience()

    def _patience(self) -> float:
        """How long a silent server is taken for alive: comm.worker_timeout, but comm.timeout
        while joins are being accepted here (every server accepts each join): an accept in
        progress can hold a server's MPI calls for seconds (seen: 15 s, three concurrent joins
        on 2 cores), and taking it for dead would end the whole run."""
        joins = self.server.joins
        joining = joins is not None and (joins.busy or not joins.queue.empty())
        return max(self.server.worker_timeout, self.server.timeout) if joining else self.server.worker_timeout

    def begin(self) -> None:
        if self.servers.rank != 0:
            self._listen()

    def _listen(self) -> None:
        self._req = self.servers.Irecv(self._control, source=0, tag=P.TAG_CONTROL)
        self._window_then = self._window()
        self._deadline = time.monotonic() + self._window_then

    def poll(self) -> bool:
        """Server 0: start a flush when one is due; the others: enter one when told."""
        return self._maybe_start() if self.servers.rank == 0 else self._poll_control()

    def check_deadline(self, now: float) -> None:
        # (the window as it is now: a join that began since the last flush lengthens it)
        if self.servers.rank != 0 and now > self._deadline - self._window_then + self._window():
            raise PeerTimeout(f"server 0 started no flush for {self._window():g} s")

    def _maybe_start(self) -> bool:
        s, rec = self.server, self.server.recorder
        final = s.all_done()
        if not final and not rec.flush_due():
            return False
        evaluate = rec.evaluator is not None and (final or rec.eval_due(s.exchanges))
        checkpoint = rec.run is not None and (final or rec.checkpoint_due())
        self.seq += 1
        control = np.array([self.seq, final, evaluate, checkpoint], dtype=np.float64)
        acks = [self.servers.Irecv(self._acks[r - 1], source=r, tag=P.TAG_CONTROL_ACK) for r in range(1, self.servers.size)]
        reqs = [self.servers.Isend(control, dest=r, tag=P.TAG_CONTROL) for r in range(1, self.servers.size)]
        # a dead server would hang the collective flush: it must answer first
        wait_all(reqs + acks, self._patience(), "the other servers to acknowledge a flush (a server is dead?)")
        self.flush(final, evaluate, checkpoint)
        return True

    def _poll_control(self) -> bool:
        if not self._req.Test():
            return False
        _, final, evaluate, checkpoint = (float(v) for v in self._control)
        wait_all([self.servers.Isend(self._control, dest=0, tag=P.TAG_CONTROL_ACK)], self.server.worker_timeout,
                 "server 0 to take this server's acknowledgement")
        self.flush(bool(final), bool(evaluate), bool(checkpoint))
        if not self.server.finished:
            self._listen()
        return True

    def flush(self, final: bool, evaluate: bool, checkpoint: bool) -> None:
        """Collective over the servers, so a server that dies inside it would leave the others in
        MPI-IO forever (the final flush has no worker left to time out): past comm.timeout, the
        longest any worker waits for the servers anyway, a watchdog ends the job. The checkpoint
        stays as the last complete flush left it."""
        with watchdog(self.server.timeout + self.server.worker_timeout,
                      f"server {self.servers.rank}'s {'final ' if final else ''}flush",
                      "comm.timeout + comm.worker_timeout"):
            self._flush(final, evaluate, checkpoint)

    def _flush(self, final: bool, evaluate: bool, checkpoint: bool) -> None:
        """The recorder writes what every server has; then (when due) the checkpoint, which
        matches the file as flushed."""
        s, rec = self.server, self.server.recorder
        rec.report(s.exchanges, len(s.active))  # progress lines so far, with today's counts
        if final:
            # every worker got its last reply before it said DONE, so all servers are complete,
            # except LSGD uploads still in flight to this server (server 0 saw every DONE; this
            # server may not have taken the last uploads yet): take them
            s.take_uploads()
        # a run whose workers all finished is complete; one that some left on a signal or a stop
        # (they saved their state), that lost some to a crash, or that a resume did not start all
        # the checkpoint's workers in (s.departed: workers owed work) is stopped: --resume continues them
        state = ("stopped" if s.departed else "complete") if final else "stopping" if s.stopping else "running"
        rec.flush(final=final, evaluate=evaluate, exchanges=s.exchanges, exchanges_total=s.exchanges,
                  center=s.center, status=state if final else "running", active=len(s.active))
        if checkpoint:
            rec.checkpoint(center=s.center, held={w: t.numpy() for w, t in s.rule.held().items()},
                           workers=s.resumable(), exchanges=s.exchanges, next_worker_id=s.next_worker_id)
        rec.write_status(state, exchanges=s.exchanges, members=s.members())
        if final:
            rec.close()
            s.finished = True
