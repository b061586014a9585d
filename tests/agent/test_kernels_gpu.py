"""Users' kernels on a real GPU through run_kernel, against CuPy's own result (skipped without CUDA).

CuPy is imported inside the tests only, so collecting this module never needs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpupool._proto.v1 import agent_pb2
from gpupool.agent.kernel_cache import KernelCache
from gpupool.agent.kernels import check_kernel, run_kernel
from gpupool.agent.opargs import Expected
from gpupool.protocol.errors import RpcRefusal

pytestmark = pytest.mark.gpu

X = np.arange(1000, dtype=np.float32) / 7


def expect(dtype: Any, shape: tuple[int, ...]) -> Expected:
    dtype = np.dtype(dtype)
    return Expected(dtype, shape, dtype.itemsize * int(np.prod(shape)))


@pytest.fixture(scope="module")
def backend() -> Any:
    """A CuPy backend on the first usable device, bound to this thread."""
    from gpupool.agent._cupy import CupyBackend, probe_cuda

    chosen = CupyBackend(probe_cuda()[0].index)
    chosen.bind_thread()
    return chosen


def run(backend: Any, kernel: agent_pb2.Kernel, inputs: list[Any], expects: list[Expected], **kw: Any) -> Any:
    check_kernel(kernel, len(inputs), len(expects))
    (out,) = run_kernel(backend, kernel, inputs, expects, allowed=True, **kw)
    return backend.to_host(out)


def test_elementwise_matches_cupy(backend: Any, tmp_path: Path) -> None:
    import cupy

    kernel = agent_pb2.Kernel(
        kind="elementwise",
        name="axpy",
        in_params="T x, float32 a",
        out_params="T y",
        operation="y = a * x + 1",
    )
    got = run(
        backend,
        kernel,
        [backend.to_device(X), np.float32(3)],
        [expect(np.float32, X.shape)],
        cache=KernelCache(tmp_path),
    )
    want = cupy.ElementwiseKernel("T x, float32 a", "T y", "y = a * x + 1", "axpy")(
        cupy.asarray(X), np.float32(3)
    )
    np.testing.assert_array_equal(got, cupy.asnumpy(want))


def test_reduction_matches_cupy_over_all_and_over_an_axis(backend: Any, tmp_path: Path) -> None:
    import cupy

    kernel = agent_pb2.Kernel(
        kind="reduction",
        name="l2",
        in_params="T x",
        out_params="float64 y",
        map_expr="x * x",
        reduce_expr="a + b",
        post_map_expr="y = sqrt(a)",
        identity="0",
    )
    cache = KernelCache(tmp_path)
    reference = cupy.ReductionKernel("T x", "float64 y", "x * x", "a + b", "y = sqrt(a)", "0", "l2")
    got = run(backend, kernel, [backend.to_device(X)], [expect(np.float64, ())], cache=cache)
    np.testing.assert_allclose(got, cupy.asnumpy(reference(cupy.asarray(X))), rtol=1e-12)
    grid = X.reshape(100, 10)
    got = run(
        backend, kernel, [backend.to_device(grid)], [expect(np.float64, (100,))], axes=(1,), cache=cache
    )
    np.testing.assert_allclose(got, cupy.asnumpy(reference(cupy.asarray(grid), axis=1)), rtol=1e-12)


RAW = r"""
extern "C" __global__ void twice(const float* x, int n, float* y) {
    int i = blockDim.x * blockIdx.x + threadIdx.x;
    if (i < n) y[i] = 2 * x[i];
}
"""


def test_raw_kernel_with_given_and_derived_launch(backend: Any, tmp_path: Path) -> None:
    cache = KernelCache(tmp_path)
    kernel = agent_pb2.Kernel(kind="raw", name="twice", code=RAW, grid=[8], block=[128])
    got = run(
        backend, kernel, [backend.to_device(X), np.int32(X.size)], [expect(np.float32, X.shape)], cache=cache
    )
    np.testing.assert_array_equal(got, 2 * X)
    derived = agent_pb2.Kernel(kind="raw", name="twice", code=RAW)
    got = run(
        backend, derived, [backend.to_device(X), np.int32(X.size)], [expect(np.float32, X.shape)], cache=cache
    )
    np.testing.assert_array_equal(got, 2 * X)


def test_a_compile_error_is_kernel_failed_with_the_log(backend: Any, tmp_path: Path) -> None:
    kernel = agent_pb2.Kernel(
        kind="raw", name="broken", code='extern "C" __global__ void broken() { undeclared_name; }'
    )
    with pytest.raises(RpcRefusal) as caught:
        run_kernel(backend, kernel, [], [expect(np.float32, (4,))], allowed=True, cache=KernelCache(tmp_path))
    assert caught.value.kind == "kernel-failed"
    assert "did not compile" in caught.value.message
    assert "undeclared_name" in caught.value.message


def test_kernels_need_the_owners_permission(backend: Any) -> None:
    kernel = agent_pb2.Kernel(kind="raw", name="twice", code=RAW)
    with pytest.raises(RpcRefusal) as caught:
        run_kernel(backend, kernel, [backend.to_device(X), np.int32(X.size)], [expect(np.float32, X.shape)])
    assert caught.value.kind == "permission-denied"
    assert "--allow-kernels" in caught.value.message


def test_second_use_of_a_source_is_a_cache_hit(backend: Any, tmp_path: Path) -> None:
    cache = KernelCache(tmp_path)
    kernel = agent_pb2.Kernel(
        kind="elementwise", name="neg", in_params="T x", out_params="T y", operation="y = -x"
    )
    for _ in range(2):
        got = run(backend, kernel, [backend.to_device(X)], [expect(np.float32, X.shape)], cache=cache)
        np.testing.assert_array_equal(got, -X)
    assert (cache.counts.compiles, cache.counts.hits) == (1, 1)


CHILD = r"""
import json, numpy as np
from gpupool._proto.v1 import agent_pb2
from gpupool.agent._cupy import CupyBackend, probe_cuda
from gpupool.agent.kernel_cache import shared_cache
from gpupool.agent.kernels import run_kernel
from gpupool.agent.opargs import Expected
backend = CupyBackend(probe_cuda()[0].index); backend.bind_thread()
kernel = agent_pb2.Kernel(
    kind="elementwise", name="cube", in_params="T x", out_params="T y", operation="y = x*x*x"
)
x = backend.to_device(np.arange(8, dtype=np.float32))
(y,) = run_kernel(backend, kernel, [x], [Expected(np.dtype(np.float32), (8,), 32)], allowed=True)
assert backend.to_host(y).tolist() == [float(i ** 3) for i in range(8)]
c = shared_cache().counts
print(json.dumps({"hits": c.hits, "disk_hits": c.disk_hits, "compiles": c.compiles}))
"""


def test_a_second_agent_process_hits_the_disk_cache(tmp_path: Path) -> None:
    env = {**os.environ, "GPUPOOL_KERNEL_CACHE": str(tmp_path)}
    counts = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        counts.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert counts[0] == {"hits": 0, "disk_hits": 0, "compiles": 1}
    assert counts[1] == {"hits": 1, "disk_hits": 1, "compiles": 0}
    assert any((tmp_path / "cupy").iterdir())  # CuPy's own binaries live in the agent's cache directory
