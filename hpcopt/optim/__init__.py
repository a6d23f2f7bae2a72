"""Optimizer math: pure functions on flat tensors, no MPI. Transport lives in hpcopt.comm."""
