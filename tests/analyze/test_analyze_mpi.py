"""`hpcopt analyze` end to end under real `mpirun` with real files: a grid on a non-square grid
against a brute-force loop, the same file on 1 and 3 ranks, an interrupted grid that resumes,
distributed Hessian-vector products against the exact Hessian, the report, and clear errors."""

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
