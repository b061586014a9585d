"""Property tests against NumPy on a real two-agent pool: elementwise ops (broadcasting, scalars, host and
remote operands), reductions (axis None, int or tuple, keepdims, ddof), scans, clip, where, matmul and
``x.T @ y``, concatenate and sort, over random shapes (empty axes and one-row arrays too), dtypes and
shardings (uneven, one-row and empty shards, through ``rows=``).

Indexing, assignment and in-place operators are in test_properties_indexing.py. The strategies and checks
are in property_helpers.py; ``GPUPOOL_PROPERTY_EXAMPLES`` sets how many examples each test draws.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gpupool as gp
from gpupool.client.values import PendingValue

from .property_helpers import (
    DTYPES,
    FLOATS,
    NUMERIC,
    POOL_SETTINGS,
    assert_like,
    carried,
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

BINARY = ["add", "subtract", "multiply", "maximum", "minimum", "less", "equal", "not_equal", "greater_equal"]
FLOAT_BINARY = ["divide", "arctan2", "hypot", "fmax"]
BOOL_BINARY = ["logical_and", "logical_or", "logical_xor"]
UNARY = ["negative", "absolute", "sign", "square", "floor", "isfinite"]
FLOAT_UNARY = ["tanh", "sin", "exp", "sqrt", "log1p", "rint", "trunc"]


@st.composite
def broadcast_operand(draw: st.DrawFn, host: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """A host array that broadcasts against ``host`` without spreading it: a trailing part of its shape,
    some axes of length 1."""
    keep = draw(st.integers(0, host.ndim - 1))
    shape = tuple(n if draw(st.booleans()) else 1 for n in host.shape[host.ndim - keep :])
    return draw(hnp.arrays(dtype, shape, elements=elements(dtype)))


@st.composite
def operand(draw: st.DrawFn, host: np.ndarray, rows: tuple[int, ...] | None) -> tuple[str, Any]:
    """The other operand of a binary op with ``host``: a Python or NumPy scalar, a broadcast host array,
    a host array of the same shape, or a remote one laid out the same (``("remote", host)``)."""
    dtype = draw(st.sampled_from([host.dtype, *DTYPES]))
    kind = draw(st.sampled_from(["python", "numpy", "broadcast", "same", "remote"]))
    if kind == "python":
        value = draw(elements(dtype))
        return kind, value.item() if isinstance(value, np.generic) else value
    if kind == "numpy":
        return kind, dtype.type(draw(elements(dtype)))
    if kind == "broadcast":
        return kind, draw(broadcast_operand(host, dtype))
    return kind, draw(hnp.arrays(dtype, host.shape, elements=elements(dtype)))


@POOL_SETTINGS
@given(data=st.data(), example=sharded(), name=st.sampled_from(BINARY + FLOAT_BINARY + BOOL_BINARY))
def test_binary(pool: gp.Pool, data: st.DataObject, example: Any, name: str) -> None:
    host, rows = example
    kind, other = data.draw(operand(host, rows))
    reflected = data.draw(st.booleans())
    function = getattr(np, name)
    try:
        want = numpy_result(lambda: function(other, host) if reflected else function(host, other))
    except (TypeError, OverflowError) as exc:  # NumPy refuses the dtypes or a scalar: so does gpupool
        x = upload(pool, example)
        with pytest.raises(type(exc)):
            quiet(lambda: function(other, x) if reflected else function(x, other))
        return
    x = upload(pool, example)
    if kind == "remote":  # the same rows as x (on the same agents unless the coordinator placed x)
        other = pool.asarray(other, rows=[s.rows for s in x.shards])
    if not carried(np.asarray(want).dtype):  # arctan2 of bools is float16: refused before anything is sent
        with pytest.raises(gp.UnsupportedDType):
            function(other, x) if reflected else function(x, other)
        return
    with on_pool():
        got = function(other, x) if reflected else function(x, other)
        assert isinstance(got, gp.RemoteArray)
        assert_like(quiet(lambda: got), want, scale=magnitude(host))


@POOL_SETTINGS
@given(example=sharded(), name=st.sampled_from(UNARY + FLOAT_UNARY + ["logical_not", "isnan"]))
@example(example=(np.array([False]), (0, 1)), name="absolute")  # a one-row array with an empty shard
@example(example=(np.array([[1.5, -2.0]]), (1, 0, 0)), name="tanh")
def test_unary(pool: gp.Pool, example: Any, name: str) -> None:
    host, _ = example
    if name in FLOAT_UNARY and host.dtype.kind == "b":
        host = host.astype(np.float32)
        example = (host, example[1])
    function = getattr(np, name)
    try:
        want = numpy_result(lambda: function(host))
    except TypeError:
        return  # e.g. negative of bool: NumPy's own refusal, not a pool property
    x = upload(pool, example)
    if not carried(np.asarray(want).dtype):  # the square of bools is int8: refused before anything is sent
        with pytest.raises(gp.UnsupportedDType):
            function(x)
        return
    with on_pool():
        got = function(x)
        assert isinstance(got, gp.RemoteArray)
        assert_like(quiet(lambda: got), want, scale=magnitude(host))


@st.composite
def axes(draw: st.DrawFn, ndim: int, *, single: bool = False) -> Any:
    """``axis=``: None, an int (negative too) or, unless ``single``, a tuple of distinct axes."""
    kind = draw(st.sampled_from(["none", "int"] if single else ["none", "int", "tuple"]))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(-ndim, ndim - 1))
    chosen = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    return tuple(a - ndim if draw(st.booleans()) else a for a in chosen)


REDUCTIONS = ["sum", "mean", "max", "min", "prod", "any", "all", "var", "std"]


def _reduced_rows(axis: Any, ndim: int) -> bool:
    if axis is None:
        return True
    axes = axis if isinstance(axis, tuple) else (axis,)
    return 0 in {a % ndim for a in axes}


@POOL_SETTINGS
@given(data=st.data(), name=st.sampled_from(REDUCTIONS), keepdims=st.booleans(), ddof=st.integers(0, 2))
def test_reduction(pool: gp.Pool, data: st.DataObject, name: str, keepdims: bool, ddof: int) -> None:
    example = data.draw(sharded(small=name == "prod"), label="example")
    host, _ = example
    axis = data.draw(axes(host.ndim), label="axis")
    kwargs: dict[str, Any] = {"axis": axis, "keepdims": keepdims}
    if name in ("var", "std"):
        kwargs["ddof"] = ddof
    try:
        want = numpy_result(lambda: getattr(host, name)(**kwargs))
    except (ValueError, TypeError) as exc:  # an empty max, var of bools: gpupool raises the same
        x = upload(pool, example)
        with pytest.raises(type(exc)):
            quiet(lambda: getattr(x, name)(**kwargs))
        return
    x = upload(pool, example)
    with on_pool():
        got = numpy_result(lambda: getattr(x, name)(**kwargs))  # NumPy's warnings for empty slices too
        if host.size and host.ndim:
            expected_type = PendingValue if _reduced_rows(axis, host.ndim) else gp.RemoteArray
            assert isinstance(got, expected_type), f"{type(got).__name__}, not {expected_type.__name__}"
        scale = magnitude(host) ** 2 if name in ("var", "std") else magnitude(host)
        assert_like(quiet(lambda: got), want, scale=scale)
        # The same through NumPy's function.
        assert_like(quiet(lambda: getattr(np, name)(x, **kwargs)), want, scale=scale)


@POOL_SETTINGS
@given(data=st.data(), name=st.sampled_from(["argmax", "argmin"]), keepdims=st.booleans())
def test_arg_reduction(pool: gp.Pool, data: st.DataObject, name: str, keepdims: bool) -> None:
    example = data.draw(sharded(dtypes=NUMERIC), label="example")
    host, _ = example
    axis = data.draw(axes(host.ndim, single=True), label="axis")
    try:
        want = numpy_result(lambda: getattr(host, name)(axis=axis, keepdims=keepdims))
    except ValueError:  # an empty slice
        x = upload(pool, example)
        with pytest.raises(ValueError, match="empty"):
            quiet(lambda: getattr(x, name)(axis=axis, keepdims=keepdims))
        return
    x = upload(pool, example)
    with on_pool():
        assert_like(quiet(lambda: getattr(x, name)(axis=axis, keepdims=keepdims)), want)


@POOL_SETTINGS
@given(data=st.data(), name=st.sampled_from(["cumsum", "cumprod"]))
def test_scan(pool: gp.Pool, data: st.DataObject, name: str) -> None:
    example = data.draw(sharded(small=name == "cumprod"), label="example")
    host, _ = example
    # The flattened scan of a 2-D or larger array runs on the host (README): not drawn here.
    axis = data.draw(st.integers(-host.ndim, host.ndim - 1) | (st.none() if host.ndim == 1 else st.nothing()))
    want = numpy_result(lambda: getattr(np, name)(host, axis=axis))
    x = upload(pool, example)
    with on_pool():
        got = getattr(np, name)(x, axis=axis)
        assert isinstance(got, gp.RemoteArray)
        assert_like(quiet(lambda: got), want, scale=magnitude(host))
        assert_like(quiet(lambda: getattr(x, name)(axis)), want, scale=magnitude(host))


@POOL_SETTINGS
@given(data=st.data(), example=sharded(dtypes=NUMERIC))
def test_clip_and_where(pool: gp.Pool, data: st.DataObject, example: Any) -> None:
    host, _rows = example
    low = data.draw(st.none() | elements(host.dtype))  # bounds the array's dtype holds, as NumPy needs
    high = data.draw(st.none() | elements(host.dtype))
    if low is not None and high is not None and low > high:
        low, high = high, low
    x = upload(pool, example)
    with on_pool():
        if low is not None or high is not None:
            assert_like(np.clip(x, low, high), np.clip(host, low, high))
            assert_like(x.clip(low, high), host.clip(low, high))
        threshold = data.draw(elements(host.dtype))
        other = data.draw(st.sampled_from(["scalar", "remote"]))
        fill: Any = data.draw(elements(host.dtype)) if other == "scalar" else -x
        fill_host = fill if other == "scalar" else -host
        got = np.where(x > threshold, x, fill)
        assert isinstance(got, gp.RemoteArray)
        assert_like(got, np.where(host > threshold, host, fill_host))


@POOL_SETTINGS
@given(
    data=st.data(),
    left=sharded(dtypes=NUMERIC, shape=shapes(min_dims=2, max_dims=2)),
    remote_w=st.booleans(),
)
def test_matmul(pool: gp.Pool, data: st.DataObject, left: Any, remote_w: bool) -> None:
    host, _ = left
    inner = host.shape[1]
    dtype = data.draw(st.sampled_from(NUMERIC), label="w dtype")
    w_shape = data.draw(st.sampled_from([(inner,), (inner, data.draw(st.integers(0, 3)))]), label="w shape")
    w = data.draw(hnp.arrays(dtype, w_shape, elements=elements(dtype)), label="w")
    want = host @ w
    x = upload(pool, left)
    operand: Any = w
    if remote_w and w.ndim and w.shape[0]:
        operand = pool.asarray(w, rows=data.draw(partitions(w.shape[0]), label="w rows"))
    with on_pool():
        got = x @ operand
        assert isinstance(got, gp.RemoteArray)
        assert_like(got, want, scale=magnitude(host) * max(1.0, float(np.abs(w).max(initial=0))))


@POOL_SETTINGS
@given(data=st.data(), left=sharded(dtypes=NUMERIC, shape=shapes(min_dims=2, max_dims=2), explicit=True))
def test_transposed_matmul(pool: gp.Pool, data: st.DataObject, left: Any) -> None:
    host, _rows = left
    dtype = data.draw(st.sampled_from(NUMERIC), label="y dtype")
    y_shape = data.draw(st.sampled_from([host.shape[:1], (host.shape[0], 2)]), label="y shape")
    y_host = data.draw(hnp.arrays(dtype, y_shape, elements=elements(dtype)), label="y")
    x = upload(pool, left)
    # y laid out as x: uploaded with the same rows on the same agents.
    y = pool.asarray(y_host, rows=[s.rows for s in x.shards])
    scale = magnitude(host) * max(1.0, float(np.abs(y_host).max(initial=0)))
    with on_pool():
        assert_like(x.T @ y, host.T @ y_host, scale=scale)
        assert_like(x.T @ x, host.T @ host, scale=scale * magnitude(host))


@POOL_SETTINGS
@given(data=st.data(), example=sharded(shape=shapes(min_dims=2)))
def test_concatenate_and_sort(pool: gp.Pool, data: st.DataObject, example: Any) -> None:
    host, _ = example
    x = upload(pool, example)
    axis = data.draw(st.integers(1, host.ndim - 1), label="axis")
    with on_pool():
        joined = np.concatenate([x, x * 2, x], axis=axis)
        assert isinstance(joined, gp.RemoteArray)
        assert_like(joined, np.concatenate([host, host * 2, host], axis=axis))
        ordered = np.sort(x, axis=-1)
        assert isinstance(ordered, gp.RemoteArray)
        assert_like(ordered, np.sort(host, axis=-1))
        # Ties keep their order: NumPy's default sort of these small rows is stable, as the agents' is.
        assert_like(np.argsort(x, axis=-1), np.argsort(host, axis=-1, kind="stable"))


@POOL_SETTINGS
@given(example=sharded(dtypes=FLOATS, shape=shapes(min_dims=1, max_dims=2, min_rows=1)))
def test_chain_of_ops_fused(pool: gp.Pool, example: Any) -> None:
    # A pending chain with a reduction over rows and one over columns, forced together by gp.compute.
    host, _ = example
    x = upload(pool, example)
    with on_pool():
        y = np.tanh(x * 2 + 1) - x / 3
        if not host.shape[-1]:  # NumPy's max of no columns is an error: so is the pool's
            with pytest.raises(ValueError, match="zero-size"):
                y.max(axis=-1)
        per_row = y.max(axis=-1) if host.shape[-1] else None
        total, per_row = gp.compute(y.sum(), per_row)
    with np.errstate(all="ignore"):
        y_host = np.tanh(host * 2 + 1) - host / 3
    assert_like(total, y_host.sum(), scale=magnitude(y_host))
    assert_like(per_row, numpy_result(lambda: y_host.max(axis=-1)) if host.shape[-1] else per_row)


@pytest.mark.parametrize(
    ("dtype", "first", "then"), [("uint8", 2, -1), ("uint8", 1, 300), ("int8", 1, 200), ("uint32", 1, -5)]
)
def test_a_python_int_out_of_range_is_refused_after_one_in_range(
    pool: gp.Pool, dtype: str, first: int, then: int
) -> None:
    # Regression: result dtypes were cached by the scalar's type alone, so after x * 2 the refusal NumPy
    # gives x * -1 of a uint8 x (OverflowError) was skipped and the agent failed the op instead.
    x = pool.asarray(np.array([0, 3], dtype))
    np.testing.assert_array_equal((x * first).get(), np.array([0, 3], dtype) * first)
    with pytest.raises(OverflowError, match="out of bounds"):
        x * then
    with pytest.raises(OverflowError, match="out of bounds"):
        x += then
    np.testing.assert_array_equal(x.get(), np.array([0, 3], dtype))
