"""The trained model out of a run, on real runs (real `mpirun`, real files, a fresh Python to load
it): `hpcopt export`, `hpcopt.load_model`, OUT/center.pt, and `hpcopt.load_analysis` on what
`hpcopt analyze` wrote.

The exported center's test accuracy must be the trajectory's last evaluation exactly: the final
flush evaluates the final center (nothing is in flight then) at the exchange of the last center
snapshot, with the same forward pass over the whole test set, and stores correct / n as float32.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import hpcopt, mpi_env, mpirun
from hpcopt.models import build_model

pytestmark = pytest.mark.mpi

SHORT = ["--train.lr", "0.1", "--record.flush_seconds", "0.5", "--record.eval_seconds", "0.5"]
TRAININGS = {  # name: (ranks, flags)
    "eamsgd": (3, ["--run.method", "eamsgd", "--train.epochs", "2", "--easgd.tau", "4", "--record.worker_every", "2"]),
    "local-sgd": (2, ["--run.method", "local-sgd", "--train.epochs", "1"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Short MNIST-1D trainings, both at once: EAMSGD (1 server + 2 workers; asynchronous, server 0
    writes center.pt) and Local SGD (2 ranks; synchronous, rank 0 writes it)."""
    d = tmp_path_factory.mktemp("export")
    with ThreadPoolExecutor(len(TRAININGS)) as pool:
        done = [pool.submit(mpirun, n, "train", "--out", str(d / name), *SHORT, *flags)
                for name, (n, flags) in TRAININGS.items()]
        for f in done:
            f.result()
    return {name: d / name for name in TRAININGS}


@pytest.fixture(scope="module")
def exported(runs) -> dict[str, Path]:
    """`hpcopt export RUN -o RUN/exported.pt` (--at center, the default) of each run."""
    out = {}
    for name, run in runs.items():
        p = hpcopt("export", str(run), "-o", str(run / "exported.pt"))
        assert p.returncode == 0 and "wrote" in p.stdout, p.stderr
        out[name] = run / "exported.pt"
    return out


FRESH_PYTHON = """
import json, sys
import numpy as np, torch, torch.nn.functional as F
import hpcopt
from hpcopt.models import build_model

out = {}
for run, exported in zip(sys.argv[1::2], sys.argv[2::2]):
    data = np.load(f"{run}/data.npz")
    x, y = torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"])
    model = build_model("cnn1d")                        # what a user has: the model class ...
    model.load_state_dict(torch.load(exported))         # ... and the exported file
    model.eval()
    for how, m in (("file", model), ("api", hpcopt.load_model(run))):
        with torch.no_grad():
            logits = m(x)
        out[f"{run} {how}"] = [int((logits.argmax(1) == y).sum()), len(y), F.cross_entropy(logits, y).item()]
print(json.dumps(out))
"""


def test_the_exported_center_scores_the_last_evaluation_exactly(runs, exported):
    args = [str(a) for name in runs for a in (runs[name], exported[name])]
    p = subprocess.run([sys.executable, "-c", FRESH_PYTHON, *args], capture_output=True, text=True, timeout=120,
                       env=mpi_env())
    assert p.returncode == 0, p.stderr
    scores = json.loads(p.stdout)
    for name, run in runs.items():
        with h5py.File(run / "trajectory.h5", "r") as f:
            evals, last_snapshot = f["evals"][()], f["center/meta"]["exchanges"][-1]
        # the last evaluation is the final flush's, of the center it records last; an earlier one
        # at the same count (a flush after the last exchange, while workers were leaving) saw it too
        final = evals[evals["exchanges"] == last_snapshot]
        assert evals["exchanges"][-1] == last_snapshot and len(set(final["test_accuracy"])) == 1, (name, evals)
        for how in ("file", "api"):
            correct, n, loss = scores[f"{run} {how}"]
            assert np.float32(correct / n) == evals["test_accuracy"][-1], (name, how, correct, n, evals[-1])
            assert loss == pytest.approx(float(evals["test_loss"][-1]), rel=1e-5), (name, how, loss, evals[-1])


def test_center_pt_is_the_export_of_the_final_center(runs, exported):
    for name, run in runs.items():
        written, export = torch.load(run / "center.pt"), torch.load(exported[name])
        assert list(written) == list(export) == list(build_model("cnn1d").state_dict())
        for k in written:
            assert torch.equal(written[k], export[k]), (name, k)


def test_every_saved_model_by_name(runs):
    """center, center:I, worker:ID: the module's parameters are the recorded row, bit for bit."""
    from hpcopt import load_model

    run = runs["eamsgd"]
    with h5py.File(run / "trajectory.h5", "r") as f:
        center, workers, wmeta = f["center/params"][()], f["workers/params"][()], f["workers/meta"][()]
    last_of_1 = workers[np.flatnonzero(wmeta["worker_id"] == 1)[-1]]
    for at, row in (("center", center[-1]), ("center:1", center[1]), ("center:-2", center[-2]),
                    ("worker:1", last_of_1)):
        model = load_model(run, at=at)
        assert not model.training
        assert torch.equal(torch.nn.utils.parameters_to_vector(model.parameters()), torch.from_numpy(row)), at
    assert len(center) > 2 and not np.array_equal(center[1], center[-1])
    p = hpcopt("export", str(run / "trajectory.h5"), "--at", "worker:1", "-o", str(run / "w1.pt"))
    assert p.returncode == 0, p.stderr
    assert torch.equal(torch.nn.utils.parameters_to_vector(torch.load(run / "w1.pt").values()),
                       torch.from_numpy(last_of_1))


@pytest.mark.parametrize("at,out,says", [
    ("center", "{missing}", "does not exist"),
    ("centre", "m.pt", "must be center, center:I, init, worker:ID or worker:ID:K"),
    ("center:x", "m.pt", "must be center, center:I"),
    ("worker", "m.pt", "must be center, center:I"),
    ("center:99", "m.pt", "index 99 out of range"),
    ("worker:7", "m.pt", "worker 7 has no recorded snapshot"),
    ("center", "no/such/dir/m.pt", "cannot write"),
])
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, at, out, says):
    run = tmp_path / "missing" if out == "{missing}" else runs["eamsgd"]
    target = tmp_path / ("m.pt" if out == "{missing}" else out)
    p = hpcopt("export", str(run), "--at", at, "-o", str(target))
    assert p.returncode == 2 and says in p.stderr, p.stderr
    assert p.stderr.startswith("hpcopt export: error: ") and p.stderr.count("\n") == 1, p.stderr
    assert not target.exists() and not list(tmp_path.glob("**/.m.pt.*"))


def test_safetensors(runs, tmp_path):
    """Written when the package is there (with the same tensors); otherwise a clear error."""
    target = tmp_path / "m.safetensors"
    p = hpcopt("export", str(runs["eamsgd"]), "-o", str(target))
    try:
        from safetensors.torch import load_file
    except ImportError:
        assert p.returncode == 2 and "pip install safetensors" in p.stderr and p.stderr.count("\n") == 1, p.stderr
        assert not target.exists()
        return
    assert p.returncode == 0, p.stderr
    written, center = load_file(str(target)), torch.load(runs["eamsgd"] / "center.pt")
    assert sorted(written) == sorted(center) and all(torch.equal(written[k], center[k]) for k in center)


def test_load_analysis_reads_what_analyze_wrote(runs, tmp_path):
    from hpcopt import load_analysis
    from hpcopt.analyze import AnalyzeOptions, analyze
    from hpcopt.analyze.store import ResultsError

    out = tmp_path / "analysis"
    res = analyze(str(runs["eamsgd"]), AnalyzeOptions(
        out=str(out), grid=(3, 2), line_points=3, interp_points=3, samples=200, curvature_samples=100, top_k=2,
        trace_max_probes=4, sharpness_steps=2, report=False, progress=False, device="cpu"))
    loaded = load_analysis(out)  # the folder; the file itself, or a run directory's analysis/, as well
    assert loaded.keys() == load_analysis(out / "analysis.h5").keys()
    assert loaded["format"] == "hpcopt.analysis" and loaded["complete"] is True
    t = loaded["trajectory"]
    np.testing.assert_array_equal(t["center_path_length"], res["trajectory"]["center_path_length"])
    assert t["per_layer"] == res["trajectory"]["per_layer"] and t["workers"]["1"]["snapshots"] == 10
    for name, g in res["grids"].items():
        np.testing.assert_array_equal(loaded["grids"][name]["loss"], g["loss"])
        assert loaded["grids"][name]["spec"] == json.loads(json.dumps(g["spec"]))
    assert loaded["grids"]["random_2d"]["loss"].shape == (2, 3)
    np.testing.assert_array_equal(loaded["curvature"]["eigenvalues"], res["curvature"]["eigenvalues"])
    assert loaded["curvature"]["trace"] == res["curvature"]["trace"]
    assert loaded["curvature"]["depends_on"]["samples"] == 100
    np.testing.assert_array_equal(loaded["pca"]["paths"]["center"], res["pca"]["paths"]["center"])
    np.testing.assert_array_equal(loaded["pca"]["paths"]["worker_1"], res["pca"]["paths"]["worker:1"])
    for bad in (runs["local-sgd"], runs["eamsgd"] / "trajectory.h5"):  # none there; not an analysis file
        with pytest.raises(ResultsError, match="analysis"):
            load_analysis(bad)
    # the report's figures of the analysis's results, as matplotlib Figures (no file, no pyplot)
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    import hpcopt

    figs = hpcopt.figures(res)
    assert {"curves", "trajectory", "layers", "pca", "landscape_random", "interpolation", "hessian"} <= figs.keys()
    assert all(isinstance(f, Figure) and f.axes for f in figs.values()) and not plt.get_fignums()


def test_a_model_built_differently_now_is_named():
    """A user's factory that changed since the run: the recorded layout no longer fits."""
    from hpcopt import config as C
    from hpcopt.export import ExportError, module_at
    from hpcopt.models import FlatModel

    layout = FlatModel(build_model("mlp")).layout()
    with pytest.raises(ExportError, match=r"built now with the parameters conv1.weight \(25, 1, 5\).*but the run "
                                          r"recorded net.0.weight \(100, 40\).*has the model changed since"):
        module_at(C.load(None, {}), layout, np.zeros(15_210, np.float32))


def test_import_hpcopt_stays_cheap():
    p = subprocess.run([sys.executable, "-c", "import sys, hpcopt; f = hpcopt.load_model; g = hpcopt.load_analysis; "
                        "print(sorted(m for m in ('torch', 'h5py', 'mpi4py') if m in sys.modules))"],
                       capture_output=True, text=True, timeout=60, check=True)
    assert p.stdout.strip() == "[]"
    # the commands that only read a run's files answer at once: torch alone takes ~2 s to import
    # (hpcopt status imported it through the import command's parser)
    p = subprocess.run([sys.executable, "-c", "import sys; from hpcopt.cli import main; main(['status', '/nonexistent']); "
                        "print(sorted(m for m in ('torch', 'mpi4py') if m in sys.modules), file=sys.stderr)"],
                       capture_output=True, text=True, timeout=60)
    assert p.stderr.strip().splitlines()[-1] == "[]", p.stderr


def _crashing_copy(run: Path, to: Path) -> Path:
    """A copy of `run` whose trajectory.h5 has one flipped metadata byte on which HDF5 itself
    crashes (found by flipping the bytes of a real trajectory one at a time): the low byte of the
    byte offset of the member `kind` (8, after `time`) in the compound datatype of the events
    table's object header. HDF5 then converts the table's rows past its buffers and glibc aborts
    the process (free(): invalid pointer, SIGABRT): no Python `except` can catch it."""
    shutil.copytree(run, to)
    path = to / "trajectory.h5"
    data = bytearray(path.read_bytes())
    member = b"kind" + b"\0" * 4 + (8).to_bytes(4, "little")  # name padded to 8 bytes, then its offset
    assert data.count(member) == 1, "this HDF5 encodes the events datatype differently: find another byte"
    data[data.index(member) + 8] ^= 0xFF
    path.write_bytes(data)
    return to


def test_a_trajectory_that_crashes_hdf5_is_a_clear_error_and_is_kept(runs, tmp_path):
    """A damaged trajectory that makes HDF5 crash: inspect, export and analyze (also under mpirun)
    said nothing or 'Aborted' and died with the signal's status; now each says the file is
    damaged, with exit 2, and leaves it byte for byte as it was."""
    run = _crashing_copy(runs["eamsgd"], tmp_path / "run")
    before = (run / "trajectory.h5").read_bytes()
    plain = subprocess.run([sys.executable, "-c", "import sys, h5py; h5py.File(sys.argv[1], 'r')['events'][()]",
                            str(run / "trajectory.h5")], capture_output=True, timeout=60)
    assert plain.returncode < 0, "the recipe no longer crashes plain h5py: the test proves nothing"
    said = f"{run / 'trajectory.h5'} is damaged: HDF5 crashed (SIG"  # SIGABRT or SIGSEGV: what the heap holds
    for args in (["inspect", str(run)], ["export", str(run), "-o", str(tmp_path / "m.pt")],
                 ["analyze", str(run), "--out", str(tmp_path / "analysis"), "--no-progress"]):
        p = hpcopt(*args)
        assert p.returncode == 2 and said in p.stderr and p.stderr.count("\n") == 1, (args, p.returncode, p.stderr)
    p = mpirun(2, "analyze", str(run), "--out", str(tmp_path / "analysis"), "--no-progress", check=False)
    assert p.returncode == 2 and p.stderr.count(said) == 1, (p.returncode, p.stderr)
    assert (run / "trajectory.h5").read_bytes() == before
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "analysis" / "analysis.h5").exists()


def test_a_trajectory_hdf5_spins_on_is_a_clear_error_in_time(runs, tmp_path):
    """HDF5 going round a damaged structure for minutes (here the probe's child sleeps) is cut
    off at the deadline ($HPCOPT_PROBE_TIMEOUT) and said to be damage, with exit 2."""
    env = {"HPCOPT_FAILPOINTS": "inspect.probe.hang@1", "HPCOPT_PROBE_TIMEOUT": "1"}
    for args in (["inspect", str(runs["eamsgd"])], ["export", str(runs["eamsgd"]), "-o", str(tmp_path / "m.pt")]):
        t = time.monotonic()
        p = hpcopt(*args, env=env, timeout=60)
        assert p.returncode == 2 and "did not finish reading its metadata in 1 s" in p.stderr, p.stderr
        assert time.monotonic() - t < 30 and not (tmp_path / "m.pt").exists()
