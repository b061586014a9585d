"""NumPy's semantics on remote arrays: in-place operators, reductions with axes/keepdims/ddof, arg reductions,
clip/round/where, scans, and the host fallback, against NumPy over the two-agent pool's uneven shards."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpupool as gp
from gpupool._warnings import HostFallbackWarning

FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def value(result: object) -> np.ndarray:
    return np.asarray(result.get() if isinstance(result, gp.RemoteArray) else result)


def close(got: object, expected: object) -> None:
    got_value, expected_value = value(got), np.asarray(expected)
    assert got_value.shape == expected_value.shape
    assert got_value.dtype == expected_value.dtype, (got_value.dtype, expected_value.dtype)
    np.testing.assert_allclose(got_value, expected_value, rtol=1e-5, atol=1e-6, equal_nan=True)


# -- in-place operators ---------------------------------------------------------------------------------


def test_inplace_updates_every_alias(pool: gp.Pool) -> None:
    a = np.arange(21, dtype=np.float64).reshape(7, 3)
    x = pool.asarray(a)
    alias = x

    def center(v: gp.RemoteArray) -> None:
        v -= v.mean(0)

    center(alias)
    np.testing.assert_allclose(x.get(), a - a.mean(0))
    x *= 2
    x += 1
    x /= 4
    np.testing.assert_allclose(alias.get(), ((a - a.mean(0)) * 2 + 1) / 4)


def test_inplace_keeps_what_was_built_before(pool: gp.Pool) -> None:
    a = np.arange(12, dtype=np.float32).reshape(6, 2)
    x = pool.asarray(a)
    before = x * 10  # pending: reads x's old value
    w = pool.asarray(np.eye(2, dtype=np.float32))
    prod = x @ w
    x += 1
    x += 1
    np.testing.assert_allclose(before.get(), a * 10)
    np.testing.assert_allclose(x.get(), a + 2)
    np.testing.assert_allclose(prod.get(), a)
    y = x * 1
    x **= 2
    np.testing.assert_allclose(y.get(), a + 2)
    np.testing.assert_allclose(x.get(), (a + 2) ** 2)


def test_inplace_casts_same_kind_like_numpy(pool: gp.Pool) -> None:
    a = np.arange(10, dtype=np.int32).reshape(5, 2)
    x = pool.asarray(a)
    x += np.int64(3)
    x //= 2
    x %= 3
    expected = a.copy()
    expected += np.int64(3)
    expected //= 2
    expected %= 3
    assert x.dtype == np.int32
    np.testing.assert_array_equal(x.get(), expected)
    with pytest.raises(TypeError):
        x /= 2  # float64 result into int32: NumPy's UFuncTypeError
    with pytest.raises(ValueError, match="broadcast"):
        x += np.ones((5, 2, 2))
    np.testing.assert_array_equal(x.get(), expected)  # failed updates change nothing
    f = pool.asarray(np.ones((4, 3), np.float32))
    f += np.ones(3, np.float64)
    assert f.dtype == np.float32
    np.testing.assert_allclose(f.get(), 2)
    np.subtract(f, 1, out=f)
    np.testing.assert_allclose(f.get(), 1)


def test_bool_logic_operators(pool: gp.Pool) -> None:
    a = np.array([[True, False], [False, False], [True, True]])
    x = pool.asarray(a)
    np.testing.assert_array_equal((x & ~x).get(), a & ~a)
    np.testing.assert_array_equal((x | (x ^ True)).get(), a | (a ^ True))
    x &= np.array([True, False])
    np.testing.assert_array_equal(x.get(), a & np.array([True, False]))


# -- reductions -----------------------------------------------------------------------------------------

AXES = [None, 0, 1, -1, (0, 1), (1, 2), (0, 2)]


@pytest.mark.parametrize("op", ["sum", "prod", "max", "min", "mean", "any", "all", "var", "std"])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("keepdims", [False, True])
def test_reductions_take_axes_and_keepdims(pool: gp.Pool, op: str, axis: object, keepdims: bool) -> None:
    a = np.random.default_rng(1).normal(size=(9, 4, 3))
    x = pool.asarray(a)
    close(getattr(x, op)(axis=axis, keepdims=keepdims), getattr(a, op)(axis=axis, keepdims=keepdims))
    close(getattr(np, op)(x, axis=axis, keepdims=keepdims), getattr(np, op)(a, axis=axis, keepdims=keepdims))


@pytest.mark.parametrize("op", ["nansum", "nanprod", "nanmax", "nanmin", "nanmean", "count_nonzero"])
@pytest.mark.parametrize("axis", [None, 0, 1, (0, 1)])
def test_nan_reductions(pool: gp.Pool, op: str, axis: object) -> None:
    a = np.random.default_rng(2).normal(size=(8, 5))
    a[a > 0.8] = np.nan
    a[:, 2] = np.nan
    a[3] = 0
    x = pool.asarray(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy warns for all-NaN slices; gpupool does not
        expected = getattr(np, op)(a, axis=axis)
    close(getattr(np, op)(x, axis=axis), expected)


@settings(FAST)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 4),
    ddof=st.integers(0, 3),
    axis=st.sampled_from([None, 0, 1, (0, 1)]),
    dtype=st.sampled_from(["float32", "float64", "int32"]),
)
def test_var_std_with_ddof(pool: gp.Pool, rows: int, cols: int, ddof: int, axis: object, dtype: str) -> None:
    a = (np.random.default_rng(rows * 10 + cols).normal(size=(rows, cols)) * 5).astype(dtype)
    x = pool.asarray(a)
    for op in ("var", "std"):
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # ddof >= count: NumPy warns, gpupool does not
            expected = getattr(np, op)(a, axis=axis, ddof=ddof)
        got = getattr(np, op)(x, axis=axis, ddof=ddof)
        got_value = value(got)
        assert got_value.dtype == np.asarray(expected).dtype
        np.testing.assert_allclose(got_value, expected, rtol=1e-4, atol=1e-5, equal_nan=True)


@settings(FAST)
@given(
    rows=st.integers(1, 10),
    cols=st.integers(1, 4),
    axis=st.sampled_from([None, 0, 1, -1]),
    keepdims=st.booleans(),
    ties=st.booleans(),
    nans=st.booleans(),
)
def test_argmax_argmin(
    pool: gp.Pool, rows: int, cols: int, axis: int | None, keepdims: bool, ties: bool, nans: bool
) -> None:
    rng = np.random.default_rng(rows * 7 + cols)
    a = rng.integers(0, 3, size=(rows, cols)).astype(np.float64) if ties else rng.normal(size=(rows, cols))
    if nans:
        a[rng.random(a.shape) < 0.2] = np.nan
    x = pool.asarray(a)
    for op in ("argmax", "argmin"):
        close(getattr(x, op)(axis=axis, keepdims=keepdims), getattr(a, op)(axis=axis, keepdims=keepdims))
        close(getattr(np, op)(x, axis=axis), getattr(np, op)(a, axis=axis))


def test_argmax_of_ints_and_one_row_shards(pool: gp.Pool) -> None:
    a = np.array([[5, 1], [5, 9]], dtype=np.int64)  # one row per agent; ties across shards
    x = pool.asarray(a)
    assert [s.rows for s in x.shards] == [1, 1]
    close(x.argmax(axis=0), a.argmax(axis=0))
    close(x.argmin(), a.argmin())
    assert int(np.argmax(x)) == 3


def test_empty_shards_and_empty_arrays(pool: gp.Pool) -> None:
    one = pool.asarray(np.array([[3.0, 1.0]]))  # a single row: one agent holds it all
    assert sum(s.rows for s in one.shards) == 1
    close(one.std(0), np.array([0.0, 0.0]))
    close(one.var(), np.var([3.0, 1.0]))
    assert int(one.argmin()) == 1
    close(np.cumsum(one, axis=0), np.array([[3.0, 1.0]]))
    empty = pool.asarray(np.zeros((0, 3)))
    close(empty.sum(0), np.zeros(3))
    with pytest.raises(ValueError, match="empty sequence"):
        empty.argmax()


# -- elementwise and scans ------------------------------------------------------------------------------


def test_clip_round_where_isnan(pool: gp.Pool) -> None:
    a = np.random.default_rng(3).normal(size=(7, 3)) * 10
    a[2, 1] = np.nan
    x = pool.asarray(a)
    close(np.clip(x, -1, 2.5), np.clip(a, -1, 2.5))
    close(x.clip(max=0), a.clip(max=0))
    close(x.clip(min=np.zeros(3)), a.clip(min=np.zeros(3)))
    close(np.round(x, 1), np.round(a, 1))
    close(x.round(), a.round())
    close(np.where(x > 0, x, 0.0), np.where(a > 0, a, 0.0))
    close(np.where(np.isnan(x), 0.0, x), np.where(np.isnan(a), 0.0, a))
    close(np.isfinite(x), np.isfinite(a))


@pytest.mark.parametrize("op", ["cumsum", "cumprod"])
@pytest.mark.parametrize("dtype", ["float64", "int32", "bool"])
def test_scans(pool: gp.Pool, op: str, dtype: str) -> None:
    a = (np.random.default_rng(4).random((9, 3)) * 3 + 0.5).astype(dtype)
    x = pool.asarray(a)
    for axis in (0, 1, -1):
        close(getattr(np, op)(x, axis=axis), getattr(np, op)(a, axis=axis))
    v = pool.asarray(a[:, 0].copy())
    close(getattr(v, op)(), getattr(a[:, 0], op)())


# -- the host fallback ----------------------------------------------------------------------------------


def test_unimplemented_functions_run_on_the_host_once_warned(pool: gp.Pool) -> None:
    gp.coverage(reset=True)
    a = np.random.default_rng(5).normal(size=(6, 4))
    x = pool.asarray(a)
    with pytest.warns(HostFallbackWarning, match="numpy.triu"):
        got = np.triu(x)
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, np.triu(a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(np.triu(x, 1), np.triu(a, 1))  # warned once only
    with pytest.warns(HostFallbackWarning, match="numpy.cumsum"):
        close(np.cumsum(x), np.cumsum(a))  # flattened scan of 2-D: on the host
    np.std(x)
    report = gp.coverage()
    assert report["triu"] == {"pool": 0, "host": 2}
    assert report["std"]["pool"] == 1
    assert issubclass(gp.HostFallbackWarning, UserWarning)


def test_inplace_on_pending_arrays_and_long_chains(pool: gp.Pool) -> None:
    a = np.arange(15, dtype=np.float64).reshape(5, 3)
    x = pool.asarray(a) * 2  # pending
    y = x + 1  # reads x's pending value
    x += 1
    assert x.pending
    np.testing.assert_allclose(y.get(), a * 2 + 1)
    np.testing.assert_allclose(x.get(), a * 2 + 1)
    for _ in range(60):  # deeper than MAX_DEPTH: computed as it grows
        x -= 0.5
    np.testing.assert_allclose(x.get(), a * 2 + 1 - 30)


def test_reductions_of_pending_arrays(pool: gp.Pool) -> None:
    a = np.random.default_rng(6).normal(size=(11, 4))
    x = pool.asarray(a)
    y = np.tanh(x) * 3
    e = np.tanh(a) * 3
    close(y.std(0, ddof=1), e.std(0, ddof=1))
    close(y.argmax(0), e.argmax(0))
    close(np.nanmean(y, axis=0), np.nanmean(e, axis=0))
    close(y.var(axis=1, ddof=1), e.var(axis=1, ddof=1))
    softmax = np.exp(y - y.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    ref = np.exp(e - e.max(axis=1, keepdims=True))
    close(softmax, ref / ref.sum(axis=1, keepdims=True))


@settings(FAST)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
    op=st.sampled_from(["sum", "max", "mean", "var", "count_nonzero", "nanmin"]),
    data=st.data(),
)
def test_reductions_over_random_axes(
    pool: gp.Pool, shape: tuple[int, ...], op: str, data: st.DataObject
) -> None:
    axes = data.draw(st.lists(st.integers(-len(shape), len(shape) - 1), unique_by=lambda i: i % len(shape)))
    axis = data.draw(st.sampled_from([None, tuple(axes)] + ([axes[0]] if axes else [])))
    keepdims = data.draw(st.booleans())
    a = np.random.default_rng(len(shape)).normal(size=shape)
    x = pool.asarray(a)
    if axis == ():
        return  # axis=() runs on the host (tested with the fallback)
    close(getattr(np, op)(x, axis=axis, keepdims=keepdims), getattr(np, op)(a, axis=axis, keepdims=keepdims))


def test_inplace_on_a_replicated_operand(pool: gp.Pool) -> None:
    a = np.arange(12, dtype=np.float64).reshape(6, 2)
    m = np.array([[1.0, 2.0], [3.0, 4.0]])
    x, w = pool.asarray(a), pool.asarray(m)
    before = x @ w  # pending, w copied to each worker
    w *= 3
    np.testing.assert_allclose(before.get(), a @ m)
    np.testing.assert_allclose((x @ w).get(), a @ (m * 3))
