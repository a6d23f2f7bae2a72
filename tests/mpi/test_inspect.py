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


def test_a_damaged_trajectory_is_a_clear_error_not_a_traceback(tmp_path):
    """A trajectory whose format is right but whose contents are garbled (a byte flipped in its
    metadata: a field or an attribute gone, an attribute of the wrong kind) gave KeyError,
    ValueError ('no field of name worker_id') or MemoryError tracebacks with exit 1."""
    cases = {
        "no-exchanges": lambda f: f.__delitem__("exchanges"),
        "no-field": lambda f: (f.__delitem__("exchanges"), f.create_dataset("exchanges", data=np.zeros(3))),
        "bad-attr": lambda f: f.attrs.__setitem__("n_parameters", "many"),
        "bad-hosts": lambda f: f.attrs.__setitem__("hosts", "{not json"),
    }
    for name, damage in cases.items():
        path = tmp_path / f"{name}.h5"
        with h5py.File(path, "w") as f:
            f.attrs["format"] = "hpcopt.trajectory"
            f.attrs["schema_version"] = 1
            for k, v in {"method": "easgd", "n_parameters": 3, "n_servers": 1, "tau": 4, "alpha": 0.1,
                         "hosts": "{}"}.items():
                f.attrs[k] = v
            f["exchanges"] = np.zeros(2, dtype=[("worker_id", "<i4"), ("samples", "<i8"), ("bytes", "<i8")])
            f["evals"] = np.zeros(1, dtype=[("test_accuracy", "<f8"), ("test_loss", "<f8")])
            f["events"] = np.zeros(0, dtype=[("kind", "S8")])
            f["center/params"] = np.zeros((1, 3), np.float32)
            f["workers/params"] = np.zeros((0, 3), np.float32)
            damage(f)
        p = hpcopt("inspect", str(path))
        assert p.returncode == 2 and "is damaged" in p.stderr and "Traceback" not in p.stderr, (name, p.stderr)
