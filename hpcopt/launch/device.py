"""Which device a rank computes on, and how its parameters travel between that device and MPI.

A worker takes the GPU of its node-local rank, among the GPUs it may see (CUDA_VISIBLE_DEVICES, as
Slurm's --gpus-per-node / --gpus-per-task / --gpu-bind or the user set it); servers stay on the CPU
unless asked. The center lives in the servers' host memory, so a GPU worker's parameters are
staged through pinned host memory for every exchange (`HostMirror`), with asynchronous copies;
MPI never sees a GPU pointer, CUDA-aware or not (that is reported, never claimed as used).

    from hpcopt.launch.device import select_device, HostMirror
    choice = select_device("worker", node_rank=r, log=print)   # e.g. device cuda:1
    flat = FlatModel(model, device=choice.device)
    mirror = HostMirror(flat.params)                           # mirror.pull() -> host; mirror.push() -> GPU

The pure pieces (`parse_visible_devices`, `choose_device`, `local_rank_from_env`) take plain values
so they are tested without GPUs or MPI (tests/unit/test_device.py).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# The launcher's node-local rank, most specific first: Open MPI, MVAPICH2, MPICH/Intel MPI (Hydra),
# HPE's PALS (Cray PE), PMIx, Slurm. Under mpirun inside a Slurm job the ranks inherit
# SLURM_LOCALID from the srun that started mpirun's daemon (0 for every rank of a node), so the
# MPI launcher's own variables come first. With none of them, the node communicator decides.
LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                   "PALS_LOCAL_RANKID", "PMIX_LOCAL_RANK", "SLURM_LOCALID")

# HPCOPT_CUDA_AWARE_MPI=1/0 overrides the detection (e.g. for an MPI library it cannot query).
CUDA_AWARE_OVERRIDE = "HPCOPT_CUDA_AWARE_MPI"


@dataclass(frozen=True)
class DeviceChoice:
    """What one rank computes on and how its parameters reach MPI."""

    device: str                  # "cuda:1" or "cpu" (a torch device string)
    gpu: str | None              # the GPU as CUDA_VISIBLE_DEVICES names it ("3", "GPU-<uuid>"), None on the CPU
    local_rank: int              # node-local rank the choice came from
    local_rank_source: str       # the variable it came from, or "node communicator"
    cuda_aware_mpi: bool         # the MPI library says it accepts GPU buffers (reported, not used)
    staging: str                 # "none" (CPU) or "pinned-host"

    def describe(self) -> str:
        where = "CPU" if self.gpu is None else f"{self.device} (GPU {self.gpu})"
        how = "parameters are in host memory" if self.staging == "none" else \
            "exchanges stage the parameters through pinned host memory, where the center lives" + \
            (" (MPI is CUDA-aware; host staging is used all the same)" if self.cuda_aware_mpi else "")
        return f"device {where}, node-local rank {self.local_rank} ({self.local_rank_source}); {how}"


def parse_visible_devices(value: str | None) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list of GPU ids; None when unset (every GPU is visible).
    An empty value, or one starting with -1 / NoDevFiles, hides every GPU (CUDA's rules: the list
    ends at the first invalid entry)."""
    if value is None:
        return None
    ids = []
    for item in value.split(","):
        item = item.strip()
        if not item or item.startswith("-") or item == "NoDevFiles":
            break
        ids.append(item)
    return ids


def choose_device(local_rank: int, visible_devices: list[str] | None, n_gpus: int) -> str:
    """The torch device for the rank with node-local rank `local_rank`: GPU (local_rank mod the
    number of usable GPUs), or "cpu" without any. n_gpus is what CUDA reports (it already honours
    CUDA_VISIBLE_DEVICES); visible_devices only caps it when the two disagree.

    Ranks 0..S-1 of the first node are the servers, so its G workers have the local ranks S..S+G-1:
    taken mod G these are still G different GPUs."""
    if local_rank < 0:
        raise ValueError(f"local_rank must be >= 0, got {local_rank}")
    usable = n_gpus if visible_devices is None else min(n_gpus, len(visible_devices))
    if usable <= 0:
        return "cpu"
    return f"cuda:{local_rank % usable}"


def gpu_id(device: str, visible_devices: list[str] | None) -> str | None:
    """The GPU behind a torch device as the user knows it (CUDA_VISIBLE_DEVICES' entry)."""
    if not device.startswith("cuda"):
        return None
    index = int(device.partition(":")[2] or 0)
    if visible_devices is not None and index < len(visible_devices):
        return visible_devices[index]
    return str(index)


def local_rank_from_env(environ: Mapping[str, str]) -> tuple[int, str] | None:
    """(node-local rank, the variable it came from) from the launcher's environment, or None."""
    for name in LOCAL_RANK_VARS:
        value = environ.get(name, "").strip()
        if value.isdigit():
            return int(value), name
    return None


def local_rank_by_split(comm) -> int:
    """Node-local rank from an MPI shared-memory split of `comm` (collective over comm): for
    launchers that set none of LOCAL_RANK_VARS."""
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.rank
    finally:
        node.Free()


def mpi_cuda_support(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the MPI library accepts GPU buffers. Asks, in order: HPCOPT_CUDA_AWARE_MPI, mpi4py
    (newer versions wrap MPIX_Query_cuda_support), the C function MPIX_Query_cuda_support itself
    (Open MPI and MPICH export it; answers for run time, after MPI_Init), and last, before MPI
    starts only, Open MPI's `ompi_info` (built with CUDA support). False when nothing says yes."""
    forced = environ.get(CUDA_AWARE_OVERRIDE, "").strip().lower()
    if forced in ("0", "1", "true", "false", "yes", "no"):
        return forced in ("1", "true", "yes")
    try:
        from mpi4py import MPI

        query = getattr(MPI, "Query_cuda_support", None)
        if query is not None:
            return bool(query())
        if MPI.Is_initialized():
            fn = getattr(ctypes.CDLL(None), "MPIX_Query_cuda_support", None)
            # no fork() of ompi_info once MPI runs (Open MPI warns against it with registered memory)
            return bool(fn()) if fn is not None else False
    except (ImportError, OSError):
        pass
    return ompi_built_with_cuda()


def ompi_built_with_cuda() -> bool:
    """`ompi_info --parsable --all` says mpi_built_with_cuda_support:value:true (Open MPI only)."""
    if not shutil.which("ompi_info"):
        return False
    try:
        out = subprocess.run(["ompi_info", "--parsable", "--all"], check=False, capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "mpi_built_with_cuda_support:value:true" in out


def _narrow_mig(visible: list[str] | None, local_rank: int, environ) -> list[str] | None:
    """A CUDA process enumerates only one MIG instance, the first it may see, so every rank would
    share it: with several listed, each rank narrows CUDA_VISIBLE_DEVICES (in `environ`, when it
    can be written) to its own, local rank mod their number. Only before CUDA starts does it count."""
    if visible and len(visible) > 1 and any(v.startswith("MIG-") for v in visible):
        visible = [visible[local_rank % len(visible)]]
        if isinstance(environ, dict) or environ is os.environ:
            environ["CUDA_VISIBLE_DEVICES"] = visible[0]
    return visible


def narrow_mig_early(environ=os.environ) -> None:
    """Before MPI starts (a CUDA-aware MPI or UCX may start CUDA in MPI_Init): the MIG narrowing
    of select_device, by the launcher's local-rank variable when there is one (select_device then
    finds one instance listed and keeps it)."""
    found = local_rank_from_env(environ)
    if found is not None:
        _narrow_mig(parse_visible_devices(environ.get("CUDA_VISIBLE_DEVICES")), found[0], environ)


def select_device(role: str, *, node_rank: int | None = None, comm=None, environ: Mapping[str, str] | None = None,
                  n_gpus: int | None = None, servers_on_gpu: bool = False,
                  log: Callable[[str], None] | None = None, log_cpu: bool = True,
                  ask_mpi: bool = True) -> DeviceChoice:
    """Choose this rank's device. role is "worker" or "server"; servers stay on the CPU unless
    servers_on_gpu. The local rank comes from the launcher's variables, else `node_rank` (this
    rank's place in its node communicator, which training computes for every rank), else a
    shared-memory split of `comm` (then collective over comm), else 0. n_gpus defaults to torch's
    count. Logs one line saying what it took, when log is given (on the CPU only if log_cpu).
    MIG: with several MIG instances listed, a rank narrows CUDA_VISIBLE_DEVICES to its own (in
    `environ`, os.environ by default), so call this before anything starts CUDA. ask_mpi=False:
    whether MPI is CUDA-aware is not asked (reported False)."""
    if role not in ("worker", "server"):
        raise ValueError(f"role must be 'worker' or 'server', got {role!r}")
    environ = os.environ if environ is None else environ
    found = local_rank_from_env(environ)
    if found is None and node_rank is not None:
        found = (node_rank, "node communicator")
    if found is None and comm is not None:
        found = (local_rank_by_split(comm), "node communicator")
    local_rank, source = found if found is not None else (0, "default")
    visible = parse_visible_devices(environ.get("CUDA_VISIBLE_DEVICES"))
    if role == "server" and not servers_on_gpu:
        device = "cpu"
    else:
        visible = _narrow_mig(visible, local_rank, environ)
        if n_gpus is None:
            import torch

            n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        device = choose_device(local_rank, visible, n_gpus)
    on_gpu = device != "cpu"
    aware = mpi_cuda_support(environ) if on_gpu and ask_mpi else False
    choice = DeviceChoice(device=device, gpu=gpu_id(device, visible), local_rank=local_rank,
                          local_rank_source=source, cuda_aware_mpi=aware,
                          staging="pinned-host" if on_gpu else "none")
    if log is not None and (on_gpu or log_cpu):
        node = environ.get("SLURMD_NODENAME") or socket.gethostname()
        log(f"[hpcopt {role} on {node}] {choice.describe()}")
    return choice


def _clear_cuda_error() -> None:
    """A failed cudaHostRegister stays CUDA's "last error" until someone reads it, and torch's
    check after the next kernel launch would raise it as that kernel's: read it, through the
    CUDA runtime library torch loaded (found in this process's memory map)."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "libcudart" in line})
        if libs:
            ctypes.CDLL(libs[0]).cudaGetLastError()
    except (OSError, AttributeError):
        pass


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
KEEP_HEAP_VAR = "HPCOPT_KEEP_HEAP"


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep the memory a training step frees, for the next step.

    A backward pass allocates each weight's gradient anew before adding it into the flat
    gradient buffer; above glibc's mmap threshold (at most 32 MB) that is a fresh mmap, page-faulted
    and zeroed by the kernel, and unmapped again at free: for the wide setting's 3000x3000 layer
    ~9,400 page faults a step, 22% of its CPU time (`sys`), measured side by side (110-116 vs
    86-90 ms a step, one thread). With no mmaps and a high trim threshold the heap keeps that
    memory instead; what it costs is that memory freed below the heap's top is not given back to
    the system. HPCOPT_KEEP_HEAP=0 leaves glibc's defaults. Returns whether it took effect (not
    glibc, or turned off: False)."""
    if os.environ.get(KEEP_HEAP_VAR, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 512 << 20))
    except (OSError, AttributeError):
        return False


class HostMirror:
    """A host copy of a (flat, contiguous) tensor for MPI, or the tensor itself when it is on the CPU
    (unless `separate`: the overlapped exchanges of comm.overlap work on a copy).

    `pull()` brings the device's values to the host and waits for them (MPI reads host memory
    next); `push()` sends the host's values back asynchronously: the copy is queued on the current
    stream, so the next kernels that read the tensor run after it, and the host buffer is not
    written again before the next `pull()`, which waits for the stream. `host` may be given (e.g. a
    shared-memory window): it is page-locked in place (cudaHostRegister) so that both copies are
    asynchronous DMA; when that fails the copies are synchronous, and `pinned` says so."""

    def __init__(self, tensor, host=None, separate: bool = False):
        import torch

        self.tensor = tensor
        self._pushed = None  # a CUDA event: the last asynchronous push has read the host buffer
        self._side = None  # pull_async's CUDA stream
        cpu = tensor.device.type == "cpu"
        self.on_host = cpu and not separate  # the tensor is its own host copy
        self.pinned = cpu
        if self.on_host:
            self.host = tensor
            return
        if host is None:  # (`separate` on the CPU: a copy the training does not touch, comm.overlap)
            self.host = torch.empty(tensor.numel(), dtype=tensor.dtype, pin_memory=not cpu)
            self.pinned = True
        else:
            self.host = host
            if not cpu:
                nbytes = host.numel() * host.element_size()
                self.pinned = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, 0) == 0
                if not self.pinned:
                    _clear_cuda_error()
        self.host.copy_(tensor)

    def pull(self):
        """The tensor's current values, in host memory (a CPU tensor)."""
        if not self.on_host:
            import torch

            self.host.copy_(self.tensor, non_blocking=self.pinned)
            if self.tensor.is_cuda:
                torch.cuda.current_stream(self.tensor.device).synchronize()
        return self.host

    def pull_async(self):
        """Start bringing the tensor's values to the host, and return a function that waits for
        them (comm.overlap: the exchange's thread waits, the training goes on). On a GPU the copy
        runs on a side stream after the kernels queued so far, and the training's stream waits
        for it on the device, not the host, so no later step changes the parameters under it.
        Elsewhere (CPU, or a host buffer that could not be page-locked) the copy is made now."""
        if self.on_host or not self.tensor.is_cuda or not self.pinned:
            self.pull()
            return lambda: None
        import torch

        main = torch.cuda.current_stream(self.tensor.device)
        if self._side is None:
            self._side = torch.cuda.Stream(self.tensor.device)
        side = self._side
        side.wait_stream(main)  # the values the steps queued so far have written
        with torch.cuda.stream(side):
            self.host.copy_(self.tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(side)
        main.wait_stream(side)  # the next step's kernels run after the copy has read the parameters
        return copied.synchronize

    def push(self) -> None:
        """The host's values into the tensor (ordered before the next kernels on this stream)."""
        if not self.on_host:
            self.tensor.copy_(self.host, non_blocking=self.pinned)
            if self.tensor.is_cuda and self.pinned:
                import torch

                self._pushed = torch.cuda.Event()
                self._pushed.record(torch.cuda.current_stream(self.tensor.device))

    def settle(self) -> None:
        """Wait until the last push has read the host buffer: call before anything but pull()
        writes the host buffer (a fetch's MPI receive), or the copy could take the new values."""
        pushed, self._pushed = self._pushed, None
        if pushed is not None:
            pushed.synchronize()
