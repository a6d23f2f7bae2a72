"""hpcopt: asynchronous elastic-averaging training under MPI."""
__version__ = "0.1.0"
