"""Flat parameter/gradient buffers and the model/data loaders (no MPI)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpcopt.data import load_data
from hpcopt.models import CNN1D, FlatModel, build_model


def test_cnn1d_has_the_papers_size():
    assert sum(p.numel() for p in CNN1D().parameters()) == 5210


def test_flat_model_views_share_memory_and_grads_accumulate_in_place():
    torch.manual_seed(0)
    ref = CNN1D()
    flat = FlatModel(CNN1D())
    flat.params.copy_(torch.cat([p.detach().reshape(-1) for p in ref.parameters()]))
    x, y = torch.randn(8, 40), torch.randint(0, 10, (8,))
    F.cross_entropy(ref(x), y).backward()
    flat.zero_grad()
    F.cross_entropy(flat.module(x), y).backward()
    want = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    torch.testing.assert_close(flat.grads, want)
    flat.params.add_(1.0)  # the module sees changes to the flat buffer
    torch.testing.assert_close(flat.module.conv1.bias, ref.conv1.bias + 1.0)
    layout = flat.layout()
    assert layout["offsets"][1] == 25 * 5 and layout["names"][0] == "conv1.weight"


def test_flat_model_moves_into_given_storage():
    torch.manual_seed(0)
    flat = FlatModel(CNN1D())
    before = flat.params.clone()
    x, y = torch.randn(8, 40), torch.randint(0, 10, (8,))
    out = flat.module(x)
    storage = torch.zeros(flat.numel)  # e.g. a shared-memory window
    flat.place(storage)
    assert flat.params.data_ptr() == storage.data_ptr()
    torch.testing.assert_close(storage, before)
    torch.testing.assert_close(flat.module(x), out)
    storage.mul_(0.5)  # the module reads the storage, and gradients still land in flat.grads
    assert flat.module.conv1.weight.data_ptr() == storage.data_ptr()
    flat.zero_grad()
    F.cross_entropy(flat.module(x), y).backward()
    assert flat.grads.abs().sum() > 0
    with pytest.raises(ValueError, match="storage for 5210 float32"):
        flat.place(torch.zeros(10))


def test_model_loader_errors():
    with pytest.raises(ValueError, match="not a built-in"):
        build_model("resnet9000")
    with pytest.raises(ValueError, match="cannot import module"):
        build_model("no_such_module_xyz:model")
    with pytest.raises(ValueError, match="does not accept kwargs"):
        build_model("cnn1d", {"width": 3})


def test_mnist1d_is_generated_locally_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCOPT_CACHE", str(tmp_path))
    d = load_data("mnist1d", 5)
    assert d["x_train"].shape == (4000, 40) and d["x_test"].shape == (1000, 40)
    assert d["x_train"].dtype == np.float32 and set(np.unique(d["y_train"])) == set(range(10))
    [kept] = tmp_path.glob("mnist1d-*-seed5.npz")  # and no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.name]
    again = load_data("mnist1d", 5)  # from the cache: the very same bits
    assert all(np.array_equal(again[k], d[k]) and again[k].dtype == d[k].dtype for k in d)
    kept.write_bytes(kept.read_bytes()[:5000])  # half written (by hand: the cache writes atomically)
    again = load_data("mnist1d", 5)  # generated again, and the cache rewritten
    assert all(np.array_equal(again[k], d[k]) for k in d) and kept.stat().st_size > 5000
    # the generator seeds the global NumPy generator: a cache hit or miss must leave it alike
    np.random.seed(1)
    load_data("mnist1d", 5)
    hit = np.random.rand()
    kept.unlink()
    np.random.seed(1)
    load_data("mnist1d", 5)
    assert np.random.rand() == hit
    monkeypatch.setenv("HPCOPT_CACHE", "off")
    kept.unlink()
    load_data("mnist1d", 5)
    assert not kept.exists()
    monkeypatch.setenv("HPCOPT_CACHE", str(tmp_path / "c2"))
    (tmp_path / "c2" / kept.name).mkdir(parents=True)  # a name it cannot be renamed to
    load_data("mnist1d", 5)  # generated; the failed write's temporary removed
    assert [p.name for p in (tmp_path / "c2").iterdir()] == [kept.name]


def test_hdf5_data_file(tmp_path):
    import h5py

    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["x_train"] = np.ones((6, 40), np.float64)
        f["y_train"] = np.arange(6)
        f["x_test"] = np.ones((2, 40))
    with pytest.raises(ValueError, match="lacks dataset"):
        load_data(str(path))
    with h5py.File(path, "a") as f:
        f["y_test"] = np.arange(2)
    d = load_data(str(path))
    assert d["x_train"].dtype == np.float32 and d["y_test"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="does not exist"):
        load_data(str(tmp_path / "nope.h5"))
