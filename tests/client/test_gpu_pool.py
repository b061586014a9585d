"""The whole loop on CuPy agents: the client's ops run as CuPy kernels and still equal NumPy."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest

import gpupool as gp
from gpupool.local import LocalPool

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_pool(system_broker_url: str) -> Iterator[gp.Pool]:
    with (
        LocalPool(
            agents=2,
            broker_url=system_broker_url,
            port=0,
            backend="cupy",
            topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
        ) as local,
        local.connect() as pool,
    ):
        yield pool


def test_agents_report_cupy_and_their_gpu(gpu_pool: gp.Pool) -> None:
    agents = gpu_pool.agents()
    assert len(agents) == 2
    for agent in agents:
        assert agent.backend == "cupy"
        assert agent.gpus
        assert agent.gpus[0].model
        assert agent.gpus[0].memory_total > 0


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64"])
def test_op_families_on_cupy_match_numpy(gpu_pool: gp.Pool, dtype: str) -> None:
    rng = np.random.default_rng(1)
    a = (
        rng.uniform(1, 4, (2049, 33)) if dtype.startswith("float") else rng.integers(1, 9, (2049, 33))
    ).astype(dtype)
    row = a[3].copy()
    x = gpu_pool.asarray(a)
    np.testing.assert_array_equal(x.get(), a)
    for got, want in [
        (x + 2, a + 2),
        (x * x - row, a * a - row),
        (np.maximum(x, row), np.maximum(a, row)),
        (x / 3, a / 3),
        (x**2, a**2),
        (x > row, a > row),
        (np.sqrt(x), np.sqrt(a)),
        (np.tanh(x), np.tanh(a)),
        (np.exp(-abs(x)), np.exp(-abs(a))),
        (np.log(x), np.log(a)),
    ]:
        np.testing.assert_allclose(got.get(), want, rtol=1e-5)
        assert got.dtype == want.dtype
    w = rng.uniform(-1, 1, (33, 7)).astype(dtype)
    # cuBLAS adds in another order than NumPy's BLAS: allow float32 rounding on results near zero.
    np.testing.assert_allclose((x @ w).get(), a @ w, rtol=1e-4, atol=1e-5)
    for op in ("sum", "mean", "max", "min"):
        for axis in (None, 0, 1):
            got = getattr(x, op)(axis=axis)
            want = getattr(a, op)(axis=axis)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_a_result_too_large_for_the_limit_is_refused_on_cupy(gpu_pool: gp.Pool) -> None:
    limit = min(a.memory_limit for a in gpu_pool.agents())
    with pytest.raises(gp.NoCapacity):
        gpu_pool.asarray(np.zeros((3 * limit // 4096, 1024), np.float32))
    x = gpu_pool.asarray(np.ones((100, 4), np.float32))
    np.testing.assert_array_equal((x + 1).get(), np.full((100, 4), 2, np.float32))


@pytest.mark.parametrize(
    "dtype",
    ["bool", "int8", "int16", "uint8", "uint16", "uint32", "uint64", "float16", "complex64", "complex128"],
)
def test_the_array_api_dtypes_on_cupy_match_numpy(gpu_pool: gp.Pool, dtype: str) -> None:
    a = (np.arange(4098 * 3).reshape(4098, 3) % 7).astype(dtype)
    x = gpu_pool.asarray(a)
    np.testing.assert_array_equal(x.get(), a)
    np.testing.assert_array_equal(gp.equal(x, x).get(), a == a)
    if dtype != "bool":
        np.testing.assert_allclose(np.asarray(gp.sum(x, axis=1)), a.sum(axis=1), rtol=1e-3)
        np.testing.assert_allclose((x * 2).get(), a * 2, rtol=1e-3)
    if dtype.startswith(("int", "uint")):
        np.testing.assert_array_equal((x & 3).get(), a & 3)
        np.testing.assert_array_equal((x << 1).get(), a << 1)


def test_the_namespace_and_compositions_on_cupy(gpu_pool: gp.Pool) -> None:
    a = np.random.default_rng(4).random((3001, 5)).astype(np.float32)
    with gpu_pool:
        x = gp.asarray(a)
        np.testing.assert_allclose(np.asarray(gp.linalg.vector_norm(x)), np.linalg.norm(a), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(np.median(x, axis=1)), np.median(a, axis=1), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(np.cov(x, rowvar=False)), np.cov(a, rowvar=False), rtol=1e-4)
        np.testing.assert_allclose(((x - x.mean(0)) / x.std(0)).get(), (a - a.mean(0)) / a.std(0), rtol=1e-4)
        np.testing.assert_array_equal(x[np.array([7, 3000, 0, 7])].get(), a[[7, 3000, 0, 7]])
