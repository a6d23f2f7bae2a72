#!/bin/sh
# One command for a GPU node: every method, local step, exchange path, reset, resume and the
# analysis on CUDA next to the CPU; one table; non-zero on any failure. See gpu_check.py.
#   benchmarks/gpu_check.sh [--device cpu] [--epochs 10] [--only methods,reset,copies,analyze]
here=$(cd "$(dirname "$0")/.." && pwd)
py="$here/.venv/bin/python"
[ -x "$py" ] || py=python3
exec "$py" "$here/benchmarks/gpu_check.py" "$@"
