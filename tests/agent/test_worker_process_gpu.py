"""A real illegal-address kernel on a GPU ends only its worker's process (skipped without CUDA).

The CuPy twin of ``test_worker_process.py``'s injected faults: a RawKernel writes through a null pointer,
the caller gets ``kernel-failed`` with CUDA's own message, the worker's buffers are lost with its CUDA
context, a fresh process (and context) serves the next program, and the agent never went down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from gpupool._process import Child
from gpupool._proto.v1 import agent_pb2
from gpupool.protocol.codec import meta_of
from gpupool.protocol.topics import Topics

from .agent_helpers import (
    agent_stub,
    buffer,
    clear_retained,
    download,
    new_prefix,
    refused,
    run,
    scalar,
    start_agent,
    upload,
)

pytestmark = pytest.mark.gpu

NULL_WRITE = r"""
extern "C" __global__ void scribble(const float* x, float* y, int n) {
    float* nowhere = (float*)0;
    nowhere[threadIdx.x] = x[threadIdx.x];
    y[0] = 1;
}
"""


@pytest.fixture
def cupy_agent(system_broker_url: str) -> Iterator[Child]:
    pytest.importorskip("cupy")
    prefix = new_prefix()
    child = start_agent(system_broker_url, prefix, "--backend", "cupy", "--allow-kernels")
    try:
        yield child
    finally:
        child.stop()
        run(clear_retained(system_broker_url, Topics(prefix).status(child.ready["agent_id"])))


def test_an_illegal_address_kernel_ends_only_its_worker_process(cupy_agent: Child) -> None:
    endpoint = cupy_agent.ready["endpoint"]
    x = np.arange(256, dtype=np.float32)
    kernel = agent_pb2.Kernel(kind="raw", name="scribble", code=NULL_WRITE, grid=[1], block=[32])
    scribble = agent_pb2.Op(
        op="kernel",
        inputs=[buffer("x"), scalar(256, "int32")],
        output="y",
        expect=meta_of(np.dtype(np.float32), (256,)),
        kernel=kernel,
    )

    async def body() -> None:
        async with agent_stub(endpoint) as stub:
            await upload(stub, "x", x, session="a")
            code, kind, details = await refused(
                stub.Execute(agent_pb2.ExecuteRequest(session="a", ops=[scribble], fetch=["y"]), timeout=120)
            )
            print(f"the caller got: {code} {kind}: {details}")
            assert kind == "kernel-failed", details
            assert "illegal" in details.lower(), details
            code, _, details = await refused(download(stub, "x"))
            assert code == grpc.StatusCode.NOT_FOUND, details
            assert "lost" in details, details
            start = time.monotonic()
            while True:
                try:
                    await upload(stub, "x2", x, session="a")
                    break
                except grpc.aio.AioRpcError:
                    if time.monotonic() - start > 120:
                        raise
                    await asyncio.sleep(0.2)
            print(f"a fresh worker process served again after {time.monotonic() - start:.1f} s")
            np.testing.assert_array_equal(await download(stub, "x2"), x)

    run(body(), timeout=300)
    assert cupy_agent.process.poll() is None
