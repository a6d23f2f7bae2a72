"""A checkpoint or a worker state with one flipped bit in a weight (finite, so no other check
sees it) is refused as corrupt instead of being trained from."""

import h5py
import numpy as np
import pytest
import torch

from hpcopt.io import checkpoint

LAYOUT = {"names": ["w"], "shapes": [[100]]}


def _write(path, center):
    checkpoint.write(path, center=center, workers=[(0, 10, 2, 0.5, 1.0)], latest={0: center + 1},
                     attrs={"n_parameters": center.size, "layout": LAYOUT, "method": "easgd", "exchanges": 2,
                            "trajectory_sizes": {}})


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_a_flipped_bit_in_the_checkpoint_center_is_refused(tmp_path):
    path = tmp_path / "checkpoint.h5"
    center = np.linspace(-1, 1, 100, dtype=np.float32)
    _write(path, center)
    got = checkpoint.read(path, n_parameters=100, layout=LAYOUT, method="easgd")
    assert np.array_equal(got["center"], center) and np.array_equal(got["latest"][0], center + 1)
    with h5py.File(path, "r") as f:
        offset = f["center"].id.get_chunk_info(0).byte_offset
    _flip(path, offset + 41)  # the low byte of a weight: still a finite number
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):  # the whole file's checksum
        checkpoint.read(path, n_parameters=100, layout=LAYOUT, method="easgd")
    checkpoint.sums_path(path).unlink()  # a checkpoint written before it: Fletcher-32 still refuses it
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint.read(path, n_parameters=100, layout=LAYOUT, method="easgd")


def test_any_changed_byte_of_the_checkpoint_is_refused_before_hdf5_reads_it(tmp_path):
    """A byte changed in the file's metadata (outside Fletcher-32's chunks) made h5py segfault,
    spin for minutes, or return a center half of zeros. Every byte of the file, one at a time."""
    path = tmp_path / "checkpoint.h5"
    center = np.linspace(-1, 1, 100, dtype=np.float32)
    _write(path, center)
    good = path.read_bytes()
    for offset in range(len(good)):
        _flip(path, offset)
        with pytest.raises(checkpoint.CheckpointError, match="damaged"):
            checkpoint.read(path, n_parameters=100, layout=LAYOUT, method="easgd")
        path.write_bytes(good)
    assert np.array_equal(checkpoint.read(path, n_parameters=100, layout=LAYOUT, method="easgd")["center"], center)


def test_a_crash_between_the_checksum_and_the_rename_leaves_a_checkpoint_that_reads(tmp_path):
    path = tmp_path / "checkpoint.h5"
    a, b, c = (np.full(100, v, dtype=np.float32) for v in (1.0, 2.0, 3.0))
    _write(path, a)
    old = path.read_bytes()
    _write(path, b)
    path.write_bytes(old)  # as if killed after the checksum file was written, before the rename
    assert checkpoint.read(path, n_parameters=100, layout=LAYOUT, method="easgd")["center"][0] == 1.0
    _write(path, b)
    _write(path, c)  # only the newest two digests stay: the first one no longer passes
    path.write_bytes(old)
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        checkpoint.read(path, n_parameters=100, layout=LAYOUT, method="easgd")


def test_a_damaged_checksum_file_is_refused(tmp_path):
    path = tmp_path / "checkpoint.h5"
    _write(path, np.zeros(100, dtype=np.float32))
    checkpoint.sums_path(path).write_text("{garbage")
    with pytest.raises(checkpoint.CheckpointError, match="cannot be trusted"):
        checkpoint.read(path, n_parameters=100, layout=LAYOUT, method="easgd")


def test_a_flipped_bit_in_a_worker_state_is_refused(tmp_path):
    path = tmp_path / "0.pt"
    params = torch.linspace(-1, 1, 1000)
    momentum = {"buf": torch.ones(1000), "lr": 0.1}
    checkpoint.save_worker_state(path, step=7, exchange=3, params=params, trainer_state=momentum)
    said = []
    state = checkpoint.load_worker_state(path, 1000, log=said.append)
    assert state["step"] == 7 and torch.equal(state["params"], params) and not said
    raw = path.read_bytes()
    _flip(path, raw.find(params.numpy().tobytes()[400:416]) + 1)
    assert checkpoint.load_worker_state(path, 1000, log=said.append) is None
    assert "checksum does not match" in said[0]


def test_worker_states_saved_in_the_background_land_in_order_and_are_copies(tmp_path):
    """The saver copies the parameters when asked (training goes on changing them while the
    thread writes), waits for the previous write before the next, and its files load."""
    path = tmp_path / "0.pt"
    saver = checkpoint.WorkerStateSaver(path, every=0.0)
    params = torch.zeros(200_000)
    for step in range(1, 6):
        params.fill_(step)
        saver.save(step=step, exchange=step, params=params, trainer_state={"buf": params.clone()})
        params.fill_(-1.0)  # the training moves on at once: the saved copy must not see it
    saver.save(step=6, exchange=6, params=params, trainer_state={}, wait=True)
    assert not saver.busy
    state = checkpoint.load_worker_state(path, 200_000)
    assert state["step"] == 6 and torch.equal(state["params"], torch.full((200_000,), -1.0))
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_worker_state_saver_that_cannot_write_says_so_once_and_goes_on(tmp_path):
    said = []
    saver = checkpoint.WorkerStateSaver(tmp_path / "missing" / "0.pt", every=0.0, log=said.append, who="worker 3")
    for step in range(3):
        saver.save(step=step, exchange=step, params=torch.ones(10), trainer_state={}, wait=True)
    assert saver.failed and len(said) == 1 and said[0].startswith("worker 3: cannot save its state")


def test_a_worker_state_save_is_paced_by_its_own_cost(tmp_path, monkeypatch):
    """A save that took d seconds allows the next no sooner than 49 d after it ended (2% of the
    worker's time), however small record.checkpoint_seconds is."""
    import time

    real, ended = checkpoint.write_worker_state, []

    def slow(path, state):  # a write that takes at least 50 ms
        real(path, state)
        time.sleep(0.05)
        ended.append(time.monotonic())

    monkeypatch.setattr(checkpoint, "write_worker_state", slow)
    saver = checkpoint.WorkerStateSaver(tmp_path / "0.pt", every=0.0)
    saver.save(step=1, exchange=1, params=torch.ones(10), trainer_state={}, wait=True)
    assert saver.next_at >= ended[0] + 49 * 0.05


def test_a_worker_state_saver_on_a_full_disk_says_so_once_and_leaves_no_file(tmp_path):
    """A real full file system: torch's writer reports ENOSPC as a RuntimeError, not an OSError;
    the worker must still say once that it cannot save, and leave no temporary file behind."""
    import subprocess

    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root in a machine that allows it)")
    try:
        said = []
        saver = checkpoint.WorkerStateSaver(where / "0.pt", every=0.0, log=said.append, who="worker 1")
        for step in range(3):
            saver.save(step=step, exchange=step, params=torch.ones(100_000), trainer_state={}, wait=True)
        assert saver.failed and len(said) == 1 and said[0].startswith("worker 1: cannot save its state"), said
        assert list(where.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_worker_state_saver_removes_a_write_an_earlier_process_left(tmp_path):
    (tmp_path / ".worker-00001.pt.12345.tmp").write_bytes(b"half")
    (tmp_path / ".worker-00002.pt.12345.tmp").write_bytes(b"another worker's")
    checkpoint.WorkerStateSaver(tmp_path / "worker-00001.pt", every=1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".worker-00002.pt.12345.tmp"]
