"""MPI for the analysis: broadcasts, sums and the dynamic work queue, every wait with a deadline.

`comm=None` means one process: every function then runs locally with no communication, so the
same analysis code runs under `mpirun -n N` and as a plain command.

The work queue (`run_queue`) hands grid points out in chunks: rank 0 owns the queue and also
computes points itself, answering requests between two of its points; every other rank asks for
its next chunk as soon as it starts on the current one (one request in flight), so its answer is
there when it needs it even though rank 0 only answers between points. Results travel back with
the next request. Chunks shrink as the queue empties (guided scheduling), so all ranks finish
within about one point of each other.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import numpy as np

from hpcopt.comm.wait import Backoff, PeerTimeout, wait_all, wait_for  # noqa: F401 (PeerTimeout: callers catch it)

TAG_REQUEST, TAG_WORK, TAG_BCAST = 7101, 7102, 7103
CAP = 2e-3  # a rank waiting here has nothing else to do: sleep up to 2 ms between tests


def recv_obj(comm, source: int, tag: int, timeout: float, what: str):
    """Receive one pickled object, or raise PeerTimeout after `timeout` seconds."""
    from mpi4py import MPI

    status = MPI.Status()
    wait_for(lambda: comm.iprobe(source=source, tag=tag, status=status), timeout,
             f"{what} (rank {comm.rank})", cap=CAP)
    return comm.recv(source=status.Get_source(), tag=tag)


def wait_requests(requests: list, timeout: float, what: str) -> None:
    wait_all(requests, timeout, what, cap=CAP)


def bcast(comm, obj, timeout: float, what: str, root: int = 0):
    """Broadcast a picklable object from root (point-to-point, with a deadline)."""
    if comm is None or comm.size == 1:
        return obj
    if comm.rank == root:
        reqs = [comm.isend(obj, dest=r, tag=TAG_BCAST) for r in range(comm.size) if r != root]
        wait_requests(reqs, timeout, f"ranks to receive {what}")
        return obj
    return recv_obj(comm, root, TAG_BCAST, timeout, what)


def allreduce_sum(comm, x: np.ndarray, timeout: float, what: str = "a sum over ranks") -> np.ndarray:
    """Sum a float array over all ranks (Iallreduce, with a deadline)."""
    if comm is None or comm.size == 1:
        return x
    from mpi4py import MPI

    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    wait_requests([comm.Iallreduce(x, out, op=MPI.SUM)], timeout, what)
    return out


def barrier(comm, timeout: float, what: str = "the other ranks") -> None:
    if comm is not None and comm.size > 1:
        wait_requests([comm.Ibarrier()], timeout, what)


def run_queue(comm, todo: list[int], compute: Callable[[int], tuple], *, timeout: float,
              on_results: Callable[[list], None] | None = None, stop: Callable[[], bool] | None = None,
              max_chunk: int = 8) -> int:
    """Collective over comm: compute(i) for every index in `todo` (given on rank 0; ignored
    elsewhere), spread over the ranks by a dynamic queue. Rank 0 receives every result and
    passes lists of (index, values) to on_results as they arrive. `stop()` (rank 0) is asked
    between points; once true no new work is handed out and the ranks finish what they hold.
    Returns the number of points this rank computed."""
    if comm is None or comm.size == 1:
        done = 0
        for i in todo:
            if stop is not None and stop():
                break
            on_results and on_results([(i, compute(i))])
            done += 1
        return done
    if comm.rank == 0:
        return _lead(comm, deque(todo), compute, timeout, on_results, stop, max_chunk)
    return _follow(comm, compute, timeout)


def _lead(comm, pending: deque, compute, timeout, on_results, stop, max_chunk) -> int:
    from mpi4py import MPI

    others = set(range(1, comm.size))
    finished: set[int] = set()
    sends: list = []
    status = MPI.Status()
    computed = 0
    heard = time.monotonic()
    backoff = Backoff(cap=CAP)
    stopped = False

    def take() -> list[int]:
        nonlocal stopped
        if not stopped and stop is not None and stop():
            stopped = True
        if stopped or not pending:
            return []
        n = max(1, min(max_chunk, len(pending) // (2 * comm.size)))
        return [pending.popleft() for _ in range(min(n, len(pending)))]

    while True:
        while comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_REQUEST, status=status):
            src = status.Get_source()
            results, want_more = comm.recv(source=src, tag=TAG_REQUEST)
            heard = time.monotonic()
            backoff.reset()
            if results and on_results:
                on_results(results)
            if want_more:
                sends.append(comm.isend(take(), dest=src, tag=TAG_WORK))
            else:
                finished.add(src)
        sends = [r for r in sends if not r.Test()]
        if not stopped and stop is not None and stop():
            stopped = True
        if pending and not stopped:  # rank 0 computes one point per turn, then answers again
            i = pending.popleft()
            values = compute(i)
            computed += 1
            if on_results:
                on_results([(i, values)])
            heard = time.monotonic()
            continue
        if finished == others:
            break
        if time.monotonic() - heard > timeout:
            raise PeerTimeout(f"rank 0: no message within {timeout:g} s from rank(s) "
                              f"{sorted(others - finished)} while they held grid points")
        backoff.idle()
    wait_requests(sends, timeout, "the last work replies to be received")
    return computed


def _follow(comm, compute, timeout) -> int:
    held: deque = deque()
    results: list = []
    sends: list = []
    computed = 0

    def ask(want_more: bool):
        nonlocal results
        sends.append(comm.isend((results, want_more), dest=0, tag=TAG_REQUEST))
        results = []

    ask(True)
    asked = True
    exhausted = False
    while True:
        if asked and not held:  # nothing to do until the reply comes
            chunk = recv_obj(comm, 0, TAG_WORK, timeout, "grid points from rank 0")
            asked = False
            held.extend(chunk)
            exhausted = not chunk
        elif asked and comm.iprobe(source=0, tag=TAG_WORK):
            chunk = comm.recv(source=0, tag=TAG_WORK)
            asked = False
            held.extend(chunk)
            exhausted = exhausted or not chunk
        if held:
            if not asked and not exhausted:
                ask(True)  # prefetch: the answer arrives while this point computes
                asked = True
            i = held.popleft()
            results.append((i, compute(i)))
            computed += 1
            continue
        if exhausted and not asked:
            ask(False)
            break
    wait_requests(sends, timeout, "rank 0 to receive results")
    return computed
