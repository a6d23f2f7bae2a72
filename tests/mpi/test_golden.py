"""Restructuring changes no behaviour: deterministic runs of every method write the same bits as
when tests/golden.json was recorded (see tests/golden.py)."""

from __future__ import annotations

import json

import pytest

import golden
from conftest import mpirun

pytestmark = pytest.mark.mpi

STORED = json.loads(golden.GOLDEN.read_text())


@pytest.fixture(scope="module")
def same_arithmetic():
    here = golden.calibration()
    if here != STORED["calibration"]:
        pytest.skip(f"this machine's float kernels differ from where tests/golden.json was recorded "
                    f"(calibration {here} != {STORED['calibration']}): the bits cannot be compared here")


@pytest.mark.parametrize("name", sorted(golden.RUNS))
def test_deterministic_run_writes_the_recorded_bits(tmp_path, same_arithmetic, name):
    n, args = golden.run_args(name, tmp_path / name)
    mpirun(n, *args)
    assert golden.fingerprint(tmp_path / name / "trajectory.h5") == STORED["runs"][name]
