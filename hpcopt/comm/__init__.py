"""Transport: the wire protocol between workers and the server ranks that own the center.

No optimizer math here beyond calling hpcopt.optim; no process management.
"""
