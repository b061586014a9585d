"""Explicit shardings: ``pool.asarray(x, rows=[...])`` and ``gp.asarray(x, rows=...)``; the pure checks
(:func:`check_rows`, :func:`round_robin`) without a network, the placement on a real two-agent pool."""

from __future__ import annotations

import numpy as np
import pytest

import gpupool as gp
from gpupool.client.layout import check_rows, layout_key, round_robin
from gpupool.local import LocalPool

X = np.arange(7 * 3, dtype=np.float64).reshape(7, 3)


@pytest.mark.parametrize(
    ("rows", "length", "expected"),
    [([7], 7, (7,)), ((0, 7, 0), 7, (0, 7, 0)), (range(3), 3, (0, 1, 2)), ([np.int64(2), 1], 3, (2, 1))],
)
def test_check_rows_accepts(rows: object, length: int, expected: tuple[int, ...]) -> None:
    assert check_rows(rows, length) == expected


@pytest.mark.parametrize(
    ("rows", "length", "says"),
    [
        ([3, 3], 7, "adds up to 6 rows, but the array has 7"),
        ([8, -1], 7, "negative row count"),
        ([3.5, 3.5], 7, "integer row counts"),
        ([True, 6], 7, "integer row counts"),
        ([], 0, "at least one shard"),
        (7, 7, "sequence of row counts"),
        ("7", 7, "sequence of row counts"),
    ],
)
def test_check_rows_refuses(rows: object, length: int, says: str) -> None:
    with pytest.raises(gp.UsageError, match=says):
        check_rows(rows, length)


def test_round_robin() -> None:
    assert round_robin([2, 0, 1, 3], 3) == [(0, 0, 2), (1, 2, 2), (2, 2, 3), (0, 3, 6)]
    assert round_robin([0], 2) == [(0, 0, 0)]
    with pytest.raises(ValueError, match="at least one place"):
        round_robin([1], 0)


@pytest.mark.parametrize("rows", [[7], [0, 7], [7, 0], [1] * 7, [0, 0, 3, 0, 4], [2, 5]], ids=repr)
def test_asarray_rows_places_shards_in_order(pool: gp.Pool, rows: list[int]) -> None:
    agents = sorted(a.id for a in pool.agents())
    x = pool.asarray(X, rows=rows)
    assert [s.rows for s in x.shards] == rows
    assert [s.agent_id for s in x.shards] == [agents[i % len(agents)] for i in range(len(rows))]
    assert [s.start for s in x.shards] == list(np.cumsum([0, *rows[:-1]]))
    np.testing.assert_array_equal(x.get(), X)
    y = pool.asarray(X * 2, rows=rows)
    assert layout_key(x.layout) == layout_key(y.layout)  # the same rows meet shard by shard
    np.testing.assert_array_equal((x + y).get(), X * 3)
    np.testing.assert_allclose(float(x.sum()), X.sum())


def test_empty_array_with_empty_shards(pool: gp.Pool) -> None:
    x = pool.asarray(np.zeros((0, 4), np.int32), rows=[0, 0, 0])
    assert len(x.shards) == 3
    assert x.get().shape == (0, 4)
    assert int(x.sum()) == 0


def test_gp_asarray_rows(local_pool: LocalPool) -> None:
    with local_pool.connect() as pool:  # the current pool in the block, closed after it
        x = gp.asarray(X, rows=[3, 4])
        assert [s.rows for s in x.shards] == [3, 4]
        with pytest.raises(gp.UsageError, match="re-shard"):
            gp.asarray(x, rows=[7])
        with pytest.raises(gp.UsageError, match="re-shard"):
            pool.asarray(x, rows=[7])


def test_rows_refused_before_anything_is_sent(pool: gp.Pool) -> None:
    with pytest.raises(gp.UsageError, match="adds up to 8"):
        pool.asarray(X, rows=[4, 4])


@pytest.mark.parametrize("rows", [[0, 1], [1, 0], [0, 0, 1]], ids=repr)
def test_one_row_array_with_empty_shards(pool: gp.Pool, rows: list[int]) -> None:
    # Regression: a one-row array's own shards were downloaded and sent whole to every shard as a
    # broadcast constant, so an empty shard answered with one row ("op 'add' gives shape (1,)").
    host = np.array([[1.5, -2.0]])
    x = pool.asarray(host, rows=rows)
    np.testing.assert_array_equal((x + 1).get(), host + 1)
    np.testing.assert_array_equal(np.absolute(x).get(), np.absolute(host))
    np.testing.assert_array_equal(
        np.minimum(x, pool.asarray(host * 2, rows=rows)).get(), np.minimum(host, host * 2)
    )
    np.testing.assert_array_equal((x * np.array([[2.0, 3.0]])).get(), host * [[2.0, 3.0]])
