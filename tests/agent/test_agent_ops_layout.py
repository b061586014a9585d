"""Ordering, layout within a shard and tmatmul, against NumPy; malformed params are bad requests."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .ops_more_helpers import arrays, assert_same, axes_of, cuts, refusal, run_op

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def an_axis(data: st.DataObject, ndim: int) -> int:
    return data.draw(st.integers(-ndim, ndim - 1))


@pytest.mark.parametrize("name", ["sort", "argsort"])
@SETTINGS
@given(data=st.data())
def test_sort_and_stable_argsort(name: str, data: st.DataObject) -> None:
    x = data.draw(arrays(nan=True))
    axis = data.draw(st.none() | st.integers(-x.ndim, x.ndim - 1)) if x.ndim else None
    want = np.sort(x, axis=axis) if name == "sort" else np.argsort(x, axis=axis, kind="stable")
    got = run_op(name, [x], want.dtype, want.shape, params=[] if axis is None else [axis])
    assert_same(got, want)
    assert not np.shares_memory(got, x)


@SETTINGS
@given(data=st.data())
def test_partition_puts_the_kth_element_in_place(data: st.DataObject) -> None:
    x = data.draw(arrays(dtypes=["int32", "int64", "float32", "float64"], min_dims=1, min_side=1))
    axis = an_axis(data, x.ndim)
    kth = data.draw(st.integers(-x.shape[axis], x.shape[axis] - 1))
    got = run_op("partition", [x], x.dtype, x.shape, params=[axis, kth])
    ordered = np.sort(x, axis=axis)
    k = kth % x.shape[axis]
    pivot = np.take(got, [k], axis=axis)
    np.testing.assert_array_equal(pivot, np.take(ordered, [k], axis=axis))
    before, after = np.split(got, [k], axis=axis)
    assert np.all(before <= pivot)
    assert np.all(np.delete(after, 0, axis=axis) >= pivot)
    assert refusal("partition", [x], x.dtype, x.shape, params=[axis, x.shape[axis]]) == "bad-request"


@st.composite
def slices(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Python slices of the leading axes, with negative, missing and out-of-range bounds and steps."""
    count = draw(st.integers(0, len(shape)))
    bound = st.none() | st.integers(-8, 8)
    step = st.none() | st.integers(-3, 3).filter(bool)
    return tuple(slice(draw(bound), draw(bound), draw(step)) for _ in range(count))


@SETTINGS
@given(data=st.data())
def test_slices_normalised_as_the_client_will_match_numpy(data: st.DataObject) -> None:
    x = data.draw(arrays(min_dims=1, max_side=6))
    index = data.draw(slices(x.shape))
    params = [n for axis, item in enumerate(index) for n in item.indices(x.shape[axis])]
    want = x[index]
    got = run_op("slice", [x], x.dtype, want.shape, params=params)
    assert_same(got, want)
    assert not np.shares_memory(got, x)


@pytest.mark.parametrize(
    "params",
    [[0, 4, 0], [0, 5, 1], [-1, 3, 1], [3, -2, -1], [0, 4], [0, 4, 1, 0, 2, 1, 0, 1, 1]],
    ids=["zero-step", "past-the-end", "before-the-start", "below-zero", "not-triples", "too-many-axes"],
)
def test_malformed_slices_are_bad_requests(params: list[int]) -> None:
    assert refusal("slice", [np.ones((4, 2))], "float64", (4, 2), params=params) == "bad-request"


def test_an_empty_range_and_a_reversed_one_to_the_start() -> None:
    x = np.arange(5)
    assert_same(run_op("slice", [x], "int64", (0,), params=[3, 3, 1]), x[3:3])
    assert_same(run_op("slice", [x], "int64", (5,), params=list(slice(None, None, -1).indices(5))), x[::-1])
    assert_same(run_op("slice", [x], "int64", (0,), params=list(slice(-9, None, -1).indices(5))), x[-9::-1])


@SETTINGS
@given(data=st.data())
def test_take_along_an_axis_or_flattened(data: st.DataObject) -> None:
    x = data.draw(arrays(min_dims=1, min_side=1))
    axis = data.draw(st.none() | st.integers(-x.ndim, x.ndim - 1))
    length = x.size if axis is None else x.shape[axis]
    indices = np.array(data.draw(st.lists(st.integers(-length, length - 1), max_size=6)), np.int64)
    want = np.take(x, indices, axis=axis)
    params = [] if axis is None else [axis]
    assert_same(run_op("take", [x, indices], x.dtype, want.shape, params=params), want)
    out_of_range = np.array([length], np.int64)
    assert refusal("take", [x, out_of_range], x.dtype, want.shape, params=params) == "kernel-failed"
    floats = indices.astype(np.float64)
    assert refusal("take", [x, floats], x.dtype, want.shape, params=params) == "bad-request"


@SETTINGS
@given(data=st.data())
def test_compress_keeps_the_rows_of_a_mask(data: st.DataObject) -> None:
    x = data.draw(arrays(min_dims=1))
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=x.shape[0], max_size=x.shape[0])), bool)
    want = x[mask]
    assert_same(run_op("compress", [x, mask], x.dtype, want.shape), want)
    longer = np.ones(x.shape[0] + 1, bool)
    assert refusal("compress", [x, longer], x.dtype, want.shape) == "bad-request"
    assert refusal("compress", [x, mask.astype(np.int64)], x.dtype, want.shape) == "bad-request"


@SETTINGS
@given(data=st.data())
def test_transpose_swapaxes_and_expand_dims(data: st.DataObject) -> None:
    x = data.draw(arrays(max_dims=4))
    order = data.draw(st.permutations(range(x.ndim)))
    want = np.transpose(x, order)
    assert_same(run_op("transpose", [x], x.dtype, want.shape, axes=order), want)
    assert_same(run_op("transpose", [x], x.dtype, x.T.shape), x.T)
    if x.ndim:
        first, second = an_axis(data, x.ndim), an_axis(data, x.ndim)
        want = np.swapaxes(x, first, second)
        assert_same(run_op("swapaxes", [x], x.dtype, want.shape, params=[first, second]), want)
    where = data.draw(st.integers(-x.ndim - 1, x.ndim))
    want = np.expand_dims(x, where)
    assert_same(run_op("expand_dims", [x], x.dtype, want.shape, params=[where]), want)


@SETTINGS
@given(data=st.data())
def test_reshape_and_squeeze(data: st.DataObject) -> None:
    x = data.draw(arrays(max_side=4))
    shape = data.draw(st.permutations([*x.shape, 1]))
    want = x.reshape(shape)
    got = run_op("reshape", [x], x.dtype, want.shape, params=shape)
    assert_same(got, want)
    assert not np.shares_memory(got, x)
    ones = [axis for axis, n in enumerate(want.shape) if n == 1]
    chosen = data.draw(axes_of(want.ndim).map(lambda axes: [a for a in axes if a % want.ndim in ones]))
    squeezed = np.squeeze(want, axis=tuple(chosen) if chosen else None)  # no axes: every axis of length 1
    assert_same(run_op("squeeze", [want], x.dtype, squeezed.shape, axes=chosen), squeezed)
    assert_same(run_op("squeeze", [want], x.dtype, np.squeeze(want).shape), np.squeeze(want))


@pytest.mark.parametrize(
    ("name", "shape", "args"),
    [
        ("reshape", (4, 3), {"params": [5, 3]}),
        ("reshape", (12,), {"params": [-1]}),
        ("transpose", (3, 4), {"axes": [0]}),
        ("transpose", (3, 4), {"axes": [0, 0]}),
        ("transpose", (3, 4), {"params": [1, 0]}),
        ("squeeze", (4,), {"axes": [0]}),
        ("expand_dims", (1, 4, 3), {"params": [4]}),
        ("expand_dims", (1, 4, 3), {}),
        ("swapaxes", (3, 4), {"params": [0, 2]}),
        ("swapaxes", (3, 4), {"params": [0]}),
        ("sort", (4, 3), {"params": [2]}),
        ("sort", (4, 3), {"axes": [0]}),
        ("take", (4, 3), {"params": [0, 1]}),
    ],
)
def test_malformed_layout_params_are_bad_requests(
    name: str, shape: tuple[int, ...], args: dict[str, Any]
) -> None:
    x = np.ones((4, 3))
    operands: list[Any] = [x, np.array([0])] if name == "take" else [x]
    assert refusal(name, operands, "float64", shape, **args) == "bad-request"


@SETTINGS
@given(data=st.data())
def test_concatenate_any_number_of_arrays(data: st.DataObject) -> None:
    base = data.draw(arrays(dtypes=["int32", "float64"], min_dims=1))
    axis = an_axis(data, base.ndim)
    parts = []
    for _ in range(data.draw(st.integers(1, 4))):
        shape = list(base.shape)
        shape[axis] = data.draw(st.integers(0, 3))
        parts.append(np.full(shape, len(parts), base.dtype))
    want = np.concatenate(parts, axis=axis)
    assert_same(run_op("concatenate", parts, want.dtype, want.shape, params=[axis]), want)
    flat = np.concatenate([p.ravel() for p in parts])
    assert_same(run_op("concatenate", parts, flat.dtype, flat.shape), flat)


def test_concatenate_refusals() -> None:
    assert refusal("concatenate", [], "float64", (0,)) == "bad-request"
    assert (
        refusal("concatenate", [np.ones((2, 3)), np.ones((2, 4))], "float64", (4, 3), params=[0])
        == "kernel-failed"
    )


@SETTINGS
@given(data=st.data())
def test_tmatmul_partials_over_row_splits_sum_to_x_t_y(data: st.DataObject) -> None:
    rows, k, n = (data.draw(st.integers(0, 9)) for _ in range(3))
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    vector = data.draw(st.booleans())
    x = rng.standard_normal(rows if vector else (rows, k))
    y = rng.standard_normal((rows, n))
    want = x.T @ y
    total = np.zeros(want.shape)
    for start, stop in cuts(data.draw, rows):
        total += run_op("tmatmul", [x[start:stop], y[start:stop]], "float64", want.shape)
    np.testing.assert_allclose(total, want, atol=1e-12)
    assert refusal("tmatmul", [np.ones((2, 2, 2)), np.ones((2, 2))], "float64", (2, 2, 2)) == "bad-request"
    assert refusal("tmatmul", [np.ones((3, 2)), np.ones((4, 2))], "float64", (2, 2)) == "kernel-failed"
