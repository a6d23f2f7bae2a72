"""`hpcopt inspect` on files that are not trajectories: clear errors, exit code 2."""

import h5py
import numpy as np

from conftest import hpcopt


def test_missing_file(tmp_path):
    p = hpcopt("inspect", str(tmp_path / "nope.h5"))
    assert p.returncode == 2 and "does not exist" in p.stderr


def test_not_hdf5(tmp_path):
    path = tmp_path / "x.h5"
    path.write_text("hello")
    p = hpcopt("inspect", str(path))
    assert p.returncode == 2 and "not a readable HDF5 file" in p.stderr


def test_foreign_hdf5(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.arange(3)
    p = hpcopt("inspect", str(path))
    assert p.returncode == 2 and "not an hpcopt trajectory" in p.stderr


def test_future_schema(tmp_path):
    path = tmp_path / "future.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "hpcopt.trajectory"
        f.attrs["schema_version"] = 99
    p = hpcopt("inspect", str(path))
    assert p.returncode == 2 and "schema version 99" in p.stderr
