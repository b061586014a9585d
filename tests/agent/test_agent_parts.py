"""Uploads in parts (several streams fill one buffer) against an agent service in this process, where its
registry can be read: every dtype and shape through the client's ``Streams`` into a NumPy worker and into one
that stages through device blocks (each part at its rows' byte offset), and what a dropped upload leaves
behind (nothing reserved, nothing resident) when a part is killed or the parts stall.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from gpupool._config import SUPPORTED_DTYPES, Streams, Timeouts
from gpupool._proto.v1 import agent_pb2, control_pb2
from gpupool.agent import service as agent_service
from gpupool.agent.backend import ArrayBackend, NumpyBackend
from gpupool.agent.buffers import BufferRegistry
from gpupool.agent.service import AgentService, add_to_server
from gpupool.agent.status import Counters
from gpupool.agent.workers import Worker
from gpupool.client.channels import CHANNEL_OPTIONS, AgentChannel
from gpupool.protocol.codec import meta_of
from gpupool.protocol.rawstream import UPLOAD_RAW
from gpupool.transport.rpc import SERVER_OPTIONS

from .agent_helpers import DeviceLikeBackend, run, stall

SPLIT = Streams(per_shard=3, connections=2, min_part_bytes=1)
SHAPES = [(1237, 3), (0, 5), (1, 4), (2, 2), (7,), (300_001,), (5, 0)]
RNG = np.random.default_rng(23)


@contextlib.asynccontextmanager
async def serving(backend: ArrayBackend, *, stall: float = 10.0) -> AsyncIterator[tuple[str, BufferRegistry]]:
    """An agent service with one worker on ``backend`` and the given stall deadline, on a loopback port."""
    worker = Worker(index=0, backend=backend, memory_limit=64 << 20)
    registry = BufferRegistry([64 << 20])
    service = AgentService(
        workers=[worker],
        registry=registry,
        counters=Counters(),
        accepting=lambda: True,
        status=control_pb2.AgentStatus,
        timeouts=Timeouts(stall=stall),
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    add_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", registry
    finally:
        await server.stop(None)
        worker.shutdown()


def sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bool":
        return RNG.random(shape) > 0.5
    if dtype.startswith("complex"):
        return (RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)).astype(dtype)
    if dtype.startswith(("int", "uint")):
        return RNG.integers(0, 100, shape).astype(dtype)
    return RNG.standard_normal(shape).astype(dtype)


async def nothing_left(registry: BufferRegistry) -> None:
    """Wait (bounded) until the agent holds and reserves nothing."""
    async with asyncio.timeout(10):
        while (registry.usage(0).used, registry.usage(0).reserved, len(registry)) != (0, 0, 0):  # noqa: ASYNC110 - the registry has no event to wait on
            await asyncio.sleep(0.02)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Staging blocks of 4 KiB, so every part spans several and ends inside one."""
    monkeypatch.setattr(agent_service, "STAGING_BYTES", 4096)
    return 4096


@pytest.mark.parametrize("device", [False, True], ids=["numpy", "device-staging"])
def test_every_dtype_and_shape_in_parts(device: bool, small_blocks: int) -> None:
    async def body() -> None:
        backend = DeviceLikeBackend() if device else NumpyBackend()
        async with serving(backend) as (endpoint, registry):
            channel = AgentChannel("a", endpoint, Timeouts(), streams=SPLIT)
            try:
                for dtype in SUPPORTED_DTYPES:
                    for index, shape in enumerate(SHAPES):
                        array = sample(dtype, shape)
                        buffer_id = f"s.{dtype}.{index}"
                        await channel.upload(buffer_id, 0, array, "s")
                        back = np.empty(array.shape, array.dtype)
                        await channel.download_into(buffer_id, back)
                        np.testing.assert_array_equal(back, array)
                await channel.free(session="s")
            finally:
                await channel.close()
            await nothing_left(registry)

    run(body())


async def part_call(
    endpoint: str,
    array: np.ndarray,
    start: int,
    stop: int,
    chunks: AsyncIterator[bytes],
    *,
    calls: list[grpc.aio.StreamUnaryCall[bytes, bytes]] | None = None,
) -> bytes:
    """An UploadRaw part of ``array``'s rows ``[start, stop)`` as buffer "p", its data from ``chunks``
    (the call is appended to ``calls``, for a test to cancel it as a killed client's connection would)."""
    header = agent_pb2.UploadHeader(
        buffer_id="p",
        meta=meta_of(array.dtype, array.shape),
        session="s",
        has_rows=True,
        start=start,
        stop=stop,
    )

    async def messages() -> AsyncIterator[bytes]:
        yield header.SerializeToString()
        async for chunk in chunks:
            yield chunk

    async with grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS) as channel:
        call = channel.stream_unary(UPLOAD_RAW, None, None)(messages(), timeout=30)
        if calls is not None:
            calls.append(call)
        reply: bytes = await call
        return reply


def test_a_part_killed_midway_leaves_nothing(small_blocks: int) -> None:
    array = sample("float64", (4000, 64))
    killed_after_half = asyncio.Event()

    async def whole(rows: np.ndarray) -> AsyncIterator[bytes]:
        yield rows.tobytes()

    async def half_then_hang(rows: np.ndarray) -> AsyncIterator[bytes]:
        data = rows.tobytes()
        yield data[: len(data) // 2]
        killed_after_half.set()
        await stall()

    async def body() -> None:
        for device in (False, True):
            backend = DeviceLikeBackend() if device else NumpyBackend()
            async with serving(backend, stall=2.0) as (endpoint, registry):
                arrived = asyncio.ensure_future(part_call(endpoint, array, 0, 1000, whole(array[:1000])))
                calls: list[grpc.aio.StreamUnaryCall[bytes, bytes]] = []
                hanging = asyncio.ensure_future(
                    part_call(endpoint, array, 1000, 4000, half_then_hang(array[1000:]), calls=calls)
                )
                await asyncio.wait_for(killed_after_half.wait(), 10)
                async with asyncio.timeout(10):  # the whole buffer, reserved once, for both parts
                    while registry.usage(0).reserved != array.nbytes:  # noqa: ASYNC110 - no event to wait on
                        await asyncio.sleep(0.02)
                calls[0].cancel()
                with pytest.raises(asyncio.CancelledError):
                    await hanging
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await arrived
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                # the agent sees the cut-off stream end short, its call cancelled, or (when grpc.aio tells its
                # handler neither) no chunk within the stall deadline: each drops it all
                details = info.value.details() or ""
                assert any(words in details for words in ("ended after", "cancelled", "no part sent")), (
                    details
                )
                await nothing_left(registry)
                killed_after_half.clear()

    run(body())


def test_parts_that_stall_are_dropped_at_the_stall_deadline() -> None:
    array = sample("int32", (100, 8))

    async def whole(rows: np.ndarray) -> AsyncIterator[bytes]:
        yield rows.tobytes()

    async def body() -> None:
        async with serving(NumpyBackend(), stall=0.3) as (endpoint, registry):
            # rows [0, 50) arrive in full; no part ever brings [50, 100)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await part_call(endpoint, array, 0, 50, whole(array[:50]))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no part sent anything" in (info.value.details() or "")
            await nothing_left(registry)

    run(body())
