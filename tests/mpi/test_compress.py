"""Compressed exchanges (comm.compress): references that stay bit-identical on both sides and
match a NumPy replay, hostile payloads that cost only their sender, and real trainings."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import ROOT, hpcopt, mpi_env
from test_elastic import QUAD, events, finish, launch, status, stop, wait_for

SCRIPTS = Path(__file__).resolve().parent / "scripts"


def _mpirun(n, script, *args):
    p = subprocess.run(["mpirun", "-n", str(n), sys.executable, str(SCRIPTS / script), *map(str, args)],
                       capture_output=True, text=True, timeout=120, env=mpi_env())
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "int2", "top8"])
def test_references_stay_identical_and_match_a_numpy_replay(tmp_path, fmt):
    """40 exchanges, every 7th plain, one shard in place and one over messages: the worker's
    parameters equal the replay after every exchange (checked in the script), and at the end
    the worker's reference, the server's and the replay's are the same bits, as are the centers."""
    _mpirun(3, "compressed_exchange.py", tmp_path, fmt)
    load = lambda name: np.load(tmp_path / f"{name}.npy")  # noqa: E731
    np.testing.assert_array_equal(load("worker_ref"), load("server1_ref"))
    np.testing.assert_array_equal(load("worker_ref"), load("replay_ref"))
    center = np.concatenate([load("server0_center"), load("server1_center")])
    np.testing.assert_array_equal(center, load("replay_center"))
    with h5py.File(tmp_path / "compressed.h5", "r", locking=False) as f:
        sent = f["exchanges"]["bytes"][()]
    assert len(sent) == 40 and sent.min() < sent.max()  # compressed rows carry fewer bytes than plain ones


@pytest.mark.parametrize("fmt,mode", [("int2", "moves"), ("top8", "moves"), ("int4", "ahead")])
def test_an_exchange_can_hand_back_the_move_alone(tmp_path, fmt, mode):
    """comm.overlap's paths: both shards over messages, the worker asks for the move only
    (moves: on a GPU; ahead: on the CPU, encoded before and applied after by the training's
    thread), checked against the replay in the script; the references still agree at the end."""
    _mpirun(3, "compressed_exchange.py", tmp_path, fmt, mode)
    load = lambda name: np.load(tmp_path / f"{name}.npy")  # noqa: E731
    np.testing.assert_array_equal(load("worker_ref")[-len(load("server1_ref")):], load("server1_ref"))
    np.testing.assert_array_equal(load("worker_ref"), load("replay_ref"))
    np.testing.assert_array_equal(np.concatenate([load("server0_center"), load("server1_center")]),
                                  load("replay_center"))


def test_hostile_compressed_messages_cost_only_their_sender(tmp_path):
    """A compressed exchange without a reference in common, one whose scale is NaN, a DONE in
    the middle of an exchange (the server used to wait for it forever), two exchange headers at
    once (it used to abort the job): each sender is dropped, the center stays finite, the server
    ends normally."""
    _mpirun(5, "bad_compressed.py", tmp_path)
    kinds = [e[0] for e in events(tmp_path / "bad-compressed.h5")]
    assert kinds.count("crash") == 4


@pytest.mark.parametrize("overlap", ["false", "true"])
def test_a_compressed_cnn_training_learns_with_fewer_bytes(tmp_path, overlap):
    """MNIST-1D CNN, 2 workers over messages, int4, with and without overlap: it learns, with
    several times fewer bytes than float32 parameters would take. These short asynchronous runs
    are not deterministic: measured on a quiet machine, 84.5-94.6% without overlap (12 runs, median
    92.9) and 85.5-94.0% with it (16 runs, median 92.8); 81.7% once with overlap while another test
    ran beside it. So the bar is that it learns (a broken codec stays near chance, 10%), not a
    quality figure."""
    run = tmp_path / "r"
    p = hpcopt("train", "-n", "3", "--config", "configs/mnist1d_easgd.toml", "--out", str(run),
               "--train.epochs", "30", "--comm.shared_memory", "false", "--comm.compress", "int4",
               "--comm.overlap", overlap)
    assert p.returncode == 0, p.stdout + p.stderr
    with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
        acc = float(f["evals"]["test_accuracy"][-1])
        ex = f["exchanges"][()]
        n = int(f.attrs["n_parameters"])
    assert acc > 0.7, acc
    plain = 2 * 4 * n
    assert ex["bytes"].mean() < plain / 4, (ex["bytes"].mean(), plain)


@pytest.mark.parametrize("servers", ["1", "2"])
def test_a_fresh_runs_first_exchanges_are_compressed_too(tmp_path, servers):
    """The workers of a fresh run start from the center the servers start from: with no exact
    snapshot asked for (record.worker_every 0) not one exchange goes plain, the first included,
    on one server and on two (each shard its own reference)."""
    run = tmp_path / "r"
    p = hpcopt("train", "-n", str(int(servers) + 2), "--config", "configs/mnist1d_easgd.toml", "--out", str(run),
               "--run.servers", servers, "--train.epochs", "3", "--comm.shared_memory", "false",
               "--comm.compress", "int4", "--record.worker_every", "0")
    assert p.returncode == 0, p.stdout + p.stderr
    with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
        ex = f["exchanges"][()]
        n = int(f.attrs["n_parameters"])
    assert len(ex) and ex["bytes"].max() < 2 * 4 * n / 4, "a plain exchange although both sides shared the start"
    assert len(set(ex["bytes"].tolist())) == 1  # every one the same compressed size


def test_a_joined_worker_exchanges_compressed_and_the_run_stops_cleanly(tmp_path):
    """Workers started with the run exchange in place; a joiner over messages, compressed (it
    fetches the center first, so it shares a reference at once); every worker overlaps its
    exchanges with its steps. Then a graceful stop, with exchanges in flight."""
    run, log = tmp_path / "r", tmp_path / "train.log"
    proc = launch("train", "-n", "3", "--out", str(run), "--train.epochs", "100000", *QUAD,
                  "--comm.compress", "int8", "--comm.overlap", "true", log=log)
    try:
        wait_for("the first exchanges", lambda: status(run).get("exchanges", 0) > 20, proc, log=log)
        jlog = tmp_path / "join.log"
        joiner = launch("join", str(run), "-n", "1", log=jlog)
        wait_for("the joiner", lambda: any(w["id"] == 2 and w["exchanges"] > 30
                                           for w in status(run).get("workers", [])), proc, log=log)
        stop(proc)
        out = finish(proc, log)
        jout = finish(joiner, jlog)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and joiner.returncode == 0, out + jout
    kinds = [e[0] for e in events(run / "trajectory.h5")]
    assert "crash" not in kinds and "rejected" not in kinds, kinds
    with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
        ex = f["exchanges"][()]
        joined = ex[ex["worker_id"] == 2]
        assert f.attrs["status"] == "stopped"
    assert len(set(joined["bytes"].tolist())) == 2  # compressed rows, and plain (exact, sampled) ones


@pytest.mark.parametrize("method,says", [("lsgd", "does not apply to lsgd"), ("dp-sgd", "dp-sgd's gradients go plain")])
def test_methods_without_compression_refuse_it(method, says):
    p = hpcopt("train", "-n", "3", "--config", f"configs/mnist1d_{method.replace('-', '_')}.toml", "--comm.compress",
               "int8", "--out", "/nonexistent/never")
    assert p.returncode == 2 and says in p.stderr, p.stderr


def test_overlap_is_refused_with_a_deterministic_run():
    p = hpcopt("train", "-n", "3", "--config", "configs/mnist1d_easgd.toml", "--comm.overlap", "true",
               "--run.deterministic", "true", "--out", "/nonexistent/never")
    assert p.returncode == 2 and "comm.overlap" in p.stderr and "deterministic" in p.stderr, p.stderr


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_compressed_averages_give_every_rank_the_same_bits(fmt):
    """Local SGD / DiLoCo's compressed average: 30 rounds on 3 ranks, each checked against a
    NumPy replay of every rank's codec and error feedback; all ranks end with the same bits."""
    _mpirun(3, "compressed_average.py", fmt)


def test_a_compressed_local_sgd_training_learns(tmp_path):
    """int8 on 2 ranks (the plain run: 93.8% in these 20 epochs; int4 lost 17 points here)."""
    run = tmp_path / "r"
    p = hpcopt("train", "-n", "2", "--config", "configs/mnist1d_local_sgd.toml", "--out", str(run),
               "--train.epochs", "20", "--comm.compress", "int8")
    assert p.returncode == 0, p.stdout + p.stderr
    with h5py.File(run / "trajectory.h5", "r", locking=False) as f:
        acc = float(f["evals"]["test_accuracy"][-1])
        sent = f["exchanges"]["bytes"][()]
        n = int(f.attrs["n_parameters"])
    assert acc > 0.9, acc
    assert sent.max() < 2 * 4 * n / 3  # a ring allreduce of float32 on 2 ranks moves 2 x 4n bytes


def test_an_overlapped_worker_sees_a_stop_while_its_exchanges_are_always_in_flight(tmp_path):
    """A stop that reaches only the servers (SIGUSR1 to server 0 alone, as a preemption signal
    might) ends an overlapped run with tau = 1. The review that found the bug (a worker whose
    exchange is always in flight never polled the servers itself, and ignored the STOP its
    exchange thread had taken) showed it with a starved server; here the race is not forced, so
    this test guards the path rather than reproducing the race every time."""
    run, log = tmp_path / "r", tmp_path / "train.log"
    proc = launch("train", "-n", "3", "--out", str(run), "--train.epochs", "100000", *QUAD, "--easgd.tau", "1",
                  "--comm.overlap", "true", "--comm.shared_memory", "false", log=log)
    try:
        wait_for("exchanges", lambda: status(run).get("exchanges", 0) > 50, proc, log=log)
        os.kill(status(run)["pid"], signal.SIGUSR1)  # server 0 only
        out = finish(proc, log, timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    leaves = {e[1]: e[2] for e in events(run / "trajectory.h5") if e[0] == "leave"}
    assert leaves == {0: "stopped by the server", 1: "stopped by the server"}, leaves


def test_overlap_is_refused_with_a_synchronous_method():
    p = hpcopt("train", "-n", "2", "--config", "configs/mnist1d_local_sgd.toml", "--comm.overlap", "true",
               "--out", "/nonexistent/never")
    assert p.returncode == 2 and "asynchronous methods" in p.stderr, p.stderr
