"""Remote arrays against NumPy: upload, download, every op family, every dtype."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import gpupool as gp

DTYPES = ["float32", "float64", "int32", "int64"]


def sample(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.uniform(-3, 3, shape).astype(dtype)
    return rng.integers(-50, 50, shape).astype(dtype)


def check(got: object, expected: np.ndarray | np.generic, *, summed: bool = False) -> None:
    """Same shape, dtype and values; ``summed`` allows for float32 sums added in another order."""
    host = np.asarray(got)
    assert host.shape == np.shape(expected)
    assert host.dtype == np.asarray(expected).dtype, (host.dtype, np.asarray(expected).dtype)
    if host.dtype.kind == "f":
        single = host.dtype == np.float32
        rtol = (1e-4 if summed else 2e-6) if single else 1e-12
        atol = (1e-2 if summed else 1e-6) if single else 1e-9
        np.testing.assert_allclose(host, expected, rtol=rtol, atol=atol)
    else:
        np.testing.assert_array_equal(host, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1001, 13), (7,), (1, 5), (3, 4, 2), (0, 3)])
def test_round_trip_any_row_count(pool: gp.Pool, dtype: str, shape: tuple[int, ...]) -> None:
    host = sample(shape, dtype)
    x = pool.asarray(host)
    assert x.shape == shape
    assert x.dtype == np.dtype(dtype)
    check(x.get(), host)
    check(np.asarray(x), host)
    shards = x.shards
    assert shards[0].start == 0
    assert shards[-1].stop == shape[0]
    assert all(a.stop == b.start for a, b in itertools.pairwise(shards))


def test_rows_are_spread_over_both_agents(pool: gp.Pool) -> None:
    x = pool.asarray(sample((1001, 8), "float32"))
    ready = {a.id for a in pool.agents() if a.state == "ready"}
    assert len(ready) == 2
    assert {s.agent_id for s in x.shards} == ready
    assert sum(s.rows for s in x.shards) == 1001


def test_bool_results_come_back(pool: gp.Pool) -> None:
    host = sample((101, 3), "float64")
    x = pool.asarray(host)
    check(x > 0, host > 0)
    check(pool.asarray(host > 0), host > 0)


BINARY = [
    "add",
    "subtract",
    "multiply",
    "true_divide",
    "power",
    "maximum",
    "minimum",
    "equal",
    "not_equal",
    "less",
    "less_equal",
    "greater",
    "greater_equal",
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", BINARY)
def test_binary_ufuncs(pool: gp.Pool, dtype: str, name: str) -> None:
    ufunc = getattr(np, name)
    a = sample((257, 6), dtype, 1)
    b = sample((257, 6), dtype, 2)
    if name == "power":
        a, b = np.abs(a) % 4 + 1, np.abs(b) % 3  # keep integers off negative powers, floats off NaN
        a, b = a.astype(dtype), b.astype(dtype)
    if name == "true_divide":
        b = np.where(b == 0, 1, b).astype(dtype)
    x, y = pool.asarray(a), pool.asarray(b)
    row = sample((6,), dtype, 3)
    if name == "true_divide":
        row = np.where(row == 0, 1, row).astype(dtype)
    if name == "power":
        row = (np.abs(row) % 3).astype(dtype)
    with np.errstate(all="ignore"):
        check(ufunc(x, y), ufunc(a, b))  # remote with remote
        check(ufunc(x, 2), ufunc(a, 2))  # Python scalar
        check(ufunc(3, y), ufunc(3, b))  # scalar on the left
        check(ufunc(x, row), ufunc(a, row))  # broadcast row vector
        check(ufunc(x, row[None, :]), ufunc(a, row[None, :]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_operators_match_ufuncs(pool: gp.Pool, dtype: str) -> None:
    a = sample((99, 4), dtype, 4)
    x = pool.asarray(a)
    check(x + 1, a + 1)
    check(2 - x, 2 - a)
    check(x * x, a * a)
    check(-x, -a)
    check(abs(x), abs(a))
    check(x / 3, a / 3)
    check(x >= 0, a >= 0)
    check(x == a, a == a)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["exp", "log", "sqrt", "tanh", "abs", "negative", "sin", "floor"])
def test_unary_ufuncs(pool: gp.Pool, dtype: str, name: str) -> None:
    a = sample((300, 5), dtype, 5)
    if name in ("log", "sqrt"):
        a = np.abs(a) + np.asarray(0.5, dtype)
    x = pool.asarray(a)
    check(getattr(np, name)(x), getattr(np, name)(a))
    check(getattr(gp, name)(x), getattr(np, name)(a))


def test_chained_expression_in_the_design(pool: gp.Pool) -> None:
    a = sample((4096, 64), "float32", 6)
    w = sample((64, 16), "float32", 7) / 8
    x = pool.asarray(a)
    y = np.tanh(x @ w) * 2 + 1
    expected = np.tanh(a @ w) * 2 + 1
    check(y, expected, summed=True)
    assert float(y.sum()) == pytest.approx(float(expected.sum(dtype=np.float64)), rel=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_with_host_and_remote_weights(pool: gp.Pool, dtype: str) -> None:
    a = sample((503, 17), dtype, 8)
    w = sample((17, 9), dtype, 9)
    v = sample((17,), dtype, 10)
    x = pool.asarray(a)
    check(x @ w, a @ w, summed=True)
    check(x @ v, a @ v, summed=True)
    check(np.matmul(x, w), a @ w, summed=True)
    wr = pool.asarray(w)
    check(x @ wr, a @ w, summed=True)
    check(x @ wr, a @ w, summed=True)  # the replicas made by the first product are reused


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["sum", "mean", "max", "min"])
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_reductions(pool: gp.Pool, dtype: str, op: str, axis: int | None) -> None:
    a = sample((1001, 7), dtype, 11)
    x = pool.asarray(a)
    got = getattr(x, op)(axis=axis)
    expected = getattr(a, op)(axis=axis)
    check(got, expected, summed=True)
    check(getattr(np, op)(x, axis=axis), expected, summed=True)


def test_reductions_of_3d_and_empty_arrays(pool: gp.Pool) -> None:
    a = sample((11, 3, 4), "float64", 12)
    x = pool.asarray(a)
    check(x.sum(axis=2), a.sum(axis=2))
    check(x.max(axis=1), a.max(axis=1))
    empty = pool.asarray(np.zeros((0, 3), np.float32))
    check(empty.sum(), np.zeros((0, 3), np.float32).sum())
    with pytest.raises(ValueError, match="zero-size"):
        empty.max()


def test_results_stay_remote_and_resident(pool: gp.Pool) -> None:
    a = sample((64, 8), "float32", 13)
    x = pool.asarray(a)
    y = x * 2
    assert isinstance(y, gp.RemoteArray)
    assert [(s.agent_id, s.start, s.stop) for s in y.shards] == [
        (s.agent_id, s.start, s.stop) for s in x.shards
    ]
    assert isinstance(x.sum(axis=1), gp.RemoteArray)
    check(y.astype("float64"), (a * 2).astype("float64"))


def test_arrays_with_different_layouts_still_combine(pool: gp.Pool) -> None:
    a = sample((500, 4), "float64", 14)
    x = pool.asarray(a)
    big = pool.asarray(sample((3000, 4), "float64", 15))  # shifts free memory, so the next split may differ
    y = pool.asarray(a * 3)
    check(x + y, a + a * 3)
    big.free()
