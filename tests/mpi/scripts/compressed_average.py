"""Run under `mpirun -n 3`: Local SGD's compressed average (hpcopt.roles.sync.CompressedAverage)
in the format argv[1] for 30 rounds of random local changes. Every rank must end every round
with the same bits, equal to a NumPy replay of all ranks' codec and error feedback (each rank
replays everyone: the changes come from seeded generators); the average's error stays bounded
(error feedback). Rank 0 prints OK."""

import sys

import numpy as np
import torch
from mpi4py import MPI

from hpcopt.comm import codec
from hpcopt.launch.device import HostMirror
from hpcopt.roles.sync import CompressedAverage

N, ROUNDS = 1000, 30


def main():
    fmt, comm = sys.argv[1], MPI.COMM_WORLD
    p = comm.size
    start = np.linspace(-1, 1, N, dtype=np.float32)
    params = torch.from_numpy(start.copy())
    avg = CompressedAverage(comm, fmt, params.numpy())
    gens = [np.random.default_rng(r) for r in range(p)]
    xs = [start.copy() for _ in range(p)]  # the replay: every rank's parameters, reference, error
    ref, errs = start.copy(), [np.zeros(N, np.float32) for _ in range(p)]
    exact = [start.astype(np.float64).copy() for _ in range(p)]  # the same steps, averaged exactly
    for _ in range(ROUNDS):
        steps = [g.standard_normal(N).astype(np.float32) * 0.1 for g in gens]
        params += torch.from_numpy(steps[comm.rank])
        avg.mean_(HostMirror(params), 60, "the test's average")
        avg.restarted(HostMirror(params))
        total = np.zeros(N, np.float32)
        for r in range(p):
            xs[r] += steps[r]
            change = xs[r] - ref
            change += errs[r]
            payload = codec.encode(fmt, change, np.empty(codec.payload_size(fmt, N), np.uint8))
            errs[r] = change - codec.decode(fmt, payload, N)
            total += codec.decode(fmt, payload, N)
        ref = ref + total / np.float32(p)
        xs = [ref.copy() for _ in range(p)]
        np.testing.assert_array_equal(params.numpy(), ref)
        exact = [e + s for e, s in zip(exact, steps)]
        exact = [np.mean(exact, axis=0)] * p
    everyone = comm.gather(params.numpy().copy(), root=0)
    if comm.rank == 0:
        for other in everyone[1:]:
            np.testing.assert_array_equal(other, everyone[0])
        # error feedback: what rounding withheld is at most one round's rounding, not 30 rounds'
        drift = np.abs(everyone[0] - exact[0]).max()
        assert drift < 0.1, drift
        print("OK", drift, flush=True)


if __name__ == "__main__":
    main()
