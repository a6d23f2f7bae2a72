"""The benchmarks' own arithmetic (what their tables are computed with), without running them."""

import importlib.util
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def capacity():
    return load("capacity")


def point(capacity, model, S, W, P, path, k, **kw):
    return {"S": S, "W": W, "P": P, "path": path, "rate": capacity.predict(model, S, W, P, path, 2, k), **kw}


def test_repeated_points_count_with_the_median_of_their_measurements(capacity):
    a = {"S": 1, "W": 8, "P": 1000, "path": "messages", "cpu_per_exchange": 1.0, "worker_cpu_per_exchange": 2.0}
    pts = [dict(a, rate=100.0), dict(a, rate=300.0), dict(a, rate=110.0, cpu_per_exchange=5.0),
           dict(a, W=16, rate=50.0)]
    one = {p["W"]: p for p in capacity.combine(pts)}
    assert one[8]["rate"] == 110.0 and one[8]["cpu_per_exchange"] == 1.0
    assert sorted(one[8]["rates"]) == [100.0, 110.0, 300.0]
    assert one[16]["rates"] == [50.0]


@pytest.mark.parametrize("k", [2, 4, math.inf])
def test_the_norm_of_the_two_times_is_found_from_rates_it_made(capacity, k):
    """Rates made by the model with a known k give that k back (where the two times are close, a
    smaller k lowers the rate; far apart, every k agrees)."""
    model = {"messages": ((6e-5, 2e-10), (1.7e-4, 1e-10, 0.04))}
    pts = [point(capacity, model, S, W, P, "messages", k)
           for S, W, P in [(1, 8, 10**6), (1, 64, 10**6), (1, 8, 10**7), (2, 8, 10**7), (1, 8, 10**4)]]
    assert capacity.fit_k(model, pts, 2) == k
    worse = capacity.predict(model, 1, 8, 10**6, "messages", 2, 1)
    assert worse < capacity.predict(model, 1, 8, 10**6, "messages", 2, math.inf)


def test_synchronous_methods_run_the_codecs_without_the_overlap():
    compare = load("compare")
    assert compare.sync_variants("diloco", ["plain", "int2+overlap", "int2", "overlap"]) == ["plain", "int2"]
    assert compare.sync_variants("local-sgd", ["int4+overlap"]) == ["int4"]
    assert compare.sync_variants("dp-sgd", ["int2", "plain"]) == ["plain"]
