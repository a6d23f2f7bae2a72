"""`hpcopt analyze` end to end under real `mpirun` with real files: a grid on a non-square grid
against a brute-force loop, the same file on 1 and 3 ranks, an interrupted grid that resumes,
distributed Hessian-vector products against the exact Hessian, the report, clear errors, and
`--device` (auto is the CPU bit for bit without a GPU; cuda without one is an error)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import hpcopt, mpirun
from torch.func import functional_call

from hpcopt.models import MLP

pytestmark = pytest.mark.mpi

MODEL = {"input_size": 8, "classes": 3, "hidden": [12]}   # 147 parameters
GRID = ["--skip", "trajectory,pca,interpolation,hessian,sharpness", "--grid", "7x5", "--line-points", "3",
        "--no-report", "--timeout", "60"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real training run (1 server + 2 workers) of a small MLP on a small HDF5 data set."""
    d = tmp_path_factory.mktemp("analyze")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    y = ((x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1)).astype(np.int64)
    with h5py.File(d / "data.h5", "w") as f:
        f["x_train"], f["y_train"] = x[:240], y[:240]
        f["x_test"], f["y_test"] = x[240:], y[240:]
    mpirun(3, "train", "--out", str(d / "run"), "--model.name", "mlp", "--model.kwargs", json.dumps(MODEL),
           "--data.name", str(d / "data.h5"), "--data.batch_size", "20", "--train.epochs", "6", "--train.lr", "0.1",
           "--easgd.tau", "2", "--record.worker_every", "1", "--record.center_every", "2",
           "--record.flush_seconds", "0.5", "--record.eval_seconds", "0.2")
    return d


def loss_at(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Brute-force reference: a fresh MLP with the flat vector copied into its parameters."""
    model = MLP(**MODEL)
    with torch.no_grad():
        o = 0
        for p in model.parameters():
            p.copy_(torch.from_numpy(w[o:o + p.numel()].astype(np.float32)).view_as(p))
            o += p.numel()
        out = model(torch.from_numpy(x))
        return F.cross_entropy(out, torch.from_numpy(y)).item(), (out.argmax(1).numpy() == y).mean()


def grids(path) -> dict:
    with h5py.File(path, "r") as f:
        return {name: {k: g[k][()] for k in g} | {"spec": g.attrs["spec"]} for name, g in f["grids"].items()}


@pytest.fixture(scope="module")
def full_grid(run) -> dict:
    """The grids of GRID computed in one go on 3 ranks."""
    mpirun(3, "analyze", str(run / "run"), "--out", str(run / "a3"), *GRID)
    return grids(run / "a3" / "analysis.h5")


def test_grid_on_a_non_square_grid_matches_a_brute_force_loop_and_is_the_same_on_1_and_3_ranks(run, full_grid):
    mpirun(1, "analyze", str(run / "run"), "--out", str(run / "a1"), *GRID)
    g1, g3 = grids(run / "a1" / "analysis.h5"), grids(run / "a3" / "analysis.h5")
    assert set(g1) == {"random_1d", "random_2d"} == set(g3)
    for name in g1:
        assert g1[name].pop("spec") == g3[name].pop("spec")
        for k in g1[name]:
            assert np.array_equal(g1[name][k], g3[name][k]), (name, k)
    g = g3["random_2d"]
    assert g["loss"].shape == (5, 7) and g["done"].all()
    with h5py.File(run / "data.h5") as f:
        x, y = f["x_train"][()], f["y_train"][()]
    ref = np.zeros((5, 7))
    acc = np.zeros((5, 7))
    for iy, b in enumerate(g["y"]):
        for ix, a in enumerate(g["x"]):
            ref[iy, ix], acc[iy, ix] = loss_at(g["origin"] + a * g["directions"][0] + b * g["directions"][1], x, y)
    np.testing.assert_allclose(g["loss"], ref, rtol=1e-5)
    np.testing.assert_allclose(g["accuracy"], acc, atol=1e-9)
    assert ref.max() - ref.min() > 0.1  # the surface is not flat, so a mis-indexed grid fails
    with h5py.File(run / "run" / "trajectory.h5", "r") as f:
        np.testing.assert_array_equal(g["origin"], f["center/params"][-1].astype(np.float64))


def test_interrupted_grid_resumes_and_completes_with_identical_values(run, full_grid):
    full = full_grid
    p = mpirun(3, "analyze", str(run / "run"), "--out", str(run / "part"), *GRID, "--max-points", "9", check=False)
    assert p.returncode == 3 and "run the same command again to resume" in p.stdout
    part = grids(run / "part" / "analysis.h5")
    done = part["random_1d"]["done"].sum() + part.get("random_2d", {"done": np.zeros(1)})["done"].sum()
    assert 9 <= done < 3 + 35
    for name, g in part.items():  # the points done so far are already exact
        m = g["done"].astype(bool)
        np.testing.assert_array_equal(g["loss"][m], full[name]["loss"][m])
        assert np.isnan(g["loss"][~m]).all()
    mpirun(2, "analyze", str(run / "run"), "--out", str(run / "part"), *GRID)  # resume on another rank count
    resumed = grids(run / "part" / "analysis.h5")
    for name in full:
        assert resumed[name]["done"].all()
        np.testing.assert_array_equal(resumed[name]["loss"], full[name]["loss"])
        np.testing.assert_array_equal(resumed[name]["accuracy"], full[name]["accuracy"])


def test_distributed_curvature_matches_the_exact_hessian_and_the_report_is_written(run):
    p = mpirun(3, "analyze", str(run / "run"), "--out", str(run / "cv"), "--curvature-samples", "0", "--top-k", "3",
               "--trace-rtol", "0.05", "--grid", "5x4", "--line-points", "5", "--interp-points", "5",
               "--plane", "center", "worker:0", "worker:1", "--density", "--density-runs", "1", "--density-steps", "20")
    assert "top Hessian eigenvalues" in p.stdout
    with h5py.File(run / "data.h5") as f:
        x, y = torch.from_numpy(f["x_train"][()]), torch.from_numpy(f["y_train"][()])
    with h5py.File(run / "run" / "trajectory.h5", "r") as f:
        w = torch.from_numpy(f["center/params"][-1])
    model = MLP(**MODEL).double()
    x = x.double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss(v):
        params, o = {}, 0
        for n, s in zip(names, shapes):
            params[n] = v[o:o + s.numel()].view(s)
            o += s.numel()
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    H = torch.autograd.functional.hessian(loss, w.double()).numpy()
    exact = np.sort(np.linalg.eigvalsh(H))[::-1]
    with h5py.File(run / "cv" / "analysis.h5", "r") as f:
        cv = f["curvature"]
        np.testing.assert_allclose(cv["eigenvalues"][()], exact[:3], rtol=1e-3)
        assert abs(cv.attrs["trace"] - np.trace(H)) <= 4 * cv.attrs["trace_stderr"]
        depends = json.loads(cv.attrs["depends_on"])
        assert depends["samples"] == 240 and depends["ranks"] == 3 and depends["split"] == "train"
        assert len(cv["subsample_indices"]) == 240
        assert 0 <= cv["sharpness"].attrs["value"]
        assert set(f["grids"]) >= {"random_1d", "random_2d", "pca_2d", "plane", "interp_0", "interp_1"}
        assert f["grids/plane/loss"].shape == (4, 5)
        # the plane through three models puts them at (0,0), (1,0), (0,1)
        plane = f["grids/plane"]
        np.testing.assert_allclose(plane["origin"][()] + plane["directions"][0], f["grids/interp_1/origin"][()]
                                   + f["grids/interp_1/directions"][0], rtol=1e-6, atol=1e-7)
    html = (run / "cv" / "report.html").read_text()
    for fig in ("curves", "trajectory", "pca", "landscape_random", "interpolation", "hessian", "plane"):
        assert (run / "cv" / f"{fig}.png").stat().st_size > 1000
        assert f"alt='{fig}.png'" in html
    assert "data:image/png;base64," in html and "<img" in html and 'src="' not in html  # self-contained


def test_compare_two_runs(run):
    p = mpirun(2, "analyze", str(run / "run"), "--compare", str(run / "run" / "trajectory.h5"), "--out",
               str(run / "cmp"), "--skip", "landscape,interpolation,density", "--curvature-samples", "60",
               "--trace-max-probes", "20", "--top-k", "2", "--lanczos-steps", "10", "--sharpness-steps", "3")
    assert "comparison:" in p.stdout
    html = (run / "cmp" / "compare.html").read_text()
    assert "compare_curves.png" in html and "compare_sharpness.png" in html and "compare_pca.png" in html
    assert "run (2)" in html  # two runs of the same name get distinct labels


def test_bad_inputs_are_clear_errors(tmp_path):
    from hpcopt.analyze.source import load_run
    from hpcopt.io.inspect import TrajectoryError

    (tmp_path / "x.h5").write_text("hello")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["data"] = np.arange(3)
    with h5py.File(tmp_path / "future.h5", "w") as f:
        f.attrs["format"] = "hpcopt.trajectory"
        f.attrs["schema_version"] = 99
    with h5py.File(tmp_path / "damaged.h5", "w") as f:
        f.attrs["format"] = "hpcopt.trajectory"
        f.attrs["schema_version"] = 2
        f.attrs["config"] = "[run]\n"
    for name, message in [("nope.h5", "does not exist"), ("x.h5", "not a readable HDF5 file"),
                          ("other.h5", "not an hpcopt trajectory"), ("future.h5", "schema version 99"),
                          ("damaged.h5", "damaged or incomplete trajectory")]:
        with pytest.raises(TrajectoryError, match=message):
            load_run(tmp_path / name)
    p = hpcopt("analyze", str(tmp_path / "other.h5"), "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "hpcopt analyze: error:" in p.stderr and "not an hpcopt trajectory" in p.stderr
    # under mpirun every rank finds the error, rank 0 alone reports it, and nobody waits
    p = mpirun(3, "analyze", str(tmp_path / "future.h5"), "--out", str(tmp_path / "o"), check=False, timeout=60)
    assert p.returncode == 2 and p.stderr.count("schema version 99") == 1, p.stderr


def test_bad_options_and_a_foreign_results_file(run, tmp_path):
    import argparse

    from hpcopt.analyze.cli import add_parser, options_from

    parser = argparse.ArgumentParser()
    add = add_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(ValueError, match="--grid must look like 21x21"):
        options_from(parser.parse_args(["analyze", "f.h5", "--grid", "7by5"]))
    with pytest.raises(ValueError, match="unknown part.s. to skip: hessain"):
        options_from(parser.parse_args(["analyze", "f.h5", "--skip", "hessain"]))
    assert options_from(parser.parse_args(["analyze", "f.h5", "--grid", "7x5"])).grid == (7, 5)
    assert add.prog.endswith("analyze")
    p = hpcopt("analyze", str(run / "run"), "--at", "worker:9", "--out", str(tmp_path / "o"),
               "--skip", "trajectory,pca")
    assert p.returncode == 2 and "worker 9 has no recorded snapshot" in p.stderr
    (tmp_path / "f").mkdir()
    with h5py.File(tmp_path / "f" / "analysis.h5", "w") as f:
        f["x"] = 1
    p = mpirun(2, "analyze", str(run / "run"), "--out", str(tmp_path / "f"), check=False, timeout=60)
    assert p.returncode == 2 and p.stderr.count("is not an hpcopt analysis file") == 1


def test_a_second_analysis_writing_the_same_results_file_is_refused(run, tmp_path):
    """Two `hpcopt analyze` at once on one --out corrupted analysis.h5 (a bad heap free list: every
    result lost). The writer holds a lock; the second says so (exit 2) and touches nothing."""
    from hpcopt.analyze.store import open_results, read_results

    out = tmp_path / "o"
    f = open_results(out / "analysis.h5", "first")  # an analysis writing now
    f["mine"] = np.arange(3)
    f.flush()
    p = hpcopt("analyze", str(run / "run"), "--out", str(out), "--skip", "pca")
    assert p.returncode == 2 and "is being written by another hpcopt analyze" in p.stderr, p.stdout + p.stderr
    f.close()
    assert list(read_results(out / "analysis.h5")["mine"]) == [0, 1, 2]
    open_results(out / "analysis.h5", "again").close()  # released by close()


def test_the_analysis_of_another_run_in_the_same_out_is_refused(run, tmp_path):
    """Analysing run B into run A's --out kept A's grids and measures beside B's, where they read
    as B's. The results file names its run; another run's analysis is refused and kept."""
    from hpcopt.analyze.store import open_results, read_results

    out = tmp_path / "o"
    with open_results(out / "analysis.h5", "elsewhere/trajectory.h5", "0123abcd") as f:
        f["mine"] = np.arange(3)
    p = hpcopt("analyze", str(run / "run"), "--out", str(out), "--skip", "pca")
    assert p.returncode == 2 and "holds the analysis of another run" in p.stderr, p.stdout + p.stderr
    assert list(read_results(out / "analysis.h5")["mine"]) == [0, 1, 2]
    with open_results(out / "analysis.h5", "elsewhere/trajectory.h5", "0123abcd"):
        pass  # the same run goes on in it


def test_saved_models_by_name_also_across_runs(run):
    from hpcopt.analyze.source import load_run, point, resolve_point

    r = load_run(run / "run")
    with h5py.File(run / "run" / "trajectory.h5", "r") as f:
        center, workers, meta = f["center/params"][()], f["workers/params"][()], f["workers/meta"][()]
    assert np.array_equal(point(r, "center")[1], center[-1]) and np.array_equal(point(r, "init")[1], center[0])
    assert np.array_equal(point(r, "center:3")[1], center[3])
    rows = np.flatnonzero(meta["worker_id"] == 1)
    assert np.array_equal(point(r, "worker:1")[1], workers[rows[-1]])
    assert np.array_equal(point(r, "worker:1:0")[1], workers[rows[0]])
    label, other = resolve_point(r, f"{run / 'run' / 'trajectory.h5'}#worker:0")
    assert label == "run#worker:0" and np.array_equal(other, workers[np.flatnonzero(meta["worker_id"] == 0)[-1]])
    for bad in ("centre", "worker:7", "center:100000"):
        with pytest.raises(ValueError):
            point(r, bad)


def test_python_api_on_a_run_that_has_only_just_started(run, tmp_path):
    """One center snapshot, no worker snapshot, status running: the API (one process, no MPI)
    analyses what there is and leaves PCA out."""
    import shutil

    from hpcopt.analyze import AnalyzeOptions, analyze

    path = tmp_path / "young.h5"
    shutil.copy(run / "run" / "trajectory.h5", path)
    with h5py.File(path, "a") as f:
        for name in ("center/params", "center/meta"):
            f[name].resize(1, axis=0)
        for name in ("workers/params", "workers/meta"):
            f[name].resize(0, axis=0)
        f.attrs["status"] = "running"
    res = analyze(str(path), AnalyzeOptions(out=str(tmp_path / "o"), skip=("hessian", "sharpness"), grid=(3, 2),
                                            line_points=3, interp_points=3))
    assert res["complete"] and "pca" not in res and "pca_2d" not in res["grids"]
    assert res["grids"]["random_2d"]["done"].all() and list(res["grids"]) == ["random_1d", "random_2d", "interp_0"]
    assert res["grids"]["interp_0"]["barrier"]["barrier"] == 0.0  # init -> center: the same point here
    assert (tmp_path / "o" / "report.html").exists()


# ---- --device: where the analysis computes. On a machine without a GPU (CUDA_VISIBLE_DEVICES=""
# hides a GPU from a machine that has one, so these run everywhere) `--device auto` is the CPU and
# gives the numbers of `--device cpu` bit for bit, and `--device cuda` is a clear error (exit
# status 2) before anything is written, reported once under mpirun. On a machine with a GPU the
# last test also runs the analysis there and compares it with the CPU's.

NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}
TIMING = {"seconds", "cpu_seconds"}  # attributes that measure time, not the analysis
# every part that computes with the model, small; several batches per pass, so the sums over
# batches (kept on the device) are exercised
DEVICE_ARGS = ["--grid", "4x3", "--line-points", "3", "--interp-points", "3", "--samples", "150", "--batch", "64",
               "--curvature-samples", "100", "--top-k", "2", "--lanczos-steps", "8", "--trace-max-probes", "12",
               "--density", "--density-runs", "1", "--density-steps", "6", "--sharpness-steps", "3", "--no-report",
               "--no-progress", "--timeout", "60"]


def contents(path) -> dict:
    """Every dataset and attribute of an analysis file but the timings, by path."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            out.update({f"{name}@{k}": np.asarray(v) for k, v in obj.attrs.items() if k not in TIMING})
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
        visit("/", f)
        f.visititems(visit)
    return out


def analyze_into(run, out: str, *flags: str, env: dict | None = None):
    p = hpcopt("analyze", str(run / "run"), "--out", str(run / out), *DEVICE_ARGS, *flags, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    return p, contents(run / out / "analysis.h5")


def test_auto_without_a_gpu_is_the_cpu_bit_for_bit(run):
    p_cpu, cpu = analyze_into(run, "cpu", "--device", "cpu", env=NO_GPU)
    p_auto, auto = analyze_into(run, "auto", env=NO_GPU)  # auto is the default
    assert "[hpcopt analyze] device CPU (--device cpu)" in p_cpu.stdout
    assert "[hpcopt analyze] device CPU (no GPU available)" in p_auto.stdout
    assert {"curvature/eigenvalues", "curvature/trace_samples", "curvature/density/nodes", "curvature/sharpness@value",
            "grids/random_2d/loss", "grids/random_2d/accuracy", "grids/interp_0/loss"} <= set(cpu)
    assert set(cpu) == set(auto)
    for k in cpu:
        assert cpu[k].dtype == auto[k].dtype and np.array_equal(cpu[k], auto[k], equal_nan=cpu[k].dtype.kind == "f"), k
    assert np.isfinite(cpu["grids/random_2d/loss"]).all() and cpu["grids/random_2d/done"].all()
    # the summary printed from those numbers: the same too, but for the timing and the paths

    def summary(p):
        return [ln for ln in p.stdout.splitlines()[1:] if not ln.startswith(("==", "  results"))]

    assert summary(p_cpu) == summary(p_auto) and any("top Hessian eigenvalues" in ln for ln in summary(p_cpu))


def test_cuda_without_a_gpu_is_a_clear_error(run, tmp_path):
    p = hpcopt("analyze", str(run / "run"), "--out", str(tmp_path / "one"), *DEVICE_ARGS, "--device", "cuda",
               env=NO_GPU)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "hpcopt analyze: error: --device cuda: rank 0 on" in p.stderr and "has no GPU" in p.stderr, p.stderr
    assert "use --device auto or --device cpu" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "one").exists()  # found before anything is written
    # under mpirun every rank finds it, rank 0 alone says so, and nobody waits for the others
    p = mpirun(2, "analyze", str(run / "run"), "--out", str(tmp_path / "two"), *DEVICE_ARGS, "--device", "cuda",
               check=False, timeout=90, env=NO_GPU)
    assert p.returncode == 2 and p.stderr.count("has no GPU") == 1, p.stdout + p.stderr
    assert not (tmp_path / "two").exists()
    p = hpcopt("analyze", str(run / "run"), "--device", "gpu", env=NO_GPU)
    assert p.returncode == 2 and "invalid choice: 'gpu'" in p.stderr, p.stderr


def test_options_reject_an_unknown_device():
    from hpcopt.analyze import AnalyzeOptions

    assert AnalyzeOptions().device == "auto"
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda, got 'gpu'"):
        AnalyzeOptions(device="gpu")


def test_auto_and_cuda_take_the_gpu_of_the_node_local_rank(monkeypatch):
    """The rule alone, in this process, with CUDA said to have 2 GPUs: node-local rank 3 -> cuda:1."""
    from hpcopt.analyze.api import choose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    lines: list[str] = []
    assert choose_device("auto", log=lines.append) == "cuda:1" == choose_device("cuda")
    assert choose_device("cpu", log=lines.append) == "cpu"
    assert lines == ["[hpcopt analyze] device cuda:1 (GPU 1), node-local rank 3 (OMPI_COMM_WORLD_LOCAL_RANK)",
                     "[hpcopt analyze] device CPU (--device cpu)"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # the GPU as the user knows it
    choose_device("auto", log=lines.append)
    assert lines[-1].startswith("[hpcopt analyze] device cuda:1 (GPU 7)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto") == "cpu"
    with pytest.raises(ValueError, match="--device cuda: rank 0 on .* has no GPU"):
        choose_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_numbers_agree_with_the_cpu(run):
    """float32 on both, in other orders of summation: equal to rounding, not bit for bit."""
    _, cpu = analyze_into(run, "gpu_ref", "--device", "cpu")
    for flags in (["--device", "cuda"], []):
        p, gpu = analyze_into(run, f"gpu{len(flags)}", *flags)
        assert "[hpcopt analyze] device cuda:0 (GPU " in p.stdout, p.stdout
        for name in ("random_1d", "random_2d", "pca_2d", "interp_0", "interp_1"):
            np.testing.assert_allclose(gpu[f"grids/{name}/loss"], cpu[f"grids/{name}/loss"], rtol=1e-5, atol=1e-6)
            # a sample exactly between two classes may go either way: at most one of 150 differs
            np.testing.assert_allclose(gpu[f"grids/{name}/accuracy"], cpu[f"grids/{name}/accuracy"], atol=1.5 / 150)
        np.testing.assert_allclose(gpu["curvature/eigenvalues"], cpu["curvature/eigenvalues"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(gpu["curvature/sharpness@loss"], cpu["curvature/sharpness@loss"], rtol=1e-5)
        n = min(len(gpu["curvature/trace_samples"]), len(cpu["curvature/trace_samples"]))
        np.testing.assert_allclose(gpu["curvature/trace_samples"][:n], cpu["curvature/trace_samples"][:n],
                                   rtol=1e-4, atol=1e-4)
    p = mpirun(2, "analyze", str(run / "run"), "--out", str(run / "gpu_mpi"), *DEVICE_ARGS)
    assert "ranks on a GPU" in p.stdout, p.stdout
