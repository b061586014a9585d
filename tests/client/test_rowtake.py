"""x[idx] and np.take(x, idx, axis=0) with a host integer array: rows moved agent to agent, not through the
client, on a real 2-agent pool; results equal NumPy's for uneven, empty and one-row shards."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import gpupool as gp

HOST = np.arange(120, dtype=np.float32).reshape(40, 3)
LAYOUTS = [[40], [13, 0, 27], [1, 38, 1], [20, 20]]
PICKS = [
    [3, 1, 39, 7, 7, -1],
    [5],
    list(range(39, -1, -1)),
    [0, 39, 20, 2, 25, 8, 8, 8, -40],
]


@pytest.mark.parametrize("rows", LAYOUTS, ids=str)
@pytest.mark.parametrize("picks", PICKS, ids=lambda p: f"{len(p)}-picks")
def test_integer_row_indexing_runs_on_the_pool(pool: gp.Pool, rows: list[int], picks: list[int]) -> None:
    x = pool.asarray(HOST, rows=rows)
    idx = np.array(picks)
    gp.coverage(reset=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gp.HostFallbackWarning)
        got = x[idx]
        taken = np.take(x, idx, axis=0)
        chained = (x[idx] * 2 + 1).sum(axis=1)
    assert isinstance(got, gp.RemoteArray)
    assert got.shape == (len(picks), 3)
    np.testing.assert_array_equal(got.get(), HOST[idx])
    np.testing.assert_array_equal(taken.get(), HOST[idx])
    np.testing.assert_array_equal(chained.get(), (HOST[idx] * 2 + 1).sum(axis=1))
    np.testing.assert_array_equal(x.get(), HOST)  # the operand is untouched


def test_bad_row_indices_raise_numpys_errors_and_leave_nothing(pool: gp.Pool) -> None:
    x = pool.asarray(HOST, rows=[20, 20])
    with pytest.raises(IndexError, match="out of bounds"):
        x[np.array([0, 40])]
    with pytest.raises(IndexError, match="out of bounds"):
        x[np.array([-41])]
    with pytest.raises(IndexError, match="integer"):
        x[np.array([0.5])]
    np.testing.assert_array_equal(x[np.array([1, 0])].get(), HOST[[1, 0]])
