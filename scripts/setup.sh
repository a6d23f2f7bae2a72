#!/usr/bin/env bash
# Set up everything hpcopt needs, idempotently: system MPI + parallel HDF5, a .venv with
# mpi4py, numpy, torch and h5py built against parallel HDF5, and hpcopt itself (editable).
#
# Environment knobs:
#   PYTHON      interpreter for the venv            (default: python3)
#   VENV        where the venv goes                  (default: .venv)
#   TORCH_SPEC  pip requirement for torch            (default: torch==2.13.0, the CPU build;
#               on a GPU cluster use e.g. TORCH_SPEC="torch==2.5.1" or an already-installed
#               torch with TORCH_SPEC=skip)
#   HDF5_DIR    prefix of a parallel HDF5 (as after `module load hdf5/parallel`); found via h5pcc
#               or the Debian path when unset
#   EXTRAS      extra pip targets for hpcopt, comma-separated (default: test,tensorboard)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test,tensorboard}
STAMP="$VENV/.hpcopt-setup-done"

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

# --- 1. system MPI and parallel HDF5 ----------------------------------------------------------
have_mpi() { command -v mpicc >/dev/null && command -v mpirun >/dev/null; }
find_hdf5_dir() {
    if [[ -n "${HDF5_DIR:-}" ]]; then echo "$HDF5_DIR"; return; fi
    if [[ -f /usr/lib/x86_64-linux-gnu/hdf5/openmpi/include/hdf5.h ]]; then
        echo /usr/lib/x86_64-linux-gnu/hdf5/openmpi; return; fi
    local arch; arch=$(uname -m)-linux-gnu
    if [[ -f /usr/lib/$arch/hdf5/openmpi/include/hdf5.h ]]; then echo "/usr/lib/$arch/hdf5/openmpi"; return; fi
    if command -v h5pcc >/dev/null; then dirname "$(dirname "$(readlink -f "$(command -v h5pcc)")")"; return; fi
}

if ! have_mpi || [[ -z "$(find_hdf5_dir)" ]]; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        say "installing Open MPI and parallel HDF5 with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq libopenmpi-dev openmpi-bin libhdf5-openmpi-dev >/dev/null
    else
        missing=()
        have_mpi || missing+=("an MPI (mpicc, mpirun)")
        [[ -n "$(find_hdf5_dir)" ]] || missing+=("parallel HDF5 (h5pcc or HDF5_DIR)")
        die "missing: ${missing[*]}. On a cluster: 'module load openmpi hdf5/parallel' (names vary) and set HDF5_DIR; on Debian/Ubuntu as root: apt-get install libopenmpi-dev openmpi-bin libhdf5-openmpi-dev"
    fi
fi
have_mpi || die "mpicc/mpirun still not found after installation"
HDF5_DIR=$(find_hdf5_dir)
[[ -n "$HDF5_DIR" && -f "$HDF5_DIR/include/hdf5.h" ]] || die "no hdf5.h under HDF5_DIR='$HDF5_DIR'"
grep -q "define H5_HAVE_PARALLEL 1" "$HDF5_DIR/include/H5pubconf.h" 2>/dev/null \
    || die "HDF5 at $HDF5_DIR is not a parallel (MPI) build (H5_HAVE_PARALLEL missing in H5pubconf.h)"
export HDF5_DIR

# --- 2. the virtual environment ---------------------------------------------------------------
# The stamp includes pyproject.toml's hash, so a new dependency triggers a (quick) re-install.
KEY="$TORCH_SPEC|$EXTRAS|$HDF5_DIR|$(sha256sum pyproject.toml | cut -c1-16)"
if [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$KEY" ]] \
   && "$VENV/bin/python" -c "import h5py, mpi4py, torch, hpcopt; assert h5py.get_config().mpi" 2>/dev/null; then
    # hpcopt is installed editable, but new console scripts or dependencies need a re-install.
    "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e ".[$EXTRAS]" >/dev/null
    say "environment already set up ($VENV); nothing to do"
    exit 0
fi

[[ -x "$VENV/bin/python" ]] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip >/dev/null

say "installing build tools, numpy and mpi4py"
"${PIP[@]}" "Cython>=3" numpy pkgconfig "setuptools>=77" wheel mpi4py

if [[ "$TORCH_SPEC" != skip ]]; then
    say "installing $TORCH_SPEC"
    "${PIP[@]}" "$TORCH_SPEC"
fi

if ! "$VENV/bin/python" -c "import h5py, sys; sys.exit(0 if h5py.get_config().mpi else 1)" 2>/dev/null; then
    say "building h5py against parallel HDF5 at $HDF5_DIR (about 3 minutes)"
    "$VENV/bin/pip" uninstall -q -y h5py >/dev/null 2>&1 || true
    # --no-build-isolation: otherwise pip recompiles mpi4py from source in the build env (12+ min).
    CC=mpicc HDF5_MPI=ON "${PIP[@]}" --no-build-isolation --no-binary=h5py --no-cache-dir h5py
fi
"$VENV/bin/python" -c "import h5py, sys; sys.exit(0 if h5py.get_config().mpi else 1)" \
    || die "h5py in $VENV is not built with MPI support (h5py.get_config().mpi is False)"

say "installing hpcopt (editable) with extras [$EXTRAS]"
"${PIP[@]}" --no-build-isolation -e ".[$EXTRAS]"

say "compiling the compressed exchanges' codec loops (numba; cached for every later run)"
"$VENV/bin/python" -c "from hpcopt.comm import codec; codec.warm('int8')"

echo "$KEY" > "$STAMP"
say "done: $("$VENV/bin/python" -c 'import h5py, mpi4py, torch; from mpi4py import MPI; print(f"torch {torch.__version__}, mpi4py {mpi4py.__version__}, h5py {h5py.__version__} (parallel HDF5 {h5py.version.hdf5_version}), {MPI.Get_library_version().split(chr(0))[0].splitlines()[0]}")')"
