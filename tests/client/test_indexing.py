"""Indexing, layouts, x.T @ y, sorting and concatenation on a real two-agent pool, against NumPy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpupool as gp
from gpupool.client.coverage import HostFallbackWarning

X = np.arange(7 * 5, dtype=np.float64).reshape(7, 5) - 11.0

KEYS = [
    np.s_[2:6],
    np.s_[::2],
    np.s_[::-1],
    np.s_[5:1:-2],
    np.s_[:, 1:4],
    np.s_[1:6, ::-2],
    np.s_[..., 3],
    np.s_[:, None, 2],
    np.s_[3],
    np.s_[-1, 2:],
    np.s_[10:],
    np.s_[:, [4, 0, 0]],
    np.s_[:, np.array([True, False, True, False, True])],
]


@pytest.mark.parametrize("key", KEYS, ids=repr)
def test_getitem_matches_numpy(pool: gp.Pool, key: object) -> None:
    x = pool.asarray(X)
    got = x[key]
    result = got.get() if hasattr(got, "get") else got
    np.testing.assert_array_equal(result, X[key])
    if hasattr(got, "get") and got.shape[0]:
        np.testing.assert_array_equal((got * 2).get(), X[key] * 2)


def test_mask_compress(pool: gp.Pool) -> None:
    x = pool.asarray(X)
    mask = x[:, 0] > 0
    np.testing.assert_array_equal(x[mask].get(), X[X[:, 0] > 0])
    np.testing.assert_array_equal(x[x[:, 0] > 1e9].get(), X[:0])


def test_setitem(pool: gp.Pool) -> None:
    x = pool.asarray(X)
    alias = x
    expected = X.copy()
    x[x < 0] = 0
    expected[expected < 0] = 0
    x[:, 1] = -1
    expected[:, 1] = -1
    x[:, 2] = np.arange(7.0)
    expected[:, 2] = np.arange(7.0)
    x[2:4] = 9
    expected[2:4] = 9
    x[1:3, 4] = 5
    expected[1:3, 4] = 5
    np.testing.assert_array_equal(alias.get(), expected)


def test_layout_ops(pool: gp.Pool) -> None:
    x3 = np.arange(6 * 4 * 3, dtype=np.float32).reshape(6, 4, 3)
    x = pool.asarray(x3)
    np.testing.assert_array_equal(np.transpose(x, (0, 2, 1)).get(), np.transpose(x3, (0, 2, 1)))
    np.testing.assert_array_equal(x.swapaxes(1, 2).get(), x3.swapaxes(1, 2))
    np.testing.assert_array_equal(x.reshape(6, 12).get(), x3.reshape(6, 12))
    np.testing.assert_array_equal(np.expand_dims(x, 2).get(), np.expand_dims(x3, 2))
    np.testing.assert_array_equal(np.squeeze(x[:, :1]).get(), np.squeeze(x3[:, :1]))


def test_transposed_matmul(pool: gp.Pool) -> None:
    x = pool.asarray(X)
    y, y_host = x[:, 0] - 3, X[:, 0] - 3  # laid out as x
    np.testing.assert_allclose(x.T @ x, X.T @ X)
    np.testing.assert_allclose(x.T @ y, X.T @ y_host)
    np.testing.assert_allclose(x.T @ (x * 2), X.T @ (X * 2))


def test_sort_concatenate_compare(pool: gp.Pool) -> None:
    rng = np.random.default_rng(0)
    h = rng.standard_normal((9, 6))
    x = pool.asarray(h)
    np.testing.assert_array_equal(np.sort(x, axis=1).get(), np.sort(h, axis=1))
    np.testing.assert_array_equal(np.argsort(x, axis=1).get(), np.argsort(h, axis=1, kind="stable"))
    part = np.partition(x, 2, axis=1).get()
    np.testing.assert_array_equal(part[:, 2], np.partition(h, 2, axis=1)[:, 2])
    np.testing.assert_array_equal(np.concatenate([x, x * 2], axis=1).get(), np.concatenate([h, h * 2], 1))
    np.testing.assert_array_equal(np.stack([x, x], axis=1).get(), np.stack([h, h], axis=1))
    np.testing.assert_array_equal(np.hstack([x, x]).get(), np.hstack([h, h]))
    assert np.array_equal(x, x * 1)
    assert not np.array_equal(x, x + 1)
    assert np.allclose(x, x + 1e-12)
    assert not np.allclose(x, x + 1)


def test_fallbacks_warn(pool: gp.Pool) -> None:
    x = pool.asarray(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HostFallbackWarning)
        np.testing.assert_array_equal(np.sort(x, axis=0), np.sort(X, axis=0))
        np.testing.assert_array_equal(x[[1, 3]], X[[1, 3]])
        np.testing.assert_array_equal(np.asarray(x.T), X.T)


_BOUND = st.one_of(st.none(), st.integers(-9, 9))
_SLICE = st.builds(slice, _BOUND, _BOUND, st.one_of(st.none(), st.integers(-3, 3).filter(bool)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_SLICE, cols=_SLICE)
def test_slices_match_numpy(pool: gp.Pool, rows: slice, cols: slice) -> None:
    x = pool.asarray(X)
    np.testing.assert_array_equal(x[rows, cols].get(), X[rows, cols])


def test_setitem_with_a_mask_read_from_a_column_of_the_pending_array(pool: gp.Pool) -> None:
    # Regression: x[:, 0] read a pending x through a per-shard slice the in-place update did not know of,
    # so x[x[:, 0] > 0] = 7 made x read itself (RecursionError when computed).
    host = np.arange(12, dtype=np.int32).reshape(6, 2) - 5
    x = pool.asarray(host)
    x[:, -1] = 5  # x is pending from here
    expected = host.copy()
    expected[:, -1] = 5
    mask = x[:, 0] > 0
    x[mask] = 7
    expected[expected[:, 0] > 0] = 7
    np.testing.assert_array_equal(x.get(), expected)
    np.testing.assert_array_equal(mask.get(), host[:, 0] > 0)


@pytest.mark.parametrize("rows", [None, [0, 0]], ids=repr)
def test_mask_of_an_array_without_rows_stays_on_the_pool(pool: gp.Pool, rows: list[int] | None) -> None:
    # Regression: x[mask] of a 0-row x ran on the host copy (with the warning) and gave a NumPy array.
    x = pool.asarray(np.zeros((0, 3), np.float32), rows=rows)
    mask = pool.asarray(np.zeros(0, np.bool_), rows=[s.rows for s in x.shards]) if rows else x[:, 0] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", HostFallbackWarning)
        selected = x[mask]
    assert isinstance(selected, gp.RemoteArray)
    np.testing.assert_array_equal((selected + 1).get(), np.zeros((0, 3), np.float32))


@pytest.mark.parametrize(
    ("columns", "key"),
    [(1, np.s_[0, -2::-1]), (5, np.s_[:, 5:2]), (5, np.s_[1:, :0:-1]), (5, np.s_[:, -7::-2])],
    ids=repr,
)
def test_setitem_with_an_empty_or_reversed_slice_of_columns(pool: gp.Pool, columns: int, key: object) -> None:
    # Regression: an empty slice of another axis counting down (range(-1, -1, -1)) became slice(-1, None, -1),
    # which selects the last column, so x[0, -2::-1] = 1 of a one-column x changed it.
    host = X[:, :columns].copy()
    expected = host.copy()
    expected[key] = 1
    x = pool.asarray(host)
    x[key] = 1
    np.testing.assert_array_equal(x.get(), expected)


@pytest.mark.parametrize(("dtype", "value"), [("uint8", -1), ("int8", 200), ("int32", np.nan)])
def test_setitem_refuses_what_numpy_refuses(pool: gp.Pool, dtype: str, value: object) -> None:
    # Regression: the value was cast with astype, so x[0] = -1 of a uint8 x stored 255 where NumPy raises.
    host = np.arange(6, dtype=dtype).reshape(3, 2)
    with pytest.raises((OverflowError, ValueError)) as numpy_error:
        host[0] = value
    x = pool.asarray(host)
    with pytest.raises(numpy_error.type):
        x[0] = value
    with pytest.raises(numpy_error.type):
        x[x > 2] = value
    np.testing.assert_array_equal(x.get(), host)
