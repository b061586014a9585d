"""Arrays made on the agent (full, arange, random) and the elementwise clip, where and round."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpupool._proto.v1 import agent_pb2
from gpupool.agent.ops import scalar_value

from .ops_more_helpers import DTYPES, arrays, assert_same, cuts, refusal, run_op

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_casts_and_broadcasts_its_fill_value(dtype: str) -> None:
    assert_same(run_op("full", [3], dtype, (2, 3)), np.full((2, 3), 3, dtype))
    typed = scalar_value(agent_pb2.Scalar(f=2.5, dtype="float64"))
    assert_same(run_op("full", [typed], dtype, (4,)), np.full((4,), typed, dtype))
    row = np.array([1, 0, 2], dtype)
    assert_same(run_op("full", [row], dtype, (2, 3)), np.full((2, 3), row, dtype))
    assert_same(run_op("full", [row[:1].reshape(())], dtype, ()), np.full((), row[0], dtype))
    assert refusal("full", [np.ones(4)], dtype, (2, 3)) == "kernel-failed"  # does not broadcast


@SETTINGS
@given(data=st.data())
def test_arange_shards_put_together_are_numpys_arange(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(["int32", "int64", "float32", "float64"]))
    if dtype.startswith("int"):
        start = data.draw(st.integers(-50, 50))
        step = data.draw(st.integers(-7, 7).filter(bool))
    else:
        start = data.draw(st.floats(-10, 10))
        step = data.draw(st.floats(0.01, 3) | st.floats(-3, -0.01))
    count = data.draw(st.integers(0, 400))
    want = np.arange(start, start + count * step, step, dtype=dtype)
    parts = [
        run_op("arange", [start, step], dtype, (stop - first,), params=[first])
        for first, stop in cuts(data.draw, len(want))
    ]
    got = np.concatenate(parts)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)  # exactly: each shard computes as numpy.arange fills


def test_arange_refusals() -> None:
    assert refusal("arange", [0, 1], "int64", (2, 2), params=[0]) == "bad-request"
    assert refusal("arange", [0, 1], "int64", (4,), params=[-1]) == "bad-request"
    assert refusal("arange", [0, 1], "int64", (4,)) == "bad-request"
    assert refusal("arange", [np.zeros(1), 1], "int64", (4,), params=[0]) == "bad-request"


@pytest.mark.parametrize("name", ["random_uniform", "random_normal"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_random_is_reproducible_per_seed_and_stream_and_differs_across_them(name: str, dtype: str) -> None:
    low, high = (2.0, 5.0) if name == "random_uniform" else (1.0, 3.0)  # loc and scale for the normal

    def draw(seed: int, stream: int, shape: tuple[int, ...] = (2000, 3)) -> np.ndarray:
        return run_op(name, [low, high], dtype, shape, params=[seed, stream])

    first = draw(7, 0)
    assert first.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(first, draw(7, 0))
    for other in (draw(7, 1), draw(8, 0), draw(7, 2)):
        assert not np.any(first == other)  # different numbers, not the same ones shifted
    streams = np.concatenate([draw(7, stream, (500,)) for stream in range(8)])
    assert len(np.unique(streams)) > 0.99 * streams.size  # no stream repeats (shifts of) another's numbers
    if name == "random_uniform":
        assert first.min() >= low
        assert first.max() <= high
        assert abs(first.mean() - 3.5) < 0.1
    else:
        assert abs(first.mean() - 1.0) < 0.15
        assert abs(first.std() - 3.0) < 0.15


@pytest.mark.parametrize(
    ("params", "dtype"),
    [([1], "float64"), ([-1, 0], "float64"), ([1, -2], "float64"), ([1, 0], "int64"), ([1, 0], "bool")],
)
def test_random_refusals(params: list[int], dtype: str) -> None:
    assert refusal("random_normal", [0.0, 1.0], dtype, (3,), params=params) == "bad-request"


@SETTINGS
@given(data=st.data())
def test_clip_where_and_round_match_numpy(data: st.DataObject) -> None:
    x = data.draw(arrays(dtypes=["int32", "int64", "float32", "float64"]))
    low, high = sorted(data.draw(st.lists(st.integers(-5, 5), min_size=2, max_size=2)))
    want = np.clip(x, low, high)
    assert_same(run_op("clip", [x, low, high], want.dtype, want.shape), want)
    bound = np.full(x.shape[-1:], float(high))  # an array bound, broadcast like NumPy's
    want = np.clip(x, low, bound)
    assert_same(run_op("clip", [x, low, bound], want.dtype, want.shape), want)
    want = np.where(x > 0, x, -1)
    assert_same(run_op("where", [x > 0, x, -1], want.dtype, want.shape), want)
    decimals = data.draw(st.integers(-2, 3))
    want = np.round(x, decimals)
    got = run_op("round", [x], want.dtype, want.shape, params=[decimals])
    assert_same(got, want)
    assert not np.shares_memory(got, x)  # NumPy rounds integers to the operand itself; the agent copies
    assert refusal("round", [x], want.dtype, want.shape, params=[1, 2]) == "bad-request"
    assert refusal("clip", [x, low], want.dtype, want.shape) == "bad-request"
