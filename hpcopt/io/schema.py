"""Schema of the trajectory file; docs/trajectory-schema.md describes it for users.

Bump SCHEMA_VERSION on any change a reader would notice.
"""

from __future__ import annotations

import numpy as np

FORMAT = "hpcopt.trajectory"
SCHEMA_VERSION = 3  # 2: /exchanges gained grad_norm and leader; 3: /layer_grad_norms (LGRAWA), /exchanges/global_leader

CENTER_META = np.dtype([("exchanges", "<i8"), ("time", "<f8")])
WORKER_META = np.dtype([("worker_id", "<i4"), ("step", "<i8"), ("exchange", "<i8"), ("time", "<f8")])
EXCHANGE = np.dtype([
    ("worker_id", "<i4"),    # which worker
    ("step", "<i8"),         # the worker's local step count at the exchange
    ("exchange", "<i8"),     # the worker's own exchange counter (1, 2, ...)
    ("time", "<f8"),         # seconds since the run started (server clock)
    ("train_loss", "<f4"),   # mean training loss of the worker since its previous exchange
    ("samples", "<i8"),      # training samples the worker has seen
    ("lr", "<f4"),           # the worker's learning rate at the exchange
    ("bytes", "<i8"),        # bytes the exchange moved (both directions, all shards)
    ("grad_norm", "<f4"),    # norm of the worker's last minibatch gradient (GRAWA's weights use it)
    ("leader", "<i4"),       # LSGD: the worker id this exchange pulled toward (-1 for other methods)
    ("global_leader", "<i4"),  # two-level LSGD: the global leader it was also pulled toward, else -1
])
EVAL = np.dtype([("exchanges", "<i8"), ("time", "<f8"), ("test_loss", "<f4"), ("test_accuracy", "<f4")])
EVENT = np.dtype([
    ("time", "<f8"), ("kind", "S16"), ("worker_id", "<i4"), ("rank", "<i4"),
    ("host", "S64"), ("step", "<i8"), ("detail", "S256"),
])

TABLES = {"exchanges": EXCHANGE, "evals": EVAL, "events": EVENT}
# [n, n_layers] float32: LGRAWA's per-layer gradient norms, row i belongs to /exchanges row i
# (no rows for other methods; layers in /model's names order)
LAYER_NORMS = "layer_grad_norms"


def event_row(time: float, kind: str, worker_id: int = -1, rank: int = -1, host: str = "",
              step: int = -1, detail: str = "") -> np.ndarray:
    row = np.zeros((), dtype=EVENT)
    row["time"], row["kind"], row["worker_id"], row["rank"] = time, kind.encode()[:16], worker_id, rank
    row["host"], row["step"], row["detail"] = host.encode()[:64], step, detail.encode()[:256]
    return row
