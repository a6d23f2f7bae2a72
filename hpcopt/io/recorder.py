"""Recording a run: what the trajectory file gets, buffered between collective flushes, the
center's evaluations, the servers' checkpoint and the live status file.

One Recorder serves the asynchronous servers (collective over the server communicator: every
server buffers snapshots of its own shard of the center and of the workers' parameters; server 0
also the tables) and the synchronous baselines (rank 0 alone, on MPI.COMM_SELF). Between two
flushes nothing touches the file, so records cost the training nothing but a copy; a flush
agrees, over the ranks, on which snapshots every rank has whole, and writes them in one
collective call (hpcopt.io.trajectory).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from hpcopt.config import RecordConfig
from hpcopt.io.rundir import RunDir, write_json

from ..failpoints import failpoint
from . import checkpoint as ckpt
from . import schema


SPREAD_BLOCK = 1 << 16  # elements per block of squared_distance: 256 KB of float32, 512 KB of float64


def squared_distance(a: np.ndarray, b: np.ndarray) -> float:
    """sum((a - b)**2) over two flat vectors, in float64, a block at a time: no temporary the
    size of the vectors (on a server's flush path, with a shard of 25M parameters, a float32
    difference and a float64 copy of it took 286 MiB and 0.056 s per worker; this, under 1 MiB and
    0.020 s of one core). The differences are float32, as (a - b) is; their squares are summed
    pairwise in float64 (np.dot would sum float32 with float32 accumulation, or in float64 call a
    BLAS that spreads a block over threads the other ranks need)."""
    n = a.size
    d32 = np.empty(min(n, SPREAD_BLOCK), dtype=np.result_type(a, b))
    d64 = np.empty(len(d32), dtype=np.float64)
    total = 0.0
    for lo in range(0, n, SPREAD_BLOCK):
        k = min(SPREAD_BLOCK, n - lo)
        np.subtract(a[lo:lo + k], b[lo:lo + k], out=d32[:k])
        d = d64[:k]
        d[:] = d32[:k]
        np.square(d, out=d)
        total += float(d.sum())
    return total


class RecordingError(RuntimeError):
    """The run's files cannot be written (a full disk, a failing file system): the run ends."""


def _cannot_write(path, error: Exception, run: RunDir | None) -> str:
    import shutil

    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        space = f"; {free / 2**20:.1f} MB free there" + (" (the disk is full)" if free < 2**20 else "")
    except OSError:
        space = ""
    resume = f"; free some space, then `hpcopt train --resume {run.path}` goes on from the last checkpoint" \
        if run is not None else ""
    return f"cannot write {path}: {error}{space}{resume}"


@dataclass(kw_only=True)
class RunInfo:
    """What the checkpoint and the status file say about the run besides its numbers."""
    method: str
    model: str
    layout: dict
    n_params: int
    server_hosts: list[str]
    joins_enabled: bool = False
    resumed_from: int = 0


class Recorder:
    def __init__(self, comm: MPI.Comm, writer, record: RecordConfig, *, bounds: list[tuple[int, int]],
                 start: float, evaluator=None, log=print, exchanges: int = 0, center: np.ndarray | None = None,
                 unit: str = "exchanges", label: str = "center", run: RunDir | None = None,
                 info: RunInfo | None = None, lock: RunDir | None = None, tensorboard=None):
        """Collective construction is not needed; `flush` is collective over `comm`. `center`
        (this rank's shard) is the first snapshot of a run that starts at `exchanges` = 0. `run`
        and `info`: where checkpoints and the status file go (the asynchronous servers).
        `tensorboard` (root, with record.tensorboard): the EventLog (hpcopt.io.tensorboard) each
        flush gives its live metrics to."""
        self.comm, self.writer, self.cfg, self.bounds = comm, writer, record, bounds
        self.root = comm.rank == 0
        self.start, self.evaluator, self.log = start, evaluator, log
        self.unit, self.label = unit, label
        self.run, self.info = run, info
        self.lock = lock if lock is not None else run  # whose lock each flush refreshes (root)
        self.center_snaps: list[tuple[int, float, np.ndarray]] = []
        if exchanges == 0 and center is not None:
            self.center_snaps.append((0, 0.0, center.copy()))
        self.last_snap = exchanges
        self.worker_snaps: dict[tuple[int, int], tuple[tuple, np.ndarray]] = {}
        self.worker_order: list[tuple[int, int]] = []  # root: arrival order of worker snapshots
        self.rows: list[tuple] = []  # root: one per exchange (or per worker and round)
        self.layer_rows: list[np.ndarray] = []  # root, LGRAWA: one per row
        self.events: list[np.ndarray] = []  # root
        now = time.monotonic()
        self.last_flush = self.last_checkpoint = now
        self.last_eval, self.last_eval_exchanges = -np.inf, -1
        self.rate_mark, self.rate = (now, exchanges), 0.0
        self.closed = False
        self.tensorboard = tensorboard
        self.tb_mark = (now, exchanges)  # the previous flush's (time, count): the rate between flushes
        self.tb_counts = {"join": 0, "leave": 0, "crash": 0}  # since this launch
        self.tb_center: tuple[float, np.ndarray] | None = None  # the last center snapshot flushed
        self.tb_distance: dict[int, float] = {}  # root: each worker's latest distance to the center
        self.tb_spread = record.tensorboard  # every rank: whether flushes still measure the spread (agreed)
        self.tb_ended = None  # the root's EventLog after a failure ended it (close() waits for its thread)

    def now(self) -> float:
        return time.monotonic() - self.start

    # ------------------------------------------------------------------ buffering
    def event(self, kind: str, wid: int = -1, rank: int = -1, host: str = "", step: int = -1, detail: str = "") -> None:
        """Root: an entry of /events."""
        if self.root:
            self.events.append(schema.event_row(self.now(), kind, wid, rank, host, step, detail))

    def row(self, row: tuple, layer_norms: np.ndarray | None = None) -> None:
        """Root: a row of /exchanges (schema.EXCHANGE order); LGRAWA adds its layer norms."""
        self.rows.append(row)
        if layer_norms is not None:
            self.layer_rows.append(layer_norms)

    def center(self, exchanges: int, shard: np.ndarray, t: float | None = None) -> None:
        """A snapshot of this rank's shard of the center (copied)."""
        self.center_snaps.append((exchanges, self.now() if t is None else t, shard.copy()))
        self.last_snap = exchanges

    def worker(self, key: tuple[int, int], meta: tuple, params: np.ndarray) -> None:
        """A worker's parameters (this rank's shard; kept as given), keyed (worker id, exchange)."""
        self.worker_snaps[key] = (meta, params)
        if self.root:
            self.worker_order.append(key)

    def wants_worker(self, k: int) -> bool:
        """Whether a worker's k-th exchange is sampled into /workers."""
        return bool(self.cfg.worker_every and k % self.cfg.worker_every == 0)

    def counted(self, exchanges: int, center: np.ndarray) -> None:
        """After the center moved for the `exchanges`-th time: a snapshot every record.center_every."""
        if exchanges % self.cfg.center_every == 0:
            self.center(exchanges, center)

    # ------------------------------------------------------------------ when
    def flush_due(self) -> bool:
        return time.monotonic() - self.last_flush >= self.cfg.flush_seconds

    def eval_due(self, exchanges: int) -> bool:
        return self.evaluator is not None and not self.evaluator.busy \
            and time.monotonic() - self.last_eval >= self.cfg.eval_seconds and exchanges > self.last_eval_exchanges

    def checkpoint_due(self) -> bool:
        return self.run is not None and time.monotonic() - self.last_checkpoint >= self.cfg.checkpoint_seconds

    # ------------------------------------------------------------------ collective
    def gather(self, shard: np.ndarray) -> np.ndarray | None:
        """Collective: the full vector on the root from every rank's shard."""
        if self.comm.size == 1:
            return shard
        counts = [hi - lo for lo, hi in self.bounds]
        full = np.empty(self.bounds[-1][1], dtype=np.float32) if self.root else None
        self.comm.Gatherv(shard, [full, counts, [lo for lo, _ in self.bounds], MPI.FLOAT] if self.root else None,
                          root=0)
        return full

    def evaluate(self, center: np.ndarray | None, exchanges: int, final: bool) -> None:
        """Root: evaluate the (full) center in the background; `final` waits for it and reports."""
        if not self.root or self.evaluator is None:
            return
        self.last_eval, self.last_eval_exchanges = time.monotonic(), exchanges
        if final:
            self.evaluator.wait()
        self.evaluator.submit(center, exchanges, self.now())
        if final:
            self.evaluator.wait()
            self.report()

    def flush(self, *, final: bool, evaluate: bool, exchanges: int, exchanges_total: int, center: np.ndarray,
              status: str | None = None, active: int | None = None) -> None:
        """Collective over `comm`: write what every rank has whole, evaluate `center` (this rank's
        shard) when asked, flush the file. The final flush records the last center. `status`: the
        file's status attribute (default: running, or complete at the final flush). `active`:
        how many workers are in the run now (for TensorBoard)."""
        comm = self.comm
        if final and self.last_snap != exchanges:  # the last center is always recorded
            self.center(exchanges, center)
        m = comm.allreduce(len(self.center_snaps), op=MPI.MIN) if comm.size > 1 else len(self.center_snaps)
        snaps, self.center_snaps = self.center_snaps[:m], self.center_snaps[m:]
        center_meta = np.array([(n, t) for n, t, _ in snaps], dtype=schema.CENTER_META)

        keys = comm.bcast(self.worker_order if self.root else None, root=0) if comm.size > 1 else self.worker_order
        have = np.array([k in self.worker_snaps for k in keys], dtype=np.int8)
        if keys and comm.size > 1:
            comm.Allreduce(MPI.IN_PLACE, have, op=MPI.MIN)
        complete = [k for k, h in zip(keys, have) if h]
        taken = [self.worker_snaps.pop(k) for k in complete]
        worker_meta = np.array([meta for meta, _ in taken], dtype=schema.WORKER_META)
        if self.root:
            done = set(complete)
            self.worker_order = [k for k in self.worker_order if k not in done]

        distances = self._distances(snaps, taken) if self.tb_spread else {}

        if evaluate:
            full = self.gather(center)
            self.evaluate(full.copy() if full is center else full, exchanges, final)
        tables = None
        if self.root:
            if final:
                self.event("end", detail=f"{exchanges} {self.unit}")
            tables = {"exchanges": self.rows, "evals": self.evaluator.take() if self.evaluator else [],
                      "events": self.events}
            if self.layer_rows:
                tables[schema.LAYER_NORMS] = self.layer_rows
            self.rows, self.events, self.layer_rows = [], [], []
        attrs = {"exchanges_total": exchanges_total, "wall_seconds": self.now(),
                 "status": status or ("complete" if final else "running")}
        try:
            self.writer.flush(center_rows=[s for _, _, s in snaps], center_meta=center_meta,
                              worker_rows=[s for _, s in taken], worker_meta=worker_meta,
                              tables=tables, attrs=attrs)
        except (OSError, RuntimeError) as e:  # h5py says "file write failed" for ENOSPC and EIO
            raise RecordingError(_cannot_write(self.writer.path, e, self.run)) from None
        if self.root and self.lock is not None:
            self.lock.touch_lock()  # the training is alive (a second one on this run is refused)
        if self.root and self.tensorboard is not None:
            try:
                self._live(exchanges, tables, distances, active)
            except Exception as e:  # noqa: BLE001 — live metrics are a view: they never end the run
                self._tensorboard_off(f"{type(e).__name__}: {e}")
        self.last_flush = time.monotonic()

    # ------------------------------------------------------------------ TensorBoard (record.tensorboard)
    def _distances(self, snaps: list, taken: list) -> dict[int, float]:
        """Collective over `comm`: for each worker with snapshots in this flush, the distance of
        its latest one to the center snapshot nearest in time (as `hpcopt analyze` measures the
        consensus spread), on the root. Each rank holds a shard of both, so it is a sum of
        squares over the ranks: one small bcast and one allreduce per flush, never on an exchange.

        A failure here (a MemoryError, say) ends the TensorBoard events, never the run, and never
        leaves a rank out of a collective: the root that cannot go on broadcasts None instead of
        the plan; a rank whose own sum fails still takes part in the allreduce, with a flag that
        tells every rank, and its reason goes to the root for the one log line. Every rank stops
        measuring at the same flush."""
        centers = ([self.tb_center] if self.tb_center is not None else []) + [(t, c) for _, t, c in snaps]
        if snaps:
            self.tb_center = (snaps[-1][1], snaps[-1][2])
        if not centers or not taken:  # the same on every rank (both lists were agreed on)
            return {}
        pick, why = None, None
        if self.root:  # the root's clock decides which center is nearest, for every rank
            try:
                if self.tensorboard is not None and not self.tensorboard.failed:  # else: stop measuring
                    latest = {int(meta[0]): i for i, (meta, _) in enumerate(taken)}  # taken is in arrival order
                    c_times = np.array([t for t, _ in centers])
                    pick = [(w, i, int(np.argmin(np.abs(c_times - float(taken[i][0][3])))))
                            for w, i in latest.items()]
            except Exception as e:  # noqa: BLE001
                why = f"{type(e).__name__}: {e}"
        if self.comm.size > 1:
            pick = self.comm.bcast(pick, root=0)
        if pick is None:
            self.tb_spread = False
            if why is not None:
                self._tensorboard_off(why)
            return {}
        sq = np.zeros(len(pick) + 1)  # the last entry: how many ranks failed
        try:
            failpoint(f"recorder.spread.rank{self.comm.rank}", MemoryError("failpoint"))
            sq[:-1] = [squared_distance(taken[i][1], centers[c][1]) for _, i, c in pick]
        except Exception as e:  # noqa: BLE001
            why = f"{type(e).__name__}: {e}"
            sq[:-1], sq[-1] = 0.0, 1.0
        if self.comm.size > 1:
            self.comm.Allreduce(MPI.IN_PLACE, sq, op=MPI.SUM)
        if sq[-1] > 0:  # every rank knows: gather the reasons, stop together
            whys = self.comm.gather(why, root=0) if self.comm.size > 1 else [why]
            self.tb_spread = False
            if self.root:
                self._tensorboard_off("; ".join(
                    (f"server {r}: " if self.comm.size > 1 else "") + f"{w} (the consensus spread)"
                    for r, w in enumerate(whys) if w is not None))
            return {}
        return {w: float(d) for (w, _, _), d in zip(pick, np.sqrt(sq[:-1]))} if self.root else {}

    def _tensorboard_off(self, why: str) -> None:
        """Root: one log line, and no more events (the run goes on)."""
        if self.tensorboard is None:
            return
        self.log(f"hpcopt: TensorBoard events are no longer written to {self.tensorboard.log_dir} ({why}); "
                 f"the run goes on")
        self.tensorboard.close(timeout=0)  # what it holds is written in its thread; close() waits for it
        self.tb_ended, self.tensorboard = self.tensorboard, None

    def _live(self, exchanges: int, tables: dict, distances: dict[int, float], active: int | None) -> None:
        """Root: this flush's live metrics to TensorBoard, from what it is writing to the file
        anyway. Evaluations go at the count they were made at, the rest at `exchanges`."""
        tb = self.tensorboard
        wall0 = time.time() - time.monotonic() + self.start  # the wall clock at the run's second 0
        for n, t, loss, acc in tables["evals"]:
            tb.scalars(n, {"center/test_loss": loss, "center/test_accuracy": acc}, walltime=wall0 + t)
        for e in tables["events"]:
            kind = e["kind"].item().decode()
            if kind in self.tb_counts:
                self.tb_counts[kind] += 1
        # the consensus spread: the mean of every worker's latest distance so far, as analyze has it
        self.tb_distance.update(distances)
        spread = float(np.mean(list(self.tb_distance.values()))) if self.tb_distance else None
        values = {"workers/joins": self.tb_counts["join"], "workers/leaves": self.tb_counts["leave"],
                  "workers/crashes": self.tb_counts["crash"], "center/spread": spread,
                  "workers/active": active}
        now, (mark_t, mark_n) = time.monotonic(), self.tb_mark
        if exchanges > mark_n:  # the rate since the count last moved (a flush at the same count replaces
            # the values at its step, and must not replace the rate with 0)
            values[f"throughput/{self.unit}_per_second"] = (exchanges - mark_n) / max(now - mark_t, 1e-9)
            self.tb_mark = (now, exchanges)
        losses = np.array([r[4] for r in tables["exchanges"]], dtype=np.float64)
        losses = losses[np.isfinite(losses)]
        if len(losses):
            values["train/loss"] = float(losses.mean())
        tb.scalars(exchanges, values, walltime=wall0 + self.now())

    def checkpoint(self, *, center: np.ndarray, held: dict, workers: list[tuple], exchanges: int,
                   next_worker_id: int) -> None:
        """Collective over `comm`, right after a flush: OUT/checkpoint.h5 matches the file as
        flushed. `held` maps worker id -> this rank's shard of what the center rule keeps of it
        (the root's list of ids counts); `workers` (root): checkpoint.WORKER rows of the active."""
        full = self.gather(center)
        keys = self.comm.bcast(sorted(held) if self.root else None, root=0)
        latest = {w: self.gather(held.get(w, center)) for w in keys}
        if self.root:
            info = self.info
            try:
                ckpt.write(self.run.checkpoint, center=full, workers=workers, latest=latest, attrs={
                    "method": info.method, "model": info.model, "n_parameters": info.n_params,
                    "layout": info.layout, "exchanges": exchanges, "next_worker_id": next_worker_id,
                    "time": self.now(), "trajectory_sizes": self.writer.sizes(), "run_id": self.writer.run_id})
            except (OSError, RuntimeError) as e:  # the old checkpoint stays (written aside, then renamed)
                raise RecordingError(_cannot_write(self.run.checkpoint, e, self.run)) from None
        self.last_checkpoint = time.monotonic()

    def close(self) -> None:
        """Collective."""
        self.writer.close()
        self.closed = True
        for events in (self.tensorboard, self.tb_ended):
            if events is not None:
                events.close()

    # ------------------------------------------------------------------ root: progress and status
    def report(self, exchanges: int | None = None, workers: int | None = None) -> bool:
        """Root: a progress line for each finished evaluation (rate: exchanges per second since
        the last line, when `exchanges` is given). Remembers the counts for the final line."""
        if self.evaluator is None:
            return False
        if workers is not None:
            self._counts = (exchanges, workers)
        exchanges, workers = getattr(self, "_counts", (exchanges, workers))
        lines = self.evaluator.new_results()
        for n, t, loss, acc in lines:
            if exchanges is not None:
                mark_t, mark_n = self.rate_mark
                now = time.monotonic()
                self.rate = (exchanges - mark_n) / max(now - mark_t, 1e-9)
                self.rate_mark = (now, exchanges)
            rate = f" ({self.rate:6.1f}/s)" if exchanges is not None else ""
            self.log(f"[{t:7.1f}s] {self.unit} {n:6d}{rate}  workers {workers}  "
                     f"{self.label} test acc {100 * acc:5.2f}%  loss {loss:.4f}")
        return bool(lines)

    def write_status(self, state: str, *, exchanges: int, members: list[dict]) -> None:
        """Root: OUT/status.json, rewritten atomically (read by `hpcopt status`)."""
        if not self.root or self.run is None:
            return
        last = self.evaluator.last if self.evaluator is not None else None
        info = self.info
        status = {
            "state": state, "method": info.method, "pid": os.getpid(), "host": socket.gethostname(),
            "updated": time.time(), "elapsed_seconds": round(self.now(), 3),
            "exchanges": exchanges, "exchanges_per_second": round(self.rate, 2),
            "center_test_accuracy": None if last is None else float(last[3]),
            "center_test_loss": None if last is None else float(last[2]),
            "evaluated_at_exchange": None if last is None else int(last[0]),
            "servers": info.server_hosts, "joins_enabled": info.joins_enabled,
            "workers": members, "resumed_from_exchange": info.resumed_from,
        }
        try:
            write_json(self.run.status, status)
        except OSError as e:  # a full disk: the same clear end as a failed flush
            raise RecordingError(_cannot_write(self.run.status, e, self.run)) from None

    @property
    def last_accuracy(self) -> float:
        last = self.evaluator.last if self.evaluator is not None else None
        return float(last[3]) if last else float("nan")
