"""Helpers for the tests of the newer op families: run one op with NumPy, and strategies for arrays."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gpupool.agent.ops import Expected, OpArgs, apply_op
from gpupool.protocol.errors import RpcRefusal

DTYPES = ["bool", "int32", "int64", "float32", "float64"]


def expect(dtype: Any, shape: tuple[int, ...]) -> Expected:
    """What a client would declare for a result of ``dtype`` and ``shape``."""
    dt = np.dtype(dtype)
    return Expected(dt, tuple(shape), int(np.prod(shape)) * dt.itemsize)


def run_op(
    name: str,
    operands: Sequence[Any],
    dtype: Any,
    shape: tuple[int, ...],
    *,
    params: Sequence[int] = (),
    axes: Sequence[int] = (),
    keepdims: bool = False,
) -> np.ndarray:
    """One op through :func:`apply_op` with NumPy, as an agent runs it."""
    args = OpArgs(params=tuple(params), axes=tuple(axes), keepdims=keepdims)
    result: np.ndarray = apply_op(np, name, operands, expect(dtype, shape), args=args)
    return result


def refusal(name: str, operands: Sequence[Any], dtype: Any, shape: tuple[int, ...], **args: Any) -> str:
    """The kind of refusal one op gets."""
    with pytest.raises(RpcRefusal) as caught:
        run_op(name, operands, dtype, shape, **args)
    return caught.value.kind


def quietly(function: Callable[[], Any]) -> Any:
    """NumPy's answer, without the warnings it gives for empty or all-NaN slices (tests turn warnings into
    errors; the agent computes the same values without warning)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return function()


def assert_same(got: np.ndarray, want: Any) -> None:
    """Equal shape and dtype, and equal values (floats within their precision, NaN where NaN)."""
    want = np.asarray(want)
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    assert got.flags.c_contiguous
    if want.dtype.kind == "f":
        rtol = 1e-5 if want.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol, equal_nan=True)
    else:
        np.testing.assert_array_equal(got, want)


def elements(dtype: str, *, nan: bool = False) -> st.SearchStrategy[Any]:
    """Values of ``dtype`` small enough that sums and products stay exact enough to compare."""
    if dtype == "bool":
        return st.booleans()
    if dtype.startswith("int"):
        return st.integers(-9, 9)
    values = st.floats(-9, 9, width=32 if dtype == "float32" else 64)
    return values | st.just(float("nan")) if nan else values


@st.composite
def arrays(
    draw: st.DrawFn,
    *,
    dtypes: Sequence[str] = tuple(DTYPES),
    min_dims: int = 0,
    max_dims: int = 3,
    min_side: int = 0,
    max_side: int = 5,
    nan: bool = False,
) -> np.ndarray:
    """An array of a supported dtype and a random shape (empty dimensions included)."""
    dtype = draw(st.sampled_from(list(dtypes)))
    shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side))
    result: np.ndarray = draw(hnp.arrays(dtype, shape, elements=elements(dtype, nan=nan)))
    return result


@st.composite
def axes_of(draw: st.DrawFn, ndim: int) -> list[int]:
    """Distinct axes of an array of ``ndim`` dimensions, some counted from the end."""
    chosen = draw(st.lists(st.integers(0, max(ndim - 1, 0)), unique=True, max_size=ndim))
    return [axis - ndim if draw(st.booleans()) else axis for axis in chosen]


def cuts(draw: st.DrawFn, length: int, *, most: int = 4) -> list[tuple[int, int]]:
    """``[0, length)`` split into consecutive row ranges, some of them empty."""
    points = sorted(draw(st.lists(st.integers(0, length), max_size=most - 1)))
    bounds = [0, *points, length]
    return list(itertools.pairwise(bounds))
