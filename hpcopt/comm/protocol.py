"""Wire protocol between workers and servers (all point-to-point on one communicator).

An exchange from a worker to each server rank s is:
  1. a header: HEADER_SIZE float64 (fields below), tag TAG_HEADER;
  2. LGRAWA only: the worker's per-layer gradient norms, one flat float64 array with one entry
     per parameter tensor of the model (FlatModel.layout() order), tag TAG_LAYER_NORMS; every
     server gets all of them and uses the layers that intersect its shard;
  3. the worker's parameters of shard s, float32, in chunks of at most `chunk` elements, tag
     TAG_PARAMS (MPI's non-overtaking rule keeps chunks in order);
and the server answers, chunk by chunk as they arrive, with the worker's new parameters of that
shard, x <- x - alpha (x - target), in the same chunks, tag TAG_REPLY; the worker receives them
straight into its parameter buffer (each chunk's receive is posted once its send is complete).
The target: EASGD the center as it was before this exchange, which the server moves by the
opposite amount; MGRAWA the weighted average of the workers' latest parameters, this one's
included; LGRAWA the same, weighted per layer.
LSGD differs, so that only the leaders' parameters travel: after the header the server sends a
verdict (VERDICT_SIZE float64, tag TAG_VERDICT): [send, rate, leader, global leader]. With send
= 1 (the worker leads, or a worker snapshot is due) the worker sends its parameters as in step 3;
with rate > 0 the server sends a pull target m (the held leader's parameters, or with two levels
hpcopt.optim.lsgd.pull_target of both) in the same chunks, tag TAG_REPLY, and the worker moves
x <- x + rate (m - x) itself, each chunk once its own send (if any) is complete.
Compressed (comm.compress, not LSGD, over messages only): a worker that has a reference r of its
parameters in common with the server (after a plain exchange, a FETCH or a RESET) may send
EXCHANGE_Q instead: step 3 carries, per chunk, the change x - r in the codec's format
(hpcopt.comm.codec; tag TAG_PARAMS_Q), and both sides add its decoded value to r (so r is the
server's view of x); the server applies the rule to r and answers, per chunk, the move the worker
must make, compressed with error feedback (tag TAG_REPLY_Q); both sides subtract its decoded value
from r, and the worker from x. Both decode the same bytes with the same code: r stays identical
on both sides, and what rounding loses stays in x - r and travels with the next exchange. A
plain EXCHANGE (a worker's first, or one sampled into /workers, exactly) sets r to the reply.
In place (hpcopt.comm.shared; not LSGD): a worker and a server on the same node, started in the
same job, share the worker's parameters through a shared-memory window. Steps 3 and the replies
are then replaced by the server updating that server's shard of the worker's parameters where
they are, then sending one float64 (tag TAG_DONE_SHARED); the worker waits for it and goes on.
Headers without parameters:
  DONE       the worker has stopped (REASON: finished its epochs, got a signal, diverged too often);
  FETCH      a new worker (a join) asks for the center; the server sends it in the same chunks
             (tag TAG_REPLY) without moving it, and the worker takes it as its parameters;
  RESET      the worker diverged (NaN/Inf or exploding loss): like FETCH, and recorded as an event;
  HEARTBEAT  the worker is alive but busy (a long stretch of local steps), so it is not dropped.
A server tells a worker to stop, or that it was dropped, with a NOTICE message (tag TAG_NOTICE).
Servers talk to each other only through TAG_CONTROL messages from server 0 that start a
collective flush of the trajectory file.

A worker is a (communicator, rank) pair on the server: workers started with the training are on
MPI.COMM_WORLD; workers that joined later are on the intercommunicator of their join.
"""

from __future__ import annotations

import numpy as np

# bumped on any change of the messages below; a joiner of another version is refused
PROTOCOL_VERSION = 4  # 3: joins answer a challenge over the intercommunicator; 4: EXCHANGE_Q

TAG_HEADER = 11
TAG_PARAMS = 12
TAG_REPLY = 13
TAG_CONTROL = 14
TAG_NOTICE = 15
TAG_LAYER_NORMS = 16
TAG_VERDICT = 17
TAG_DONE_SHARED = 18
TAG_CONTROL_ACK = 19  # a server took server 0's flush message: it is alive
TAG_JOIN_PROOF = 20  # a join's challenge (server -> joiner rank 0) and its answer
TAG_PARAMS_Q = 21  # a compressed change of a worker's parameters, per chunk
TAG_REPLY_Q = 22  # the compressed move back, per chunk

# header kinds
EXCHANGE = 1.0
DONE = 2.0
FETCH = 3.0
RESET = 4.0
HEARTBEAT = 5.0
EXCHANGE_Q = 6.0  # an exchange whose parameters travel as a compressed change (comm.compress)

# why a worker sent DONE (header field REASON)
FINISHED, SIGNALLED, GAVE_UP, STOPPED = 0, 1, 2, 3
REASONS = {FINISHED: "finished its epochs", SIGNALLED: "left on a signal", GAVE_UP: "diverged too often",
           STOPPED: "stopped by the server"}

# notices from a server to a worker: [kind]
STOP = 1.0  # the run is ending: make a last exchange and leave
DROPPED = 2.0  # the server gave up on this worker (silent beyond comm.worker_timeout)
NOTICE_SIZE = 1

# header fields (float64 holds integers exactly up to 2**53)
KIND, WORKER_ID, STEP, EXCHANGE_INDEX, TRAIN_LOSS, SAMPLES, LR, TIME, GRAD_NORM, REASON = range(10)
HEADER_SIZE = 10

# LSGD: the server's answer to an exchange header, [send parameters?, pull rate, leader, global leader]
VERDICT_SIZE = 4

# control message fields: [sequence number, final?, evaluate?, checkpoint?]
CONTROL_SIZE = 4


def make_header(kind: float, worker_id: int, step: int = 0, exchange_index: int = 0,
                train_loss: float = float("nan"), samples: int = 0, lr: float = 0.0,
                time: float = 0.0, grad_norm: float = float("nan"), reason: int = 0) -> np.ndarray:
    h = np.empty(HEADER_SIZE, dtype=np.float64)
    h[:] = (kind, worker_id, step, exchange_index, train_loss, samples, lr, time, grad_norm, reason)
    return h


KINDS = (EXCHANGE, DONE, FETCH, RESET, HEARTBEAT, EXCHANGE_Q)
EXCHANGES = (EXCHANGE, EXCHANGE_Q)


def header_problem(h: np.ndarray) -> str | None:
    """What is wrong with a header that arrived, or None: a server checks every one before it
    trusts it (a bad one costs its sender, never the run)."""
    if h[KIND] not in KINDS:
        return f"unknown message kind {float(h[KIND])!r}"
    for name, i in (("step", STEP), ("exchange index", EXCHANGE_INDEX), ("samples", SAMPLES)):
        if not (np.isfinite(h[i]) and h[i] >= 0 and h[i] == int(h[i]) and h[i] < 2 ** 53):
            return f"{name} {float(h[i])!r} is not a count"
    if h[KIND] == DONE and h[REASON] not in REASONS:
        return f"unknown reason {float(h[REASON])!r}"
    return None


def shard_bounds(n_params: int, n_servers: int) -> list[tuple[int, int]]:
    """Contiguous slices [lo, hi) of the flat parameter vector, one per server.

    Every shard but the last has ceil(P / S) elements, so HDF5 chunks of that width line up
    with shards and each server writes whole chunks of its own."""
    if n_servers < 1:
        raise ValueError("need at least one server")
    width = -(-n_params // n_servers)
    bounds = []
    for s in range(n_servers):
        lo = min(s * width, n_params)
        bounds.append((lo, min(lo + width, n_params)))
    if any(hi - lo == 0 for lo, hi in bounds):
        raise ValueError(f"{n_params} parameters cannot be split over {n_servers} servers "
                         f"(some shards would be empty); use fewer servers")
    return bounds


def chunk_bounds(lo: int, hi: int, chunk: int) -> list[tuple[int, int]]:
    """Split [lo, hi) into pieces of at most `chunk` elements (at least one piece)."""
    chunk = max(1, int(chunk))
    return [(a, min(a + chunk, hi)) for a in range(lo, hi, chunk)] or [(lo, hi)]
