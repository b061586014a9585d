"""Generated kernels on a real CuPy worker (skipped without CUDA): programs run with ``fuse_kernels`` give
what the same programs give op by op, the chain compiles once (a cache hit the second time), and a chain
with NaNs keeps NumPy's maximum/minimum semantics. CuPy is imported inside the tests only."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gpupool._proto.v1 import agent_pb2
from gpupool.agent.buffers import BufferRegistry
from gpupool.agent.kernel_cache import counts
from gpupool.agent.program import run_program
from gpupool.protocol.codec import array_from_bytes, meta_of

pytestmark = pytest.mark.gpu

RNG = np.random.default_rng(5)


@pytest.fixture(scope="module")
def backend() -> Any:
    from gpupool.agent._cupy import CupyBackend, probe_cuda

    devices = probe_cuda()
    assert devices
    chosen = CupyBackend(devices[0].index)
    chosen.bind_thread()
    return chosen


def buf(name: str) -> agent_pb2.Operand:
    return agent_pb2.Operand(buffer=name)


def weak(value: float) -> agent_pb2.Operand:
    return agent_pb2.Operand(scalar=agent_pb2.Scalar(f=value))


def program(dtype: str, shape: tuple[int, ...]) -> agent_pb2.ExecuteRequest:
    meta = meta_of(np.dtype(dtype), shape)
    ops = [
        agent_pb2.Op(op="multiply", inputs=[buf("x"), weak(2.0)], output="a", expect=meta),
        agent_pb2.Op(op="add", inputs=[buf("a"), weak(1.0)], output="b", expect=meta),
        agent_pb2.Op(op="power", inputs=[buf("b"), weak(2.0)], output="c", expect=meta),
        agent_pb2.Op(op="maximum", inputs=[buf("c"), buf("y")], output="d", expect=meta),
        agent_pb2.Op(op="tanh", inputs=[buf("d")], output="e", expect=meta),
        agent_pb2.Op(op="sum", inputs=[buf("e")], output="s", expect=meta_of(np.dtype(dtype), ())),
    ]
    return agent_pb2.ExecuteRequest(
        ops=ops, fetch=["s", "d"], free=["a", "b", "c", "d", "e", "s"], session="s"
    )


def run(
    backend: Any, request: agent_pb2.ExecuteRequest, arrays: dict[str, np.ndarray], fuse: bool
) -> dict[str, np.ndarray]:
    registry = BufferRegistry([1 << 30])
    for name, host in arrays.items():
        registry.commit(
            registry.reserve(worker=0, buffer_id=name, nbytes=host.nbytes, session="s"),
            backend.to_device(host),
        )
    reply = run_program(request, backend=backend, registry=registry, fuse_kernels=fuse)
    return {f.buffer_id: array_from_bytes(f.data, f.meta) for f in reply.fetched}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_generated_kernel_gives_what_op_by_op_gives(backend: Any, dtype: str) -> None:
    shape = (1000, 33)
    x = RNG.standard_normal(shape).astype(dtype)
    y = np.where(RNG.random(shape) < 0.1, np.nan, RNG.standard_normal(shape)).astype(dtype)
    request = program(dtype, shape)
    unfused = run(backend, request, {"x": x, "y": y}, fuse=False)
    hits = counts().hits
    fused = run(backend, request, {"x": x, "y": y}, fuse=True)
    again = run(backend, request, {"x": x, "y": y}, fuse=True)
    np.testing.assert_allclose(fused["d"], unfused["d"], rtol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(np.isnan(fused["d"]), np.isnan(np.maximum((x * 2 + 1) ** 2, y)))
    np.testing.assert_allclose(again["s"], unfused["s"], rtol=1e-4, equal_nan=True)
    assert counts().hits > hits  # the second fused run found the kernel compiled
