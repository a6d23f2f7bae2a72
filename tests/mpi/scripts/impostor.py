"""Connects to a join's MPI port without knowing the token, answers the server's challenge with
a guess and then holds the connection (tests/mpi/test_elastic.py): it must not be admitted, and
must not hold the server up either."""

import sys
import time

import mpi4py

mpi4py.rc.thread_level = "multiple"
from mpi4py import MPI  # noqa: E402

from hpcopt.comm import protocol as P  # noqa: E402

inter = MPI.COMM_WORLD.Connect(sys.argv[1], root=0)
nonce = bytearray(32)
inter.Recv(nonce, source=0, tag=P.TAG_JOIN_PROOF)
inter.Send(bytes(32), dest=0, tag=P.TAG_JOIN_PROOF)  # a guess
print("answered", flush=True)
time.sleep(600)  # never disconnects: the test kills it
