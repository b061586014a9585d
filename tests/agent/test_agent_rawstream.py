"""The raw byte path (UploadRaw, DownloadRaw) over real gRPC on loopback, and uploads through staging blocks.

Against a real agent process: round trips of every dtype through the client's AgentChannel, and refusals of
malformed, short and long streams. Against servers in this process: a client that meets bad downloads, a
client that falls back to the protobuf methods, and the staging path of device backends (a NumPy backend
that poses as a device; tests/agent/test_agent_gpu.py runs it on CuPy).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np
import pytest

from gpupool._config import SUPPORTED_DTYPES, Timeouts
from gpupool._errors import BufferNotFound, DeviceOutOfMemory, RemoteKernelError, StreamClosed
from gpupool._process import Child
from gpupool._proto.v1 import agent_pb2
from gpupool.agent import service as agent_service
from gpupool.client.channels import CHANNEL_OPTIONS, AgentChannel
from gpupool.protocol.codec import meta_of
from gpupool.protocol.rawstream import DOWNLOAD_RAW, SERVICE, UPLOAD_RAW
from gpupool.protocol.topics import Topics

from .agent_helpers import (
    DeviceLikeBackend,
    agent_in_process,
    agent_stub,
    clear_retained,
    download,
    new_prefix,
    refused,
    run,
    stall,
    start_agent,
    upload,
)

MEMORY_LIMIT = 64 << 20
RNG = np.random.default_rng(17)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
SHAPES = [(1237, 3), (), (0, 5), (7,), (300_001,)]  # the last: several 1 MiB chunks and a ragged one


@pytest.fixture(scope="module")
def agent(system_broker_url: str) -> Iterator[Child]:
    """One NumPy agent process for the module."""
    prefix = new_prefix()
    child = start_agent(system_broker_url, prefix, "--memory-limit", str(MEMORY_LIMIT), "--backend", "numpy")
    yield child
    child.stop()
    run(clear_retained(system_broker_url, Topics(prefix).status(child.ready["agent_id"])))


def sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bool":
        return RNG.random(shape) > 0.5
    if dtype.startswith("int"):
        return RNG.integers(-(1 << 30), 1 << 30, shape).astype(dtype)
    return RNG.standard_normal(shape).astype(dtype)


def session_id() -> str:
    return "r" + uuid.uuid4().hex[:8]


async def round_trips(channel: AgentChannel, session: str) -> int:
    """Upload and download every dtype in every shape through ``channel``; how many buffers it made."""
    made = 0
    for dtype in SUPPORTED_DTYPES:
        for shape in SHAPES:
            array = sample(dtype, shape)
            buffer_id = f"{session}.{dtype}.{made}"
            await channel.upload(buffer_id, 0, array, session)
            back = np.empty(array.shape, array.dtype)
            await channel.download_into(buffer_id, back)
            np.testing.assert_array_equal(back, array)
            made += 1
    return made


async def memory_used(endpoint: str) -> int:
    async with agent_stub(endpoint) as stub:
        reply: agent_pb2.HealthReply = await stub.Health(agent_pb2.HealthRequest(), timeout=10)
    return int(reply.status.workers[0].memory_used)


def raw_header(buffer_id: str, array: np.ndarray, session: str) -> bytes:
    header = agent_pb2.UploadHeader(
        buffer_id=buffer_id, worker=0, meta=meta_of(array.dtype, array.shape), session=session
    )
    return header.SerializeToString()


async def raw_upload(endpoint: str, messages: list[bytes]) -> agent_pb2.UploadReply:
    """Send exactly ``messages`` to UploadRaw; a refusal comes back as the call's own status.

    A write that loses the race with the agent's refusal reports INTERNAL in grpc.aio (grpc/grpc#36066):
    the call itself carries the refusal then, as gpupool's client reads it.
    """
    async with grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS) as channel:
        call = channel.stream_unary(UPLOAD_RAW, None, None)(None, timeout=10)
        try:
            for message in messages:
                await call.write(message)
            await call.done_writing()
        except asyncio.InvalidStateError:
            pass  # the agent ended the call: awaiting it raises its status
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INTERNAL:
                raise
        reply = await call
    return agent_pb2.UploadReply.FromString(reply)


async def raw_download(endpoint: str, request: bytes) -> list[bytes]:
    async with grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS) as channel:
        return [m async for m in channel.unary_stream(DOWNLOAD_RAW, None, None)(request, timeout=10)]


# -- a real agent process -------------------------------------------------------------------------------


def test_raw_round_trip_of_every_dtype(agent: Child) -> None:
    session = session_id()
    endpoint = agent.ready["endpoint"]

    async def body() -> None:
        channel = AgentChannel(agent.ready["agent_id"], endpoint, Timeouts())
        try:
            made = await round_trips(channel, session)
            assert channel._raw, "the client fell back to the protobuf methods"
            assert await channel.free(session=session) == made
        finally:
            await channel.close()

    run(body())


def test_raw_messages_are_the_bytes_and_nothing_else(agent: Child) -> None:
    session = session_id()
    endpoint = agent.ready["endpoint"]
    array = sample("int32", (3000,))  # 12000 bytes
    data = array.tobytes()

    async def body() -> None:
        reply = await raw_upload(
            endpoint, [raw_header(f"{session}.a", array, session), data[:5], data[5:9000], data[9000:]]
        )
        assert (reply.buffer_id, reply.nbytes) == (f"{session}.a", len(data))
        request = agent_pb2.DownloadRequest(buffer_id=f"{session}.a", chunk_bytes=5000)
        messages = await raw_download(endpoint, request.SerializeToString())
        assert agent_pb2.ArrayMeta.FromString(messages[0]) == meta_of(array.dtype, array.shape)
        assert [len(m) for m in messages[1:]] == [5000, 5000, 2000]
        assert b"".join(messages[1:]) == data
        async with agent_stub(endpoint) as stub:  # the protobuf twin serves the same buffer
            np.testing.assert_array_equal(await download(stub, f"{session}.a"), array)
            await stub.Free(agent_pb2.FreeRequest(session=session), timeout=10)

    run(body())


def test_raw_refusals_leave_nothing_behind(agent: Child) -> None:
    session = session_id()
    endpoint = agent.ready["endpoint"]
    array = sample("float64", (1000, 3))
    data = array.tobytes()
    header = raw_header(f"{session}.a", array, session)
    float16 = agent_pb2.UploadHeader(
        buffer_id=f"{session}.h", meta=agent_pb2.ArrayMeta(dtype="float128", shape=[2])
    ).SerializeToString()

    async def body() -> None:
        used_before = await memory_used(endpoint)
        cases = [
            ([], "starts with a header"),
            ([b"\xff\xff\xff"], "cannot decode"),
            ([float16, b"\0" * 32], "float128"),
            ([header, data[:-5]], "ended after"),
            ([header], "ended after 0 of"),
            ([header, data, b"x"], "more than"),
            ([header, data[:100], data[100:] + b"xyz"], "more than"),
        ]
        for messages, says in cases:
            code, kind, details = await refused(raw_upload(endpoint, messages))
            assert (code, kind) == (INVALID, "bad-request"), details
            assert says in details
        assert await memory_used(endpoint) == used_before
        await raw_upload(endpoint, [header, data])  # the id and the memory are free again
        code, kind, _ = await refused(raw_upload(endpoint, [header, data]))
        assert (code, kind) == (grpc.StatusCode.ALREADY_EXISTS, "buffer-exists")

        code, kind, _ = await refused(
            raw_download(endpoint, agent_pb2.DownloadRequest(buffer_id="nonexistent").SerializeToString())
        )
        assert (code, kind) == (grpc.StatusCode.NOT_FOUND, "buffer-not-found")
        code, kind, _ = await refused(raw_download(endpoint, b"\xff\xff\xff"))
        assert (code, kind) == (INVALID, "bad-request")
        channel = AgentChannel(agent.ready["agent_id"], endpoint, Timeouts())
        try:
            with pytest.raises(BufferNotFound):
                await channel.download_into("nonexistent", np.empty(3))
            assert await channel.free(session=session) == 1
        finally:
            await channel.close()

    run(body())


def test_a_refused_upload_reports_the_refusal_not_a_broken_write(agent: Child) -> None:
    """Past one chunk the client waits for the agent's go-ahead, so the refusal is never lost to a write
    the agent cut off (gRPC then reports INTERNAL instead of the agent's status)."""
    session = session_id()
    endpoint = agent.ready["endpoint"]
    too_big = np.zeros(MEMORY_LIMIT // 8 + 1024, np.float64)
    taken = sample("float32", (600_000,))  # 2.3 MiB: three chunks

    async def body() -> None:
        channel = AgentChannel(agent.ready["agent_id"], endpoint, Timeouts())
        try:
            await channel.upload(f"{session}.taken", 0, taken, session)
            for _ in range(5):
                with pytest.raises(DeviceOutOfMemory):
                    await channel.upload(f"{session}.big", 0, too_big, session)
                with pytest.raises(RemoteKernelError) as caught:
                    await channel.upload(f"{session}.taken", 0, taken, session)
                assert caught.value.code == "ALREADY_EXISTS"
            assert await channel.free(session=session) == 1
        finally:
            await channel.close()

    run(body())


def test_a_raw_upload_cut_off_midway_releases_its_reservation(agent: Child) -> None:
    session = session_id()
    endpoint = agent.ready["endpoint"]
    array = sample("float64", (MEMORY_LIMIT // 8 * 3 // 4,))  # three quarters of the limit
    data = array.tobytes()
    half_sent = asyncio.Event()

    async def half_then_wait() -> AsyncIterator[bytes]:
        yield raw_header(f"{session}.c", array, session)
        yield data[: len(data) // 2]
        half_sent.set()
        await stall()

    async def body() -> None:
        async with grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS) as grpc_channel:
            call = grpc_channel.stream_unary(UPLOAD_RAW, None, None)(half_then_wait(), timeout=20)
            await asyncio.wait_for(half_sent.wait(), 10)
            await asyncio.sleep(0.2)
            call.cancel()
        channel = AgentChannel(agent.ready["agent_id"], endpoint, Timeouts())
        try:
            async with asyncio.timeout(10):
                while True:
                    try:
                        await channel.upload(f"{session}.c", 0, array, session)
                        break
                    except (RemoteKernelError, DeviceOutOfMemory) as exc:  # not seen the cancel yet
                        if exc.code not in ("ALREADY_EXISTS", "RESOURCE_EXHAUSTED"):
                            raise
                        await asyncio.sleep(0.05)
            back = np.empty_like(array)
            await channel.download_into(f"{session}.c", back)
            np.testing.assert_array_equal(back, array)
            await channel.free(session=session)
        finally:
            await channel.close()

    run(body())


# -- servers in this process ---------------------------------------------------------------------------


def test_the_client_refuses_downloads_that_do_not_fit() -> None:
    out = np.empty((4, 2), np.int64)  # 64 bytes
    meta = meta_of(out.dtype, out.shape).SerializeToString()
    answers: dict[str, list[bytes]] = {
        "short": [meta, b"\0" * 40],
        "long": [meta, b"\0" * 40, b"\0" * 40],
        "other-shape": [agent_pb2.ArrayMeta(dtype="int64", shape=[8]).SerializeToString(), b"\0" * 64],
        "other-dtype": [agent_pb2.ArrayMeta(dtype="float64", shape=[4, 2]).SerializeToString(), b"\0" * 64],
        "nothing": [],
        "garbage-meta": [b"\xff\xff\xff", b"\0" * 64],
        "exact": [meta, b"\1" * 64],
    }

    async def download_raw(
        request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        for message in answers[agent_pb2.DownloadRequest.FromString(request).buffer_id]:
            yield message

    async def body() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE, {"DownloadRaw": grpc.unary_stream_rpc_method_handler(download_raw)}
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = AgentChannel("fake", f"127.0.0.1:{port}", Timeouts())
        try:
            for buffer_id in answers:
                if buffer_id == "exact":
                    await channel.download_into(buffer_id, out)
                    assert out.tobytes() == b"\1" * 64
                else:
                    with pytest.raises(StreamClosed):
                        await channel.download_into(buffer_id, out)
        finally:
            await channel.close()
            await server.stop(None)

    run(body())


def test_the_client_falls_back_to_protobuf_methods_for_an_older_agent() -> None:
    session = session_id()

    async def body() -> None:
        async with agent_in_process(DeviceLikeBackend(), raw=False) as (endpoint, registry):
            channel = AgentChannel("old", endpoint, Timeouts())
            try:
                made = await round_trips(channel, session)
                assert not channel._raw
                assert len(registry) == made
            finally:
                await channel.close()

    run(body())


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Staging blocks of 4 KiB, so small arrays span many."""
    monkeypatch.setattr(agent_service, "STAGING_BYTES", 4096)
    return 4096


def test_uploads_to_a_device_go_through_staging_blocks(small_blocks: int) -> None:
    session = session_id()

    async def body() -> None:
        backend = DeviceLikeBackend()
        async with agent_in_process(backend) as (endpoint, registry):
            channel = AgentChannel("device", endpoint, Timeouts())
            try:
                made = await round_trips(channel, session)  # raw: 1 MiB chunks, many blocks each
                assert channel._raw
            finally:
                await channel.close()
            assert backend.copies > made
            async with agent_stub(endpoint) as stub:  # protobuf: 1000-byte chunks straddle the blocks
                for dtype in SUPPORTED_DTYPES:
                    array = sample(dtype, (5001,))
                    await upload(stub, f"{session}.pb.{dtype}", array, session=session, chunk_bytes=1000)
                    np.testing.assert_array_equal(await download(stub, f"{session}.pb.{dtype}"), array)
            assert len(registry) == made + len(SUPPORTED_DTYPES)
            assert registry.usage(0).reserved == 0

    run(body())


def test_device_upload_refusals_release_everything(small_blocks: int) -> None:
    session = session_id()
    array = sample("float32", (10_000,))  # 40000 bytes: ten blocks
    data = array.tobytes()
    header = raw_header(f"{session}.a", array, session)

    async def body() -> None:
        backend = DeviceLikeBackend()
        async with agent_in_process(backend) as (endpoint, registry):
            for messages, says in [
                ([header, data[:-1]], "ended after"),
                ([header, data[:8192]], "ended after 8192"),
                ([header, data + b"x"], "more than"),
                ([header, data[:30000], data[30000:] + data], "more than"),
            ]:
                code, kind, details = await refused(raw_upload(endpoint, messages))
                assert (code, kind) == (INVALID, "bad-request"), details
                assert says in details
            backend.fail_empty = True
            code, kind, _ = await refused(raw_upload(endpoint, [header, data]))
            assert (code, kind) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "out-of-memory")
            backend.fail_empty = False
            backend.fail_copy = True
            code, kind, details = await refused(raw_upload(endpoint, [header, data]))
            assert (code, kind) == (INVALID, "kernel-failed"), details
            backend.fail_copy = False
            await asyncio.sleep(0.1)  # copies a refusal left behind finish in the worker's thread
            usage = registry.usage(0)
            assert (usage.used, usage.reserved, len(registry)) == (0, 0, 0)
            await raw_upload(endpoint, [header, data])
            assert len(registry) == 1
            async with agent_stub(endpoint) as stub:
                np.testing.assert_array_equal(await download(stub, f"{session}.a"), array)

    run(body())
