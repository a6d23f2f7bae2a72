# make demo   set up everything, then train MNIST-1D with 1 server + 4 workers (runs/demo)
# make test   set up everything, then run the whole test suite
# make setup  only set up (.venv with parallel h5py, system Open MPI + parallel HDF5)
VENV ?= .venv
NP ?= 5
# Running as root (containers, CI) needs Open MPI's explicit consent; harmless otherwise.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1

.PHONY: setup demo test bench clean
setup:
	@bash scripts/setup.sh

demo: setup
	mpirun --oversubscribe -n $(NP) $(VENV)/bin/hpcopt train --config configs/mnist1d_easgd.toml --out runs/demo --force
	$(VENV)/bin/hpcopt inspect runs/demo/trajectory.h5

# Two tests at a time (pytest-xdist): one test's ranks mostly wait on each other, importing torch
# or on a deadline, so one at a time used 1.2 of a 2-core machine's cores. TEST_JOBS=0: one at a time, in one process.
TEST_JOBS ?= 2
test: setup
	$(VENV)/bin/python -m pytest -q --durations=20 -n $(TEST_JOBS) --dist loadgroup tests

bench: setup
	mpirun --oversubscribe -n 2 $(VENV)/bin/python benchmarks/exchange.py
	mpirun --oversubscribe -n 2 $(VENV)/bin/python benchmarks/throughput.py

clean:
	rm -rf runs .pytest_cache
