"""Property tests against NumPy on a real two-agent pool for the operations that move rows between agents
or need another layout: elementwise work and ``x.T @ y`` between arrays laid out differently, ``xs @ ys.T``,
transposes, swaps and reshapes across axis 0, sort and argsort along axis 0, concatenate along axis 0; and
reductions over data with NaN. Random shapes, dtypes and shardings as in test_properties.py.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gpupool as gp

from .property_helpers import (
    FLOATS,
    NUMERIC,
    POOL_SETTINGS,
    assert_like,
    elements,
    magnitude,
    numpy_result,
    on_pool,
    partitions,
    quiet,
    shapes,
    sharded,
    upload,
)


@POOL_SETTINGS
@given(data=st.data(), example=sharded(dtypes=NUMERIC, shape=shapes(min_rows=1)))
def test_elementwise_between_layouts(pool: gp.Pool, data: st.DataObject, example: Any) -> None:
    host, _ = example
    other = data.draw(hnp.arrays(host.dtype, host.shape, elements=elements(host.dtype)), label="other")
    rows = data.draw(partitions(host.shape[0]), label="other rows")
    x, y = upload(pool, example), pool.asarray(other, rows=rows)
    with on_pool():
        got = x * 2 - y
        assert isinstance(got, gp.RemoteArray)
        assert_like(got, host * 2 - other, scale=magnitude(host) + magnitude(other))


@POOL_SETTINGS
@given(data=st.data(), left=sharded(dtypes=NUMERIC, shape=shapes(min_dims=2, max_dims=2, min_rows=1)))
def test_transposed_matmul_between_layouts(pool: gp.Pool, data: st.DataObject, left: Any) -> None:
    host, _ = left
    dtype = data.draw(st.sampled_from(NUMERIC), label="y dtype")
    y_shape = data.draw(st.sampled_from([host.shape[:1], (host.shape[0], 3)]), label="y shape")
    y_host = data.draw(hnp.arrays(dtype, y_shape, elements=elements(dtype)), label="y")
    x = upload(pool, left)
    y = pool.asarray(y_host, rows=data.draw(partitions(host.shape[0]), label="y rows"))
    scale = magnitude(host) * max(1.0, float(np.abs(y_host).max(initial=0)))
    with on_pool():
        assert_like(x.T @ y, host.T @ y_host, scale=scale)


@POOL_SETTINGS
@given(data=st.data(), left=sharded(dtypes=FLOATS, shape=shapes(min_dims=2, max_dims=2, min_rows=1)))
def test_matmul_with_a_transposed_sharded_array(pool: gp.Pool, data: st.DataObject, left: Any) -> None:
    host, _ = left
    rows = data.draw(st.integers(1, 6), label="ys rows")
    ys_host = data.draw(
        hnp.arrays(host.dtype, (rows, host.shape[1]), elements=elements(host.dtype)), label="ys"
    )
    xs = upload(pool, left)
    ys = pool.asarray(ys_host, rows=data.draw(partitions(rows), label="ys sharding"))
    scale = magnitude(host) * max(1.0, float(np.abs(ys_host).max(initial=0)))
    with on_pool():
        got = xs @ ys.T
        assert isinstance(got, gp.RemoteArray)
        assert_like(got, host @ ys_host.T, scale=scale)


@POOL_SETTINGS
@given(data=st.data(), example=sharded(shape=shapes(min_dims=2, min_rows=1)))
def test_moves_of_axis_zero(pool: gp.Pool, data: st.DataObject, example: Any) -> None:
    host, _ = example
    x = upload(pool, example)
    other = data.draw(st.integers(1, host.ndim - 1), label="other axis")
    with on_pool():
        if host.size:  # moves of axis 0 of empty arrays run on the host copy (README)
            swapped = np.swapaxes(x, 0, other)
            assert isinstance(swapped, gp.RemoteArray)
            assert_like(swapped, np.swapaxes(host, 0, other))
            assert_like(
                x.T * 1 if host.ndim == 2 else np.transpose(x), host.T * 1 if host.ndim == 2 else host.T
            )
            flat = x.reshape(-1)
            assert isinstance(flat, gp.RemoteArray)
            assert_like(flat, host.reshape(-1))


@POOL_SETTINGS
@given(data=st.data(), example=sharded(dtypes=NUMERIC, shape=shapes(max_dims=2, min_rows=1)))
def test_sort_along_axis_zero(pool: gp.Pool, data: st.DataObject, example: Any) -> None:
    host, _ = example
    if host.dtype.kind == "f" and data.draw(st.booleans(), label="with NaN"):
        host = host.copy()
        host.flat[:: max(1, host.size // 3)] = np.nan
        example = (host, example[1])
    x = upload(pool, example)
    if not host.size:  # moves of axis 0 of empty arrays run on the host copy (README): correct all the same
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gp.HostFallbackWarning)
            assert_like(np.sort(x, axis=0), np.sort(host, axis=0))
        return
    with on_pool():
        ordered = np.sort(x, axis=0)
        assert isinstance(ordered, gp.RemoteArray)
        assert_like(ordered, np.sort(host, axis=0))
        assert_like(np.argsort(x, axis=0), np.argsort(host, axis=0, kind="stable"))


@POOL_SETTINGS
@given(data=st.data(), first=sharded(dtypes=NUMERIC, shape=shapes(max_dims=2)))
def test_concatenate_along_axis_zero(pool: gp.Pool, data: st.DataObject, first: Any) -> None:
    host, _ = first
    rows = data.draw(st.integers(0, 6), label="second's rows")
    second = data.draw(
        hnp.arrays(host.dtype, (rows, *host.shape[1:]), elements=elements(host.dtype)), label="second"
    )
    x = upload(pool, first)
    y = pool.asarray(second, rows=data.draw(partitions(rows), label="second's sharding"))
    with on_pool():
        joined = np.concatenate([x, y, x])
        assert isinstance(joined, gp.RemoteArray)
        assert_like(joined, np.concatenate([host, second, host]))
        assert_like(joined * 2, np.concatenate([host, second, host]) * 2)


NAN_REDUCTIONS = ["nansum", "nanmax", "nanmin", "nanmean", "max", "argmax", "argmin", "sum"]


@POOL_SETTINGS
@given(data=st.data(), example=sharded(dtypes=FLOATS, shape=shapes(max_dims=2, min_rows=1)))
def test_reductions_over_nan(pool: gp.Pool, data: st.DataObject, example: Any) -> None:
    host, rows = example
    mask = data.draw(hnp.arrays(np.bool_, host.shape), label="NaN where")
    host = np.where(mask, np.nan, host).astype(host.dtype)
    name = data.draw(st.sampled_from(NAN_REDUCTIONS), label="reduction")
    axis = data.draw(st.none() | st.integers(0, host.ndim - 1), label="axis")
    function = getattr(np, name)
    try:
        want = numpy_result(lambda: function(host, axis=axis))
    except ValueError:
        return  # an empty slice: covered in test_properties.py
    x = upload(pool, (host, rows))
    with on_pool():
        assert_like(quiet(lambda: function(x, axis=axis)), want, scale=magnitude(np.nan_to_num(host)))
