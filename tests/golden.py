"""Golden trajectories: deterministic runs of every method whose records must not change when the
code is restructured (the numbers a run writes are its behaviour).

    python tests/golden.py            # record tests/golden.json (only when a change of behaviour is meant)

Each run is `run.deterministic = true` with a fixed seed; a fingerprint is the SHA-256 of what the
run recorded that does not depend on the clock: center and worker snapshots (bits), their
exchange counts, and every /exchanges row but its time. tests/mpi/test_golden.py compares fresh
runs with the stored fingerprints. Float results depend on the CPU's kernels (AVX2 vs AVX-512)
and the torch build, so the file also stores a calibration: the fingerprint of a few local steps
in one process, no MPI. Where that differs the comparison cannot hold and is skipped, saying so.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import h5py
import numpy as np

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden.json"

# a short MNIST-1D run: 1.5 epochs of 40 steps, tau 4, several chunks per shard, two servers
COMMON = ["--train.epochs", "1.5", "--easgd.tau", "4", "--train.lr", "0.1", "--run.deterministic", "true",
          "--record.center_every", "3", "--record.worker_every", "2", "--comm.chunk_mb", "0.004",
          "--record.eval_seconds", "1000", "--run.seed", "3"]
ASYNC = (5, ["--run.servers", "2"])  # 2 servers + 3 workers
SYNC = (3, [])
RUNS = {
    "easgd": (*ASYNC, ["--run.method", "easgd"]),
    "easgd-messages": (*ASYNC, ["--run.method", "easgd", "--comm.shared_memory", "false"]),
    "eamsgd": (*ASYNC, ["--run.method", "eamsgd", "--train.weight_decay", "1e-3"]),
    "eamsgd-lars": (*ASYNC, ["--run.method", "eamsgd", "--train.local", "lars"]),
    "eamsgd-sam": (*ASYNC, ["--run.method", "eamsgd", "--train.local", "sam"]),
    "easgd-adamw": (*ASYNC, ["--run.method", "easgd", "--train.local", "adamw", "--train.lr", "0.003"]),
    "mgrawa": (*ASYNC, ["--run.method", "mgrawa", "--train.momentum", "0.9"]),
    "lgrawa": (*ASYNC, ["--run.method", "lgrawa", "--train.momentum", "0.9"]),
    "lsgd": (*ASYNC, ["--run.method", "lsgd", "--train.momentum", "0.9", "--lsgd.loss_decay", "0.5"]),
    "lsgd-two-level": (*ASYNC, ["--run.method", "lsgd", "--train.momentum", "0.9", "--lsgd.tau_g", "8",
                                "--lsgd.group_size", "2"]),
    "dp-sgd": (*SYNC, ["--run.method", "dp-sgd", "--train.momentum", "0.9"]),
    "local-sgd": (*SYNC, ["--run.method", "local-sgd", "--train.momentum", "0.9", "--sync.switch_epochs", "0.5"]),
    "diloco": (*SYNC, ["--run.method", "diloco", "--train.momentum", "0.9"]),
}


def run_args(name: str, out: Path) -> tuple[int, list[str]]:
    n, base, extra = RUNS[name]
    return n, ["train", "--out", str(out), *COMMON, *base, *extra]


def fingerprint(path: Path) -> dict[str, str]:
    """SHA-256 of each clock-free record of a trajectory file."""
    def digest(*arrays) -> str:
        h = hashlib.sha256()
        for a in arrays:
            a = np.ascontiguousarray(a)
            h.update(str((a.dtype.str, a.shape)).encode())
            h.update(a.tobytes())
        return h.hexdigest()[:24]

    with h5py.File(path, "r", locking=False) as f:
        ex = f["exchanges"][()]
        cols = [c for c in ex.dtype.names if c != "time"]
        wmeta = f["workers/meta"][()]
        out = {
            "center": digest(f["center/params"][()], f["center/meta"][()]["exchanges"]),
            "workers": digest(f["workers/params"][()], *(wmeta[c] for c in ("worker_id", "step", "exchange"))),
            "exchanges": digest(*(ex[c] for c in cols)),
            "rows": str(len(ex)),
        }
        if "layer_grad_norms" in f:
            out["layer_grad_norms"] = digest(f["layer_grad_norms"][()])
    return out


def calibration() -> str:
    """The arithmetic of this machine: 20 Nesterov SGD steps of the MNIST-1D CNN in one process,
    plain torch (independent of hpcopt's own training code, which the golden runs test)."""
    import torch
    import torch.nn.functional as F

    from hpcopt.data import load_data
    from hpcopt.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(3)
    model = build_model("cnn1d", {})
    data = load_data("mnist1d", 42)
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for step in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x[step * 100:(step + 1) * 100]), y[step * 100:(step + 1) * 100]).backward()
        opt.step()
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()[:24]


def record() -> None:
    import tempfile

    sys.path.insert(0, str(HERE))
    from conftest import mpirun

    golden = {"calibration": calibration(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in RUNS:
            n, args = run_args(name, Path(tmp) / name)
            mpirun(n, *args, timeout=600)
            golden["runs"][name] = fingerprint(Path(tmp) / name / "trajectory.h5")
            print(name, golden["runs"][name], flush=True)
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    record()
