"""Users' kernels on the client: CuPy's signatures parsed and checked before anything is sent, and on a
pool of NumPy agents a clear refusal that loses nothing."""

from __future__ import annotations

import numpy as np
import pytest

import gpupool as gp
from gpupool.kernels import ShardSize, parse_params

SQUARE = gp.ElementwiseKernel("T x", "T y", "y = x * x", "square")


def test_params_parse_types_placeholders_and_raw() -> None:
    params = parse_params("float32 x, raw T y, int64 n")
    assert [(p.name, p.placeholder, p.raw) for p in params] == [
        ("x", "", False),
        ("y", "T", True),
        ("n", "", False),
    ]
    assert params[0].dtype == np.float32
    assert params[1].dtype is None
    assert parse_params("") == ()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("float32", "needs a type and a name"),
        ("floaty x", "unknown type 'floaty'"),
        ("float x", "unknown type 'float'"),  # CuPy takes NumPy's names in parameter lists
        ("const float32 x", "unknown keyword 'const'"),
        ("float32 2x", "not a valid parameter name"),
        ("float32 x, T x", "used twice"),
    ],
)
def test_malformed_params_are_usage_errors(text: str, words: str) -> None:
    with pytest.raises(gp.UsageError, match=words):
        gp.ElementwiseKernel(text, "float32 y", "y = 0")


def test_constructors_check_what_cupy_would() -> None:
    with pytest.raises(gp.UsageError, match="identifier"):
        gp.ElementwiseKernel("T x", "T y", "y = x", "my kernel")
    with pytest.raises(gp.UsageError, match="needs its operation"):
        gp.ElementwiseKernel("T x", "T y", "  ")
    with pytest.raises(gp.UsageError, match="both as input and output"):
        gp.ElementwiseKernel("T x", "T x", "x = x")
    with pytest.raises(gp.UsageError, match="loop_prep"):
        gp.ElementwiseKernel("T x", "T y", "y = x", loop_prep="int k = 0;")
    with pytest.raises(gp.UsageError, match="options must be strings"):
        gp.ElementwiseKernel("T x", "T y", "y = x", options=(3,))
    with pytest.raises(gp.UsageError, match="one output"):
        gp.ReductionKernel("T x", "T y, T z", "x", "a + b", "y = a", "0")
    with pytest.raises(gp.UsageError, match="reduce_type 'struct pair'"):
        gp.ReductionKernel("T x", "T y", "x", "a + b", "y = a", "0", reduce_type="struct pair")
    with pytest.raises(gp.UsageError, match="needs its map_expr"):
        gp.ReductionKernel("T x", "T y", "", "a + b", "y = a", "0")
    with pytest.raises(gp.UsageError, match="CUDA source"):
        gp.RawKernel("", "k")
    with pytest.raises(gp.UsageError, match="nvrtc"):
        gp.RawKernel("__global__ void k() {}", "k", backend="nvcc")
    with pytest.raises(gp.UsageError, match="integer dtype"):
        ShardSize(np.float32)
    # CuPy's keywords, in CuPy's order, are taken.
    gp.ReductionKernel(
        "T x",
        "T y",
        "x * x",
        "a + b",
        "y = sqrt(a)",
        "0",
        "l2",
        reduce_type="double",
        preamble="",
        options=(),
    )
    gp.RawKernel('extern "C" __global__ void k(float* y) {}', "k", ("-std=c++17",))


def test_calls_are_checked_before_anything_is_sent() -> None:
    host = np.ones(4, np.float32)
    with pytest.raises(gp.UsageError, match="needs a remote array"):
        SQUARE(host)
    with pytest.raises(gp.UsageError, match="takes 1 inputs, got 3"):
        gp.ElementwiseKernel("T x", "T y", "y = x")(host, host, host)
    with pytest.raises(gp.UsageError, match="pass only the inputs"):
        SQUARE(host, host)
    with pytest.raises(gp.UsageError, match="one output for now"):
        gp.ElementwiseKernel("T x", "T y, T z", "y = x; z = x")(host)
    raw = gp.RawKernel('extern "C" __global__ void k(const float* x, float* y) {}', "k")
    with pytest.raises(gp.UsageError, match="grid and block together"):
        raw((1,), None, (host,))
    with pytest.raises(gp.UsageError, match="one to three positive"):
        raw((1, 1, 1, 1), (1,), (host,))
    with pytest.raises(gp.UsageError, match="needs a remote array"):
        raw(None, None, (host,))


@pytest.fixture(scope="module")
def x(pool: gp.Pool) -> gp.RemoteArray:
    return pool.asarray(np.arange(12, dtype=np.float32).reshape(6, 2))


def test_kernels_on_numpy_agents_say_how_to_reach_cupy_and_lose_nothing(x: gp.RemoteArray) -> None:
    before = x.get()
    total = gp.ReductionKernel("T x", "T y", "x", "a + b", "y = a", "0", "total")
    raw = gp.RawKernel('extern "C" __global__ void k(const float* x, float* y) {}', "k")
    for call in (
        lambda: SQUARE(x),
        lambda: total(x),
        lambda: total(x, axis=1),
        lambda: raw(None, None, (x,)),
    ):
        with pytest.raises(gp.UsageError, match=r"run only on CuPy agents.*backend='cupy'"):
            call()
    pending = x * 2  # a pending operand is refused as well, and stays computable
    with pytest.raises(gp.UsageError, match="CuPy agents"):
        SQUARE(pending)
    np.testing.assert_array_equal(x.get(), before)
    np.testing.assert_array_equal(pending.get(), before * 2)


def test_placing_on_cupy_agents_in_a_numpy_pool_is_refused(pool: gp.Pool) -> None:
    with pytest.raises(
        gp.PlacementError, match=r"no ready agent runs the cupy backend \(the ready agents run numpy\)"
    ):
        pool.asarray(np.ones((4, 2), np.float32), backend="cupy")
    with pytest.raises(gp.PlacementError, match="no ready cupy agents"):
        pool.asarray(np.ones((4, 2), np.float32), rows=[2, 2], backend="cupy")
    placed = pool.asarray(np.ones((4, 2), np.float32), backend="numpy")
    assert placed.get().sum() == 8
