"""Sharding and chunking of the flat parameter vector (no MPI)."""

import pytest

from hpcopt.comm.protocol import chunk_bounds, shard_bounds


@pytest.mark.parametrize("n,s", [(10, 1), (10, 3), (5210, 2), (5210, 7), (7, 7)])
def test_shards_cover_everything_once(n, s):
    b = shard_bounds(n, s)
    assert len(b) == s and b[0][0] == 0 and b[-1][1] == n
    assert all(hi > lo for lo, hi in b)
    assert all(b[i][1] == b[i + 1][0] for i in range(s - 1))
    width = b[0][1] - b[0][0]
    assert all(hi - lo == width for lo, hi in b[:-1])  # HDF5 chunks line up with shards


def test_too_many_servers_is_an_error():
    with pytest.raises(ValueError, match="fewer servers"):
        shard_bounds(4, 3)  # widths 2, 2, 0


def test_chunks():
    assert chunk_bounds(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(3, 5, 100) == [(3, 5)]
