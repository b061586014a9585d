"""Reductions over axes with keepdims, partial results combined across shards, and scans, against NumPy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpupool.agent.ops import OpArgs, apply_op
from gpupool.protocol.errors import RpcRefusal

from .ops_more_helpers import arrays, assert_same, axes_of, cuts, expect, quietly, refusal, run_op

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

REDUCTIONS = [
    "sum",
    "prod",
    "max",
    "min",
    "mean",
    "any",
    "all",
    "var",
    "std",
    "count_nonzero",
    "nansum",
    "nanprod",
    "nanmax",
    "nanmin",
    "nanmean",
]


def reference(name: str, x: np.ndarray, axis: Any, keepdims: bool, **extra: Any) -> np.ndarray | None:
    """NumPy's result, or None where NumPy refuses (a max of nothing)."""
    try:
        return np.asarray(quietly(lambda: getattr(np, name)(x, axis=axis, keepdims=keepdims, **extra)))
    except ValueError:
        return None


@pytest.mark.parametrize("name", REDUCTIONS)
@SETTINGS
@given(data=st.data())
def test_reductions_over_axes_with_keepdims_match_numpy(name: str, data: st.DataObject) -> None:
    x = data.draw(arrays(nan=name.startswith("nan")))
    axes = data.draw(axes_of(x.ndim))
    keepdims = data.draw(st.booleans())
    want = reference(name, x, tuple(axes) if axes else None, keepdims)
    if want is None:
        assert refusal(name, [x], "float64", (), axes=axes, keepdims=keepdims) == "kernel-failed"
        return
    assert_same(run_op(name, [x], want.dtype, want.shape, axes=axes, keepdims=keepdims), want)


@pytest.mark.parametrize("name", ["var", "std"])
@SETTINGS
@given(data=st.data())
def test_var_and_std_take_ddof(name: str, data: st.DataObject) -> None:
    x = data.draw(arrays(dtypes=["int32", "float32", "float64"], max_side=4))
    axes = data.draw(axes_of(x.ndim))
    ddof = data.draw(st.integers(0, 5))  # at or past the count too: inf and nan, as NumPy, without a warning
    keepdims = data.draw(st.booleans())
    want = reference(name, x, tuple(axes) if axes else None, keepdims, ddof=ddof)
    assert want is not None
    got = run_op(name, [x], want.dtype, want.shape, params=[ddof], axes=axes, keepdims=keepdims)
    assert_same(got, want)


@pytest.mark.parametrize("name", ["argmax", "argmin"])
@SETTINGS
@given(data=st.data())
def test_argmax_and_argmin_over_one_axis_or_all(name: str, data: st.DataObject) -> None:
    x = data.draw(arrays(nan=True))
    axis = data.draw(st.none() | st.integers(-x.ndim, x.ndim - 1)) if x.ndim else None
    keepdims = data.draw(st.booleans())
    want = reference(name, x, axis, keepdims)
    axes = [] if axis is None else [axis]
    if want is None:
        assert refusal(name, [x], "int64", (), axes=axes, keepdims=keepdims) == "kernel-failed"
        return
    assert_same(run_op(name, [x], want.dtype, want.shape, axes=axes, keepdims=keepdims), want)


def test_the_older_has_axis_still_works_and_is_not_mixed_with_axes() -> None:
    x = np.arange(12.0).reshape(3, 4)
    got = apply_op(np, "var", [x], expect("float64", (4,)), args=OpArgs(params=(1,), axis=0))
    np.testing.assert_allclose(got, np.var(x, axis=0, ddof=1))
    got = apply_op(np, "sum", [x], expect("float64", (3,)), axis=-1)
    np.testing.assert_array_equal(got, x.sum(axis=-1))
    with pytest.raises(RpcRefusal, match="not both") as caught:
        apply_op(np, "sum", [x], expect("float64", (4,)), args=OpArgs(axes=(0,), axis=0))
    assert caught.value.kind == "bad-request"


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("sum", {"axes": [2]}),
        ("sum", {"axes": [0, -2]}),
        ("sum", {"params": [1]}),
        ("var", {"params": [-1]}),
        ("var", {"params": [1, 2]}),
        ("argmax", {"axes": [0, 1]}),
        ("cumsum", {"params": [2]}),
        ("cumsum", {"axes": [0]}),
        ("cumsum", {"keepdims": True}),
        ("moments", {"axes": [5]}),
    ],
)
def test_malformed_params_are_bad_requests(name: str, args: dict[str, Any]) -> None:
    assert refusal(name, [np.ones((3, 4))], "float64", (4,), **args) == "bad-request"


def chan(parts: list[np.ndarray]) -> np.ndarray:
    """Chan's parallel combination of moments (count, mean, M2): what the client does with them."""
    count, mean, squares = parts[0]
    for other_count, other_mean, other_squares in parts[1:]:
        total = count + other_count
        delta = other_mean - mean
        with np.errstate(all="ignore"):
            share = np.where(total > 0, other_count / total, 0.0)
            mean = mean + delta * share
            squares = squares + other_squares + delta * delta * count * share
        count = total
    return np.stack([count, mean, squares])


@SETTINGS
@given(data=st.data())
def test_moments_over_random_row_splits_combine_to_var_and_std(data: st.DataObject) -> None:
    x = data.draw(arrays(dtypes=["int32", "int64", "float32", "float64"], min_dims=1, max_side=9))
    over_rows = data.draw(st.booleans())  # the sharded axis only, or every axis
    axes = [0] if over_rows else []
    ddof = data.draw(st.integers(0, 2))
    parts = []
    for start, stop in cuts(data.draw, x.shape[0]):
        shard = x[start:stop]
        shape = (3, *x.shape[1:]) if over_rows else (3,)
        parts.append(run_op("moments", [shard], "float64", shape, axes=axes))
    count, _, squares = chan(parts)
    axis = 0 if over_rows else None
    exact = x.astype(np.float64)
    if x.shape[0] and (not over_rows or exact.size):
        assert np.all(count == (x.shape[0] if over_rows else x.size))
    if exact.size and exact.size // max(count.size, 1) - ddof > 0:
        with np.errstate(all="ignore"):
            variance = squares / (count - ddof)
        np.testing.assert_allclose(variance, np.var(exact, axis=axis, ddof=ddof), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(
            np.sqrt(variance), np.std(exact, axis=axis, ddof=ddof), rtol=1e-9, atol=1e-9
        )


def test_moments_layout_and_keepdims() -> None:
    x = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
    got = run_op("moments", [x], "float64", (3, 1, 2), axes=[0], keepdims=True)
    np.testing.assert_allclose(got[:, 0], [[3, 3], [3.0, 6.0], [8.0, 32.0]])
    empty = run_op("moments", [x[:0]], "float64", (3, 2), axes=[0])
    np.testing.assert_array_equal(empty, np.zeros((3, 2)))  # an empty shard adds nothing
    whole = run_op("moments", [x.astype(np.float32)], "float32", (3,))
    np.testing.assert_allclose(whole, [6, x.mean(), ((x - x.mean()) ** 2).sum()], rtol=1e-6)


def combine_extremes(name: str, parts: list[tuple[int, np.ndarray]], row_size: int) -> int:
    """The client's combination of (value, index) partials of row shards into a flat index of the whole."""
    best: tuple[float, int] | None = None
    for start, (value, index) in parts:
        candidate = (float(value), start * row_size + int(index))
        if best is None:
            best = candidate
        elif np.isnan(best[0]):
            break  # NumPy gives the first NaN
        elif np.isnan(candidate[0]) or (
            candidate[0] > best[0] if name == "argmax" else candidate[0] < best[0]
        ):
            best = candidate
    assert best is not None
    return best[1]


@pytest.mark.parametrize("name", ["argmax", "argmin"])
@SETTINGS
@given(data=st.data())
def test_argmax_partials_over_random_row_splits_combine_to_numpy(name: str, data: st.DataObject) -> None:
    x = data.draw(arrays(min_dims=1, min_side=1, max_side=7, nan=True))
    dtype = "float64" if x.dtype.kind == "f" else "int64"
    parts = []
    for start, stop in cuts(data.draw, x.shape[0]):
        if start == stop:
            continue  # the client sends nothing to an empty shard: an argmax of nothing fails
        pair = run_op(f"{name}_partial", [x[start:stop]], dtype, (2,))
        assert pair.dtype == np.dtype(dtype)
        parts.append((start, pair))
    row_size = int(np.prod(x.shape[1:]))
    assert combine_extremes(name, parts, row_size) == getattr(np, name)(x)


@pytest.mark.parametrize("name", ["argmax", "argmin"])
def test_argmax_partials_along_an_axis_and_refusals(name: str) -> None:
    x = np.random.default_rng(3).integers(-5, 5, (4, 6, 3))
    for axis, keepdims in [(0, False), (1, True), (-1, False)]:
        index = getattr(np, name)(x, axis=axis, keepdims=True)
        value = np.take_along_axis(x, index, axis=axis)
        if not keepdims:
            index, value = np.squeeze(index, axis), np.squeeze(value, axis)
        want = np.stack([value, index])
        got = run_op(f"{name}_partial", [x], "int64", want.shape, axes=[axis], keepdims=keepdims)
        np.testing.assert_array_equal(got, want)
    assert refusal(f"{name}_partial", [x[:0]], "int64", (2,)) == "kernel-failed"
    assert refusal(f"{name}_partial", [x], "int64", (2, 3), axes=[0, 1]) == "bad-request"


@pytest.mark.parametrize("name", ["cumsum", "cumprod"])
@SETTINGS
@given(data=st.data())
def test_scans_along_an_axis_or_flattened(name: str, data: st.DataObject) -> None:
    x = data.draw(arrays())
    axis = data.draw(st.none() | st.integers(-x.ndim, x.ndim - 1)) if x.ndim else None
    want = np.asarray(quietly(lambda: getattr(np, name)(x, axis=axis)))  # products overflow: inf
    params = [] if axis is None else [axis]
    assert_same(run_op(name, [x], want.dtype, want.shape, params=params), want)
