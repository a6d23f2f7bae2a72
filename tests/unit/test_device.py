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
    ({"MV2_COMM_WORLD_LOCAL_RANK": "3", "SLURM_LOCALID": "0"}, (3, "MV2_COMM_WORLD_LOCAL_RANK")),  # MVAPICH2
    ({"PALS_LOCAL_RANKID": "2", "PMIX_LOCAL_RANK": "7"}, (2, "PALS_LOCAL_RANKID")),  # HPE Cray PALS
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
                      "exchanges stage the parameters through pinned host memory, where the center lives")]
    # CUDA-aware MPI is reported, never claimed as used: the center is in the servers' host memory
    aware = select_device("worker", environ={**env, "HPCOPT_CUDA_AWARE_MPI": "1"}, n_gpus=2, log=lines.append)
    assert aware.staging == "pinned-host" and aware.cuda_aware_mpi and "CUDA-aware" in lines[-1]


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


def test_a_launcher_without_a_local_rank_variable_uses_the_node_communicator():
    """PALS-less aprun, a bare `python` per rank, or an unknown launcher: the rank's place in its
    node communicator (which training computes for every rank) picks the GPU, not GPU 0 for all."""
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    picks = [select_device("worker", node_rank=r, environ=env, n_gpus=4) for r in range(1, 5)]
    assert sorted(c.device for c in picks) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert {c.local_rank_source for c in picks} == {"node communicator"}
    # a launcher variable, when there is one, wins over the communicator
    assert select_device("worker", node_rank=3, environ={**env, "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
                         n_gpus=4).device == "cuda:1"


@pytest.mark.parametrize("slurm, expected", [
    # --gpus-per-node=4, 4 tasks per node: every task sees the node's 4 GPUs; local ranks spread them
    ({"SLURM_LOCALID": "2", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "cuda:2"),
    # --gpus-per-task=1: each task sees only its own GPU, whatever its local rank
    ({"SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "3"}, "cuda:0"),
    # --gres=gpu:2 with 4 tasks: two tasks per GPU
    ({"SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "0,1"}, "cuda:1"),
])
def test_binding_under_each_slurm_gpu_request(slurm, expected):
    n = len(slurm["CUDA_VISIBLE_DEVICES"].split(","))
    choice = select_device("worker", environ=slurm, n_gpus=n)
    assert choice.device == expected
    assert choice.gpu == slurm["CUDA_VISIBLE_DEVICES"].split(",")[int(expected[-1])]


def test_mig_instances_go_one_to_each_rank():
    """MIG: CUDA_VISIBLE_DEVICES lists MIG instances by UUID, but a CUDA process enumerates only
    the first it may see; each rank narrows the list to its own (before CUDA starts), then takes
    cuda:0, the only device it sees."""
    mig = "MIG-aa11,MIG-bb22,MIG-cc33"
    picks = []
    for r in range(4):
        env = {"SLURM_LOCALID": str(r), "CUDA_VISIBLE_DEVICES": mig}
        choice = select_device("worker", environ=env, n_gpus=1)
        assert choice.device == "cuda:0"
        assert env["CUDA_VISIBLE_DEVICES"] == choice.gpu  # what CUDA will see in this process
        picks.append(choice.gpu)
    assert picks == ["MIG-aa11", "MIG-bb22", "MIG-cc33", "MIG-aa11"]
    # before MPI starts (a CUDA-aware MPI may start CUDA): the same choice, by the launcher's variable
    from hpcopt.launch.device import narrow_mig_early

    env = {"OMPI_COMM_WORLD_LOCAL_RANK": "2", "CUDA_VISIBLE_DEVICES": mig}
    narrow_mig_early(env)
    assert env["CUDA_VISIBLE_DEVICES"] == "MIG-cc33"
    assert select_device("worker", environ=env, n_gpus=1).gpu == "MIG-cc33"
    env = {"CUDA_VISIBLE_DEVICES": mig}  # no launcher variable: left to select_device's node rank
    narrow_mig_early(env)
    assert env["CUDA_VISIBLE_DEVICES"] == mig
    # servers stay on the CPU and leave the list alone
    env = {"SLURM_LOCALID": "1", "CUDA_VISIBLE_DEVICES": mig}
    assert select_device("server", environ=env).device == "cpu" and env["CUDA_VISIBLE_DEVICES"] == mig


_FAULTS = """
import resource, sys, torch
from hpcopt.launch.device import keep_freed_memory
kept = keep_freed_memory()
w = torch.zeros(3000, 3000, requires_grad=True)  # the wide setting's middle layer: a 36 MB gradient
x = torch.ones(100, 3000)
for _ in range(10):  # until the heap has grown to the pattern of a step (4 steps here)
    (x @ w).sum().backward()
per_step = []  # three windows, the fewest counts: the kernel's reclaim (and DAMON) under a loaded
for _ in range(3):  # machine can take back a page now and then, ~1,700 faults a step once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        (x @ w).sum().backward()  # autograd allocates the gradient anew each time, then adds it in
    per_step.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
print(kept, min(per_step))
"""


@pytest.mark.parametrize("keep", ["1", "0"])
def test_a_step_reuses_the_memory_the_last_one_freed(keep):
    """glibc maps a gradient above its mmap threshold afresh on every backward (~9,000 page
    faults for 36 MB, each zeroed by the kernel); keep_freed_memory lets the heap keep it.
    HPCOPT_KEEP_HEAP=0 leaves glibc's behaviour: the same code page-faults all of it again."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True,
                         env=dict(os.environ, HPCOPT_KEEP_HEAP=keep)).stdout.split()
    kept, faults = out[0] == "True", int(out[1])
    if keep == "1":
        assert kept and faults < 2250, faults  # a quarter of the gradient's 9,000 pages
    else:
        assert not kept and faults > 8000, faults
