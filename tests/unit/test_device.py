"""GPU binding: what each rank would choose under simulated Slurm / Open MPI / CUDA settings."""

import pytest

from hpcopt.launch.device import (
    choose_device,
    gpu_id,
    local_rank_from_env,
    mpi_cuda_support,
    parse_visible_devices,
    select_device,
)


@pytest.mark.parametrize("value, ids", [
    (None, None), ("", []), ("0", ["0"]), ("2,3", ["2", "3"]), (" 1 , 0 ", ["1", "0"]),
    ("-1", []), ("NoDevFiles", []), ("0,-1,2", ["0"]), ("GPU-8a3f,GPU-77b1", ["GPU-8a3f", "GPU-77b1"]),
])
def test_parse_visible_devices(value, ids):
    assert parse_visible_devices(value) == ids


def test_each_worker_of_a_node_takes_its_own_gpu():
    # 4 workers on a node with 4 GPUs (Slurm --gpus-per-node=4 sets CUDA_VISIBLE_DEVICES=0,1,2,3)
    visible = parse_visible_devices("0,1,2,3")
    assert [choose_device(r, visible, 4) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    # first node: 1 server (local rank 0, on the CPU) then 4 workers at local ranks 1..4: still 4 GPUs
    assert sorted(choose_device(r, visible, 4) for r in range(1, 5)) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]


def test_cuda_visible_devices_is_respected():
    # the job may see GPUs 4..7 only: torch numbers them 0..3, the log names the real ones
    visible = parse_visible_devices("4,5,6,7")
    devices = [choose_device(r, visible, 4) for r in range(4)]
    assert [gpu_id(d, visible) for d in devices] == ["4", "5", "6", "7"]
    # --gpu-bind=single:1 / --gpus-per-task=1: each task sees one GPU, whatever its local rank
    assert choose_device(3, ["6"], 1) == "cuda:0" and gpu_id("cuda:0", ["6"]) == "6"
    # a list longer than what CUDA finds is capped by CUDA's count
    assert choose_device(3, ["0", "1", "2", "3"], 2) == "cuda:1"


@pytest.mark.parametrize("visible, n_gpus", [(None, 0), ("", 8), ("-1", 8), ("0,1", 0)])
def test_no_gpu_means_cpu(visible, n_gpus):
    assert choose_device(2, parse_visible_devices(visible), n_gpus) == "cpu"
    assert gpu_id("cpu", None) is None


def test_more_workers_than_gpus_share_round_robin():
    assert [choose_device(r, None, 2) for r in range(5)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]


def test_bad_local_rank_is_an_error():
    with pytest.raises(ValueError, match="-1"):
        choose_device(-1, None, 2)


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_LOCALID": "3"}, (3, "SLURM_LOCALID")),                               # srun --mpi=pmix
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "2"}, (2, "OMPI_COMM_WORLD_LOCAL_RANK")),     # mpirun
    # mpirun inside sbatch: every rank inherits SLURM_LOCALID=0 from the srun that started mpirun's daemon
    ({"SLURM_LOCALID": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, (1, "OMPI_COMM_WORLD_LOCAL_RANK")),
    ({"MPI_LOCALRANKID": "5"}, (5, "MPI_LOCALRANKID")),                           # MPICH / Intel MPI
    ({"SLURM_LOCALID": ""}, None), ({}, None),
])
def test_local_rank_from_env(env, expected):
    assert local_rank_from_env(env) == expected


def test_select_device_under_simulated_slurm_gpus():
    lines = []
    # node 2 of a --gpus-per-node=2 job: Slurm gave CUDA_VISIBLE_DEVICES=2,3; srun's local ranks 0 and 1
    env = {"SLURM_LOCALID": "1", "CUDA_VISIBLE_DEVICES": "2,3", "SLURMD_NODENAME": "n2",
           "HPCOPT_CUDA_AWARE_MPI": "0"}
    choice = select_device("worker", environ=env, n_gpus=2, log=lines.append)
    assert (choice.device, choice.gpu, choice.local_rank, choice.staging) == ("cuda:1", "3", 1, "pinned-host")
    assert lines == [("[hpcopt worker on n2] device cuda:1 (GPU 3), node-local rank 1 (SLURM_LOCALID); "
                      "MPI is not CUDA-aware: parameters are staged through pinned host memory")]
    aware = select_device("worker", environ={**env, "HPCOPT_CUDA_AWARE_MPI": "1"}, n_gpus=2)
    assert aware.staging == "device" and aware.cuda_aware_mpi


def test_servers_stay_on_the_cpu_by_default():
    env = {"SLURM_LOCALID": "0", "CUDA_VISIBLE_DEVICES": "0,1"}
    server = select_device("server", environ=env, n_gpus=2)
    assert server.device == "cpu" and server.staging == "none" and server.gpu is None
    assert select_device("server", environ=env, n_gpus=2, servers_on_gpu=True).device == "cuda:0"
    with pytest.raises(ValueError, match="coordinator"):
        select_device("coordinator", environ=env, n_gpus=2)


def test_cpu_only_machine():
    # this machine: the real torch count, no launcher variables
    choice = select_device("worker", environ={})
    assert choice.local_rank_source == "default"
    assert choice.device == "cpu" or choice.device.startswith("cuda:")


def test_cuda_awareness_override_and_detection():
    assert mpi_cuda_support({"HPCOPT_CUDA_AWARE_MPI": "1"}) is True
    assert mpi_cuda_support({"HPCOPT_CUDA_AWARE_MPI": "no"}) is False
    assert isinstance(mpi_cuda_support({}), bool)  # Debian's Open MPI: built without CUDA -> False
