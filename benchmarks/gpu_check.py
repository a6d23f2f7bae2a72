"""One command for a GPU node: does every path of hpcopt run on CUDA, and as well as on the CPU?

    benchmarks/gpu_check.sh                 # on a GPU node, from its shell (salloc -N1 --gpus=2, then this)
    benchmarks/gpu_check.sh --device cpu    # the same checks with the GPUs hidden (tests the harness)

It starts its own `mpirun` jobs, so run it from a shell on the node (an salloc or sbatch shell),
not under srun or mpirun (it says so and exits 2).

Prints the environment (torch and its CUDA build, the GPU and the architectures torch was built
for, whether MPI is CUDA-aware), then one table:

  * every method (asynchronous and synchronous) and every local step, a short MNIST-1D training
    on the device next to the same training with the GPUs hidden: both finish, the center stays
    finite, the device's final accuracy is within --tolerance points of the CPU's, and on CUDA
    every worker said it computes on a GPU whose exchange buffer is page-locked;
  * exchanges in place (shared memory) and over messages, compressed (int4, top8) and overlapped;
  * a deterministic run (run.deterministic) twice on the device: the same final center, bit for bit;
  * a worker joining a running training (`hpcopt join`) on the device;
  * the reset path (a worker's NaN loss, restarted from the center) and the resume path (a
    graceful stop, then --resume: every worker continues from its saved state);
  * per-exchange host copies (pull + push) and one local step of a 25M-parameter model;
  * `hpcopt analyze` of a run, and its curvature on the device against the CPU (the same
    eigenvalues and trace; the Lanczos basis kept on the GPU).

Exit status 0 only when every check passed; 3 when --device cuda finds no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent

# (label, config, extra flags): every method and every local step
RUNS = [
    ("eamsgd in place", "configs/mnist1d_easgd.toml", []),
    ("eamsgd over messages", "configs/mnist1d_easgd.toml", ["--comm.shared_memory", "false"]),
    ("mgrawa", "configs/mnist1d_mgrawa.toml", []),
    ("lgrawa", "configs/mnist1d_lgrawa.toml", []),
    ("lsgd", "configs/mnist1d_lsgd.toml", []),
    ("lsgd two-level", "configs/mnist1d_lsgd_two_level.toml", []),
    ("entropy-sgd", "configs/mnist1d_entropy_sgd.toml", []),
    ("sam", "configs/mnist1d_easgd.toml", ["--train.local", "sam"]),
    ("lars", "configs/mnist1d_easgd.toml", ["--train.local", "lars"]),
    ("bf16 autocast", "configs/mnist1d_easgd.toml", ["--train.precision", "bf16"]),
    ("overlap in place", "configs/mnist1d_easgd.toml", ["--comm.overlap", "true"]),
    ("int4 over messages", "configs/mnist1d_easgd.toml", ["--comm.shared_memory", "false", "--comm.compress", "int4"]),
    ("top8 + overlap, messages", "configs/mnist1d_easgd.toml",
     ["--comm.shared_memory", "false", "--comm.compress", "top8", "--comm.overlap", "true"]),
    ("dp-sgd", "configs/mnist1d_dp_sgd.toml", []),
    ("local-sgd", "configs/mnist1d_local_sgd.toml", []),
    ("diloco", "configs/mnist1d_diloco.toml", []),
]


def env(device: str) -> dict:
    e = dict(os.environ)
    for name in list(e):  # a PMIx/PMI rank's variables would make hpcopt refuse `-n` (see main)
        if name.startswith(("PMIX_", "PMI_", "OMPI_COMM_WORLD_")):
            del e[name]
    e.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "PYTHONUNBUFFERED": "1",
              "OMPI_MCA_rmaps_base_oversubscribe": "1",
              "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "plugins"), e.get("PYTHONPATH", "")])})
    if device == "cpu":
        e["CUDA_VISIBLE_DEVICES"] = ""  # CUDA's own way to hide every GPU
    return e


def train(out: Path, device: str, args: list[str], n: int = 3, timeout: float = 600) -> tuple[bool, float, str]:
    """(finished, final center accuracy, log) of `hpcopt train -n n`; on CUDA, finished only if
    the run really computed on GPUs (on_gpu)."""
    p = subprocess.run([PY, "-m", "hpcopt", "train", "-n", str(n), "--out", str(out), "--force", *args],
                       env=env(device), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    log = p.stdout + p.stderr
    synchronous = any(m in " ".join(args) for m in ("dp_sgd", "local_sgd", "diloco"))
    return p.returncode == 0 and (device == "cpu" or on_gpu(log, n if synchronous else n - 1)), accuracy(out), log


def on_gpu(log: str, ranks: int) -> bool:
    """Every one of the `ranks` ranks that train said it computes on a GPU (hpcopt.launch.device's
    line; a rank on the CPU says nothing), and none that its exchange buffer could not be
    page-locked: a run where a rank quietly fell back to the CPU, or copies synchronously, is a
    failed check here."""
    if "could not page-lock" in log:
        print("    | a worker's exchange buffer is not page-locked: its copies are synchronous")
        return False
    said = log.count("] device cuda:")
    if said < ranks:
        print(f"    | {ranks - said} of {ranks} training ranks did not say they compute on a GPU: on the CPU")
        return False
    return True


def accuracy(run: Path) -> float:
    import h5py
    import numpy as np

    try:
        with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
            if not np.isfinite(f["center/params"][-1]).all():
                return float("nan")
            ev = f["evals"][...]
            return float(ev["test_accuracy"][-1]) if len(ev) else float("nan")
    except (OSError, KeyError, IndexError):
        return float("nan")


class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str, bool]] = []

    def add(self, check: str, here: str, cpu: str, ok: bool) -> None:
        self.rows.append((check, here, cpu, ok))
        print(f"  {check:<28} {here:>22} {cpu:>14}  {'ok' if ok else 'FAILED'}", flush=True)

    @property
    def failed(self) -> int:
        return sum(not ok for *_, ok in self.rows)


def environment(device: str) -> bool:
    import torch

    from hpcopt.launch.device import mpi_cuda_support

    print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version() if torch.cuda.is_available() else None}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
        print(f"torch built for: {' '.join(torch.cuda.get_arch_list())}")
    print(f"MPI CUDA-aware: {mpi_cuda_support()} (reported only: exchanges stage through pinned host memory)")
    print(f"checking on: {device}\n")
    return device == "cpu" or torch.cuda.is_available()


def methods(table: Table, base: Path, device: str, epochs: float, tolerance: float) -> None:
    for label, config, extra in RUNS:
        args = ["--config", config, "--train.epochs", str(epochs), *extra]
        t0 = time.monotonic()
        ok_here, acc_here, log = train(base / f"{label.replace(' ', '-')}-{device}", device, args)
        seconds = time.monotonic() - t0
        ok_cpu, acc_cpu, _ = (ok_here, acc_here, log) if device == "cpu" else \
            train(base / f"{label.replace(' ', '-')}-cpu", "cpu", args)
        close = abs(acc_here - acc_cpu) * 100 <= tolerance
        table.add(label, f"{100 * acc_here:.1f}% in {seconds:.0f} s" if ok_here else "did not finish",
                  f"{100 * acc_cpu:.1f}%" if ok_cpu else "did not finish", ok_here and ok_cpu and close)
        if not ok_here:
            print("\n".join("    | " + line for line in log.strip().splitlines()[-15:]))


def reset_and_resume(table: Table, base: Path, device: str) -> None:
    # reset: rank 2's loss is NaN at its 30th call; the worker restarts from the center and goes on
    quad = ["--model.name", "quadratic:model", "--data.name", "quadratic:data", "--train.lr", "0.05",
            "--easgd.tau", "4", "--data.batch_size", "50", "--train.epochs", "3",
            "--model.kwargs", '{"poison_rank": 2, "poison_call": 30}']
    ok, _, log = train(base / f"reset-{device}", device, quad)
    table.add("reset after a NaN loss", "restarted" if ok and "restarting from the center" in log else "no",
              "-", ok and "restarting from the center" in log)
    # resume: a graceful stop, then --resume: workers continue from their saved states
    run = base / f"resume-{device}"
    args = ["--config", "configs/mnist1d_easgd.toml", "--train.epochs", "1000", "--record.checkpoint_seconds", "1"]
    proc = _background(device, "train", "-n", "3", "--out", str(run), "--force", *args)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and _exchanges(run) <= 300:
        time.sleep(0.5)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGINT)
    stopped = proc.wait(timeout=120) == 0
    before = _exchanges(run)
    p = _background(device, "train", "-n", "3", "--resume", str(run))
    deadline = time.monotonic() + 300  # the resumed run moving (its signal handlers are in place by then)
    while time.monotonic() < deadline and p.poll() is None and _exchanges(run) <= before + 50:
        time.sleep(0.5)
    if p.poll() is None:
        os.kill(p.pid, signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    ok = stopped and p.returncode == 0 and "no saved state" not in out
    table.add("stop, then resume", "continued" if ok else "FAILED", "-", ok)
    if not ok:
        print("\n".join("    | " + line for line in out.strip().splitlines()[-15:]))


def deterministic(table: Table, base: Path, device: str, epochs: float) -> None:
    """run.deterministic twice on the device: the same final center, bit for bit."""
    import h5py
    import numpy as np

    args = ["--config", "configs/mnist1d_easgd.toml", "--train.epochs", str(epochs), "--run.deterministic", "true"]
    centers = []
    for i in (1, 2):
        ok, _, log = train(base / f"deterministic-{i}-{device}", device, args)
        if not ok:
            table.add("deterministic, twice", "did not finish", "-", False)
            print("\n".join("    | " + line for line in log.strip().splitlines()[-15:]))
            return
        with h5py.File(base / f"deterministic-{i}-{device}" / "trajectory.h5", "r", locking=False) as f:
            centers.append(f["center/params"][-1])
    same = np.array_equal(centers[0], centers[1])
    table.add("deterministic, twice", "identical" if same else
              f"differ (max {np.abs(centers[0] - centers[1]).max():.2e})", "-", same)


def join(table: Table, base: Path, device: str) -> None:
    """A worker joins a running training on the device, exchanges, and everyone stops cleanly."""
    run = base / f"join-{device}"
    args = ["--config", "configs/mnist1d_easgd.toml", "--train.epochs", "1000"]
    proc = _background(device, "train", "-n", "3", "--out", str(run), "--force", *args)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and _exchanges(run) <= 20:
        time.sleep(0.5)
    joiner = _background(device, "join", str(run), "-n", "1")
    joined = False
    while time.monotonic() < deadline and proc.poll() is None and joiner.poll() is None and not joined:
        time.sleep(0.5)
        joined = any(m.get("id", 0) >= 2 and m.get("exchanges", 0) >= 5 for m in _members(run))
    for p in (joiner, proc):
        if p.poll() is None:
            os.kill(p.pid, signal.SIGINT)
    out_join, _ = joiner.communicate(timeout=120)
    out, _ = proc.communicate(timeout=120)
    ok = joined and proc.returncode == 0 and joiner.returncode == 0 and (device == "cpu" or on_gpu(out_join, 1))
    table.add("a worker joins", "joined and exchanged" if ok else "FAILED", "-", ok)
    if not ok:
        print("\n".join("    | " + line for line in (out + out_join).strip().splitlines()[-20:]))


def _background(device: str, *args: str) -> subprocess.Popen:
    """`hpcopt ARGS` started in its own session (so SIGINT reaches its mpirun only), output piped."""
    return subprocess.Popen([PY, "-m", "hpcopt", *args], env=env(device), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _members(run: Path) -> list[dict]:
    try:
        return list(json.loads((run / "status.json").read_text()).get("workers", []))
    except (OSError, ValueError):
        return []


def _exchanges(run: Path) -> int:
    try:
        return int(json.loads((run / "status.json").read_text()).get("exchanges", 0))
    except (OSError, ValueError):
        return 0


def copies_and_steps(table: Table, device: str) -> None:
    """Per-exchange host copies and one local step of a 25M-parameter MLP."""
    import torch
    from torch import nn

    from hpcopt.launch.device import HostMirror
    from hpcopt.models import FlatModel

    dev = "cuda:0" if device != "cpu" else "cpu"
    model = nn.Sequential(nn.Linear(2048, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))
    flat = FlatModel(model, device=dev)
    mirror = HostMirror(flat.params)
    x, y = torch.randn(256, 2048, device=dev), torch.randint(0, 10, (256,), device=dev)

    def sync():
        if dev != "cpu":
            torch.cuda.synchronize()

    def step():
        flat.zero_grad()
        nn.functional.cross_entropy(flat.module(x), y).backward()
        flat.params.add_(flat.grads, alpha=-0.01)
        sync()

    def exchange():
        mirror.pull()
        mirror.push()
        sync()

    times = {}
    for name, fn in (("step", step), ("copy", exchange)):
        fn()
        samples = []
        for _ in range(20):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        times[name] = statistics.median(samples)
    rate = f"{2 * flat.numel * 4 / times['copy'] / 1e9:.1f} GB/s" if dev != "cpu" else "no copies"
    if not mirror.pinned:
        rate += " (NOT pinned)"
    table.add(f"{flat.numel / 1e6:.0f}M params: step, copies",
              f"{1e3 * times['step']:.1f} ms, {1e3 * times['copy']:.2f} ms", rate, mirror.pinned)


def analyze(table: Table, base: Path, device: str) -> None:
    run = next((p for p in sorted(base.glob(f"eamsgd-in-place-{device}")) if (p / "trajectory.h5").exists()), None)
    if run is None:
        table.add("hpcopt analyze", "no run to analyse", "-", False)
        return
    t0 = time.monotonic()
    p = subprocess.run([PY, "-m", "hpcopt", "analyze", str(run), "--out", str(base / "analysis"), "--grid", "9x9",
                        "--no-density", "--no-progress", "--device", device], env=env(device), cwd=ROOT,
                       capture_output=True, text=True, timeout=1200)
    ok = p.returncode == 0
    table.add("hpcopt analyze", f"done in {time.monotonic() - t0:.0f} s" if ok else "FAILED", "-", ok)
    if not ok:
        print("\n".join("    | " + line for line in (p.stdout + p.stderr).strip().splitlines()[-15:]))


def hessian(table: Table, base: Path, device: str) -> None:
    """The curvature (Lanczos eigenvalues, Hutchinson trace, SLQ density) of one run on the device
    and with the GPUs hidden: the same seeds give the same probes, so the numbers must agree to
    float32 rounding; on CUDA the Lanczos basis must have been kept on the GPU."""
    import h5py
    import numpy as np

    run = next((p for p in sorted(base.glob(f"eamsgd-in-place-{device}")) if (p / "trajectory.h5").exists()), None)
    if run is None:
        table.add("hessian: device vs CPU", "no run to analyse", "-", False)
        return
    got, logs = {}, {}
    for where in (device, "cpu"):
        out = base / f"hessian-{where}"
        p = subprocess.run([PY, "-m", "hpcopt", "analyze", str(run), "--out", str(out), "--no-report", "--no-progress",
                            "--skip", "trajectory,pca,landscape,interpolation,sharpness", "--density",
                            "--density-runs", "1", "--density-steps", "20", "--top-k", "3",
                            "--curvature-samples", "1000", "--device", where], env=env(where), cwd=ROOT,
                           capture_output=True, text=True, timeout=1200)
        logs[where] = p.stdout + p.stderr
        if p.returncode != 0:
            table.add("hessian: device vs CPU", f"FAILED on {where}", "-", False)
            print("\n".join("    | " + line for line in logs[where].strip().splitlines()[-15:]))
            return
        with h5py.File(out / "analysis.h5", "r") as f:
            g = f["curvature"]
            got[where] = (g["eigenvalues"][()], float(g.attrs["trace"]))
    (ev_d, tr_d), (ev_c, tr_c) = got[device], got["cpu"]
    rel = max(float(np.max(np.abs(ev_d - ev_c) / np.maximum(np.abs(ev_c), 1e-12))), abs(tr_d - tr_c) / max(abs(tr_c), 1e-12))
    on_gpu = device == "cpu" or "Lanczos basis" in logs[device] and "on the GPU" in logs[device]
    ok = rel <= 1e-3 and on_gpu
    table.add("hessian: device vs CPU", f"top eigenvalue {ev_d[0]:.4g} vs {ev_c[0]:.4g}, trace {tr_d:.4g} vs {tr_c:.4g}",
              f"max rel. diff {rel:.1e}" + ("" if on_gpu else ", basis NOT on the GPU"), ok)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--epochs", type=float, default=10.0, help="epochs of each method's training")
    ap.add_argument("--tolerance", type=float, default=5.0, help="accuracy points the device may differ from the CPU")
    ap.add_argument("--only", help="comma-separated parts: methods,deterministic,join,reset,copies,analyze "
                                   "(default: all)")
    ap.add_argument("--out", help="folder for the runs (default: a temporary one)")
    args = ap.parse_args()
    from hpcopt.launch.launcher import under_mpi_launcher

    if under_mpi_launcher():
        print("gpu_check starts its own mpirun jobs: run it from a shell on the node (salloc, sbatch), "
              "not under srun or mpirun", file=sys.stderr)
        return 2
    if not environment(args.device):
        print("no CUDA device: nothing checked (run this on a GPU node, or with --device cpu)")
        return 3
    base = Path(args.out or tempfile.mkdtemp(prefix="hpcopt-gpu-check-"))
    base.mkdir(parents=True, exist_ok=True)
    parts = set((args.only or "methods,deterministic,join,reset,copies,analyze").split(","))
    table = Table()
    print(f"  {'check':<28} {args.device:>22} {'cpu':>14}")
    if "methods" in parts:
        methods(table, base, args.device, args.epochs, args.tolerance)
    if "deterministic" in parts:
        deterministic(table, base, args.device, min(args.epochs, 3.0))
    if "join" in parts:
        join(table, base, args.device)
    if "reset" in parts:
        reset_and_resume(table, base, args.device)
    if "copies" in parts:
        copies_and_steps(table, args.device)
    if "analyze" in parts:
        analyze(table, base, args.device)
        hessian(table, base, args.device)
    print(f"\n{len(table.rows) - table.failed}/{len(table.rows)} checks passed (runs in {base})")
    return 0 if table.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
