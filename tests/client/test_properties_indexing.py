"""Property tests against NumPy on a real two-agent pool: indexing (basic keys on any axis with steps and
negative indices, integer arrays, boolean masks), assignment (``x[mask] = 0``, ``x[:, 0] = v``, basic keys
with scalars and arrays), in-place operators and aliasing (a helper's ``a -= a.mean(0)`` changes the
caller's array; arrays built before keep the old value), over random shapes, dtypes and shardings.

The strategies and checks are in property_helpers.py.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gpupool as gp

from .property_helpers import (
    DTYPES,
    FLOATS,
    NUMERIC,
    POOL_SETTINGS,
    assert_like,
    elements,
    magnitude,
    numpy_result,
    on_pool,
    quiet,
    shapes,
    sharded,
    upload,
)


@st.composite
def index_item(draw: st.DrawFn, length: int) -> Any:
    """One entry of a basic key for an axis of ``length``: an int in range (negative too) or a slice with
    any bounds (out of range too) and step."""
    if length and draw(st.integers(0, 3)) == 0:
        return draw(st.integers(-length, length - 1))
    bound = st.none() | st.integers(-length - 2, length + 2)
    step = draw(st.none() | st.sampled_from([1, 2, 3, -1, -2, -3]))
    return slice(draw(bound), draw(bound), step)


@st.composite
def basic_keys(draw: st.DrawFn, shape: tuple[int, ...], *, new_axes: bool = True) -> Any:
    """A basic key for ``shape``: entries for some leading axes, maybe an ``...`` followed by entries for
    some trailing axes, and, after the first entry, maybe a ``None`` (a new axis before the sharded axis 0
    runs on the host: not drawn)."""
    ndim = len(shape)
    leading = draw(st.integers(1, ndim))
    items: list[Any] = [draw(index_item(n)) for n in shape[:leading]]
    if draw(st.booleans()):
        trailing = draw(st.integers(0, ndim - leading))
        items += [Ellipsis, *(draw(index_item(n)) for n in shape[ndim - trailing :])]
    if new_axes and draw(st.integers(0, 3)) == 0:
        items.insert(draw(st.integers(1, len(items))), None)
    return items[0] if len(items) == 1 and draw(st.booleans()) else tuple(items)


@POOL_SETTINGS
@given(data=st.data(), example=sharded())
def test_basic_indexing(pool: gp.Pool, data: st.DataObject, example: Any) -> None:
    host, _ = example
    key = data.draw(basic_keys(host.shape), label="key")
    want = host[key]
    x = upload(pool, example)
    with on_pool():
        got = x[key]
        row = isinstance(key, int) or (isinstance(key, tuple) and isinstance(key[0], int))
        assert isinstance(got, np.ndarray | np.generic if row else gp.RemoteArray), type(got)
        assert_like(got, want)
        if isinstance(got, gp.RemoteArray):  # the result takes part in further work
            assert_like(got * 2 + 1, want * 2 + 1, scale=magnitude(want))
            assert_like(quiet(lambda: got.sum()), numpy_result(lambda: want.sum()), scale=magnitude(want))


@POOL_SETTINGS
@given(data=st.data(), example=sharded(shape=shapes(min_dims=2)))
def test_integer_array_indexing(pool: gp.Pool, data: st.DataObject, example: Any) -> None:
    host, _ = example
    axis = data.draw(st.integers(0, host.ndim - 1), label="axis")
    length = host.shape[axis]
    indices = data.draw(
        st.lists(st.integers(-length, length - 1), max_size=6) if length else st.just([]), label="indices"
    )
    as_array = data.draw(st.booleans(), label="as array")
    index: Any = np.asarray(indices, dtype=np.int64) if as_array else indices
    key = (*(slice(None),) * axis, index)
    want = host[key]
    x = upload(pool, example)
    if axis == 0 and not (len(indices) and host.size):  # no picks, or no data: the host copy, warned
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gp.HostFallbackWarning)
            assert_like(x[key], want)
        return
    with on_pool():  # on axis 0 too: each shard takes its picks, rows move agent to agent (README)
        got = x[key]
        assert isinstance(got, gp.RemoteArray)
        assert_like(got, want)


def _first_column(array: Any) -> Any:
    """``array[:, 0, ..., 0]`` (a 1-D array as it is): a row vector laid out as ``array``."""
    return array if array.ndim == 1 else array[(slice(None), *(0,) * (array.ndim - 1))]


@POOL_SETTINGS
@given(data=st.data(), example=sharded(explicit=True))
def test_boolean_mask_indexing(pool: gp.Pool, data: st.DataObject, example: Any) -> None:
    host, rows = example
    row_mask = data.draw(hnp.arrays(np.bool_, host.shape[:1]), label="row mask")
    x = upload(pool, example)
    mask = pool.asarray(row_mask, rows=rows)  # laid out as x
    with on_pool():
        got = x[mask]
        assert isinstance(got, gp.RemoteArray)
        assert_like(got, host[row_mask])
        if host.dtype.kind in "iuf" and all(host.shape[1:]):
            threshold = data.draw(elements(host.dtype), label="threshold")
            column = _first_column(host)
            assert_like(x[_first_column(x) > threshold], host[column > threshold])


@st.composite
def assignment(draw: st.DrawFn, host: np.ndarray) -> tuple[Any, Any]:
    """``(key, value)`` of an assignment gpupool runs on the pool: a basic key with a scalar, or with a value
    that varies along one axis only (a row slice's rows, or the other axes of one selection of rows)."""
    key = draw(basic_keys(host.shape, new_axes=False))
    selected = host[key].shape
    kind = draw(st.sampled_from(["scalar", "trailing", "rows"]))
    if kind == "scalar" or not selected:  # a Python or NumPy scalar of any dtype: NumPy's casting rules
        value = draw(elements(draw(st.sampled_from(DTYPES))))
        return key, value if draw(st.booleans()) else np.asarray(value)[()]
    if kind == "rows":
        items = key if isinstance(key, tuple) else (key,)
        if isinstance(items[0], slice) and len(selected) == 1:
            return key, draw(hnp.arrays(host.dtype, selected, elements=elements(host.dtype)))
    trailing = selected[1:] if len(selected) > 1 else selected
    shape = tuple(n if draw(st.booleans()) else 1 for n in trailing)
    return key, draw(hnp.arrays(host.dtype, shape, elements=elements(host.dtype)))


@POOL_SETTINGS
@given(data=st.data(), example=sharded())
def test_setitem_basic(pool: gp.Pool, data: st.DataObject, example: Any) -> None:
    host, _ = example
    key, value = data.draw(assignment(host), label="assignment")
    expected = host.copy()
    try:
        expected[key] = value
    except (OverflowError, ValueError, TypeError) as exc:  # a value NumPy does not cast: gpupool neither
        x = upload(pool, example)
        with pytest.raises(type(exc)):
            x[key] = value
        assert_like(x, host)
        return
    x = upload(pool, example)
    alias, before = x, x + 0
    with on_pool():
        x[key] = value
        assert_like(alias, expected)
        assert_like(before, host + 0)


@POOL_SETTINGS
@given(data=st.data(), example=sharded(dtypes=NUMERIC))
def test_setitem_masks_and_columns(pool: gp.Pool, data: st.DataObject, example: Any) -> None:
    host, _ = example
    threshold = data.draw(elements(host.dtype), label="threshold")
    fill = data.draw(elements(host.dtype), label="fill")
    expected = host.copy()
    x = upload(pool, example)
    with on_pool():
        x[x < threshold] = 0  # a remote mask shaped as x
        expected[expected < threshold] = 0
        assert_like(x, expected)
        if host.ndim >= 2 and host.shape[1]:
            # A per-row column for 2-D arrays; a value varying along rows and other axes is refused (README).
            column_shape = host.shape[:1] if host.ndim == 2 else ()
            column = data.draw(hnp.arrays(host.dtype, column_shape, elements=elements(host.dtype)))
            x[:, 0] = column
            expected[:, 0] = column
            x[:, -1] = fill
            expected[:, -1] = fill
            assert_like(x, expected)
            if all(host.shape[1:]):
                row_mask = _first_column(x) > threshold  # a remote row mask
                host_mask = _first_column(expected) > threshold
                x[row_mask] = fill
                expected[host_mask] = fill
        assert_like(x, expected)


INPLACE = {
    "+=": (operator.iadd, np.add),
    "-=": (operator.isub, np.subtract),
    "*=": (operator.imul, np.multiply),
    "/=": (operator.itruediv, np.divide),
}


@POOL_SETTINGS
@given(data=st.data(), example=sharded(dtypes=NUMERIC), name=st.sampled_from(sorted(INPLACE)))
def test_inplace_operators(pool: gp.Pool, data: st.DataObject, example: Any, name: str) -> None:
    host, _ = example
    update, ufunc = INPLACE[name]
    dtype = data.draw(st.sampled_from(DTYPES), label="other dtype")
    kind = data.draw(st.sampled_from(["scalar", "host", "remote"]), label="other")
    other: Any = (
        data.draw(elements(dtype))
        if kind == "scalar"
        else data.draw(hnp.arrays(dtype, host.shape, elements=elements(dtype)), label="other value")
    )
    expected = host.copy()
    try:
        numpy_result(lambda: update(expected, other))
    except (TypeError, OverflowError) as exc:  # same_kind casting or a scalar out of range: gpupool too
        x = upload(pool, example)
        with pytest.raises(type(exc)):
            quiet(lambda: update(x, other))
        assert_like(x, host)
        return
    x = upload(pool, example)
    remote_other = pool.asarray(other, rows=[s.rows for s in x.shards]) if kind == "remote" else other
    alias, before = x, x * 1
    with on_pool():
        result = numpy_result(lambda: update(x, remote_other))
        assert result is x
        assert_like(quiet(lambda: alias), expected, scale=magnitude(host))
        assert_like(before, host * 1)
        # NumPy's out= form updates the same way.
        numpy_result(lambda: ufunc(x, remote_other, out=x))
        assert_like(
            quiet(lambda: alias),
            numpy_result(lambda: ufunc(expected, other, out=expected)),
            scale=magnitude(host) ** 2,
        )


def _center(a: Any) -> None:
    a -= a.mean(0)


def _standardize(a: Any) -> None:
    a -= a.mean(axis=0, keepdims=True)
    a /= a.std(axis=0, ddof=0) + 1


@POOL_SETTINGS
@given(
    example=sharded(dtypes=FLOATS, shape=shapes(max_dims=2, min_rows=1)),
    helper=st.sampled_from([_center, _standardize]),
)
def test_helper_updates_callers_array(pool: gp.Pool, example: Any, helper: Any) -> None:
    host, _ = example
    expected = host.copy()
    numpy_result(lambda: helper(expected))
    x = upload(pool, example)
    before = x + 0
    with on_pool():
        numpy_result(lambda: helper(x))
        assert_like(x, expected, scale=magnitude(host))
        assert_like(before, host)
