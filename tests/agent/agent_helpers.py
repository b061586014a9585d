"""Helpers for the agent's tests: start agents as processes, talk gRPC and MQTT to them, with deadlines."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import IO, Any, TypeVar

import aiomqtt
import grpc
import numpy as np
from google.protobuf.message import Message

from gpupool._config import CHUNK_BYTES, MAX_MESSAGE_BYTES, parse_broker_url
from gpupool._process import Child, spawn
from gpupool._proto.v1 import agent_pb2, agent_pb2_grpc, control_pb2
from gpupool.agent.backend import ArrayBackend, NumpyBackend
from gpupool.agent.buffers import BufferRegistry
from gpupool.agent.service import AgentService, add_to_server
from gpupool.agent.status import Counters
from gpupool.agent.workers import Worker
from gpupool.protocol.codec import array_from_bytes, decode_json, iter_chunks, meta_of
from gpupool.protocol.errors import ERROR_KEY
from gpupool.transport.rpc import SERVER_OPTIONS

T = TypeVar("T")
M = TypeVar("M", bound=Message)

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


async def stall(within: float = 30.0) -> None:
    """Send nothing more, as a stalled peer does: wait for the call to end (it closes the request stream
    that awaits this), ``within`` seconds at the most (then TimeoutError ends the stream)."""
    await asyncio.wait_for(asyncio.Event().wait(), within)


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run a test's async body with an overall deadline."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def new_prefix() -> str:
    """A topic prefix of one's own (what the ``topic_prefix`` fixture gives, for wider scopes)."""
    return f"gpupool-test-{uuid.uuid4().hex[:10]}"


def start_agent(
    broker_url: str,
    prefix: str,
    *extra: str,
    name: str = "test-agent",
    env: dict[str, str] | None = None,
    stderr: IO[bytes] | None = None,
) -> Child:
    """An agent process serving on a free loopback port (``env``: extra environment variables; ``stderr``:
    where its log goes)."""
    argv = [
        sys.executable,
        "-m",
        "gpupool.agent",
        "--broker",
        broker_url,
        "--listen",
        "127.0.0.1:0",
        "--topic-prefix",
        prefix,
        "--name",
        name,
        "--heartbeat",
        "0.5",
        # An open agent (no enrolment): these tests are about the data plane itself; the guarded,
        # enrolled agent is tested in tests/security.
        "--insecure",
        *extra,
    ]
    return spawn("agent", argv, timeout=60, env=env, stderr=stderr)


@asynccontextmanager
async def agent_stub(endpoint: str) -> AsyncIterator[agent_pb2_grpc.AgentStub]:
    """A gRPC stub on a fresh channel, closed on exit."""
    async with grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS) as channel:
        yield agent_pb2_grpc.AgentStub(channel)


def header(
    buffer_id: str, array: np.ndarray, *, worker: int = 0, session: str = "test"
) -> agent_pb2.UploadRequest:
    """An upload's first message."""
    return agent_pb2.UploadRequest(
        header=agent_pb2.UploadHeader(
            buffer_id=buffer_id, worker=worker, meta=meta_of(array.dtype, array.shape), session=session
        )
    )


async def upload(
    stub: agent_pb2_grpc.AgentStub,
    buffer_id: str,
    array: np.ndarray,
    *,
    worker: int = 0,
    session: str = "test",
    chunk_bytes: int = CHUNK_BYTES,
) -> agent_pb2.UploadReply:
    """Stream ``array`` to the agent as buffer ``buffer_id``."""

    async def requests() -> AsyncIterator[agent_pb2.UploadRequest]:
        yield header(buffer_id, array, worker=worker, session=session)
        for piece in iter_chunks(array, chunk_bytes):
            yield agent_pb2.UploadRequest(chunk=bytes(piece))

    reply: agent_pb2.UploadReply = await stub.Upload(requests(), timeout=30)
    return reply


async def download(stub: agent_pb2_grpc.AgentStub, buffer_id: str, chunk_bytes: int = 0) -> np.ndarray:
    """Fetch buffer ``buffer_id`` back as a NumPy array."""
    call = stub.Download(agent_pb2.DownloadRequest(buffer_id=buffer_id, chunk_bytes=chunk_bytes), timeout=30)
    meta = None
    data = bytearray()
    async for message in call:
        if message.WhichOneof("kind") == "meta":
            meta = message.meta
        else:
            data += message.chunk
    assert meta is not None, "no meta in the download"
    return array_from_bytes(bytes(data), meta).copy()


async def refused(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str, str]:
    """Await a call that must fail; its (code, gpupool-error kind, details)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        meta = dict(exc.trailing_metadata() or ())
        return exc.code(), str(meta.get(ERROR_KEY, "")), exc.details() or ""
    raise AssertionError("the call succeeded; a refusal was expected")


def buffer(buffer_id: str) -> agent_pb2.Operand:
    """A buffer operand."""
    return agent_pb2.Operand(buffer=buffer_id)


def scalar(value: float | int | bool, dtype: str = "") -> agent_pb2.Operand:
    """A scalar operand."""
    if isinstance(value, bool):
        item = agent_pb2.Scalar(b=value, dtype=dtype)
    elif isinstance(value, int):
        item = agent_pb2.Scalar(i=value, dtype=dtype)
    else:
        item = agent_pb2.Scalar(f=value, dtype=dtype)
    return agent_pb2.Operand(scalar=item)


def constant(array: np.ndarray) -> agent_pb2.Operand:
    """An inline constant operand."""
    return agent_pb2.Operand(
        constant=agent_pb2.Constant(
            meta=meta_of(array.dtype, array.shape), data=np.ascontiguousarray(array).tobytes()
        )
    )


def op(
    name: str,
    inputs: list[agent_pb2.Operand],
    output: str,
    dtype: str,
    shape: tuple[int, ...],
    *,
    axis: int | None = None,
    params: Sequence[int] = (),
    axes: Sequence[int] = (),
    keepdims: bool = False,
) -> agent_pb2.Op:
    """One op of a program."""
    return agent_pb2.Op(
        op=name,
        inputs=inputs,
        output=output,
        expect=agent_pb2.ArrayMeta(dtype=dtype, shape=list(shape)),
        has_axis=axis is not None,
        axis=axis or 0,
        params=list(params),
        axes=list(axes),
        keepdims=keepdims,
    )


def fetched_array(fetched: agent_pb2.Fetched) -> np.ndarray:
    """A fetched buffer as a NumPy array."""
    return array_from_bytes(fetched.data, fetched.meta)


@asynccontextmanager
async def mqtt_watch(broker_url: str, topic: str) -> AsyncIterator[aiomqtt.Client]:
    """A fresh MQTT client subscribed to ``topic``."""
    address = parse_broker_url(broker_url)
    async with aiomqtt.Client(
        address.host, address.port, identifier=f"test-{uuid.uuid4().hex[:8]}"
    ) as client:
        await client.subscribe(topic, qos=1)
        yield client


async def next_matching(
    client: aiomqtt.Client,
    topic: str,
    message_type: type[M],
    predicate: Callable[[M], bool] = lambda _: True,
    within: float = 10.0,
) -> M:
    """The first message on exactly ``topic`` that decodes and satisfies ``predicate``, in ``within`` s."""
    async with asyncio.timeout(within):
        async for message in client.messages:
            if message.topic.value != topic or not isinstance(message.payload, bytes | bytearray):
                continue
            if not message.payload:
                continue
            decoded = decode_json(bytes(message.payload), message_type, what=topic)
            if predicate(decoded):
                return decoded
    raise AssertionError("unreachable")


async def clear_retained(broker_url: str, topic: str) -> None:
    """Remove a retained message, so tests leave the shared broker as they found it."""
    address = parse_broker_url(broker_url)
    async with aiomqtt.Client(
        address.host, address.port, identifier=f"test-{uuid.uuid4().hex[:8]}"
    ) as client:
        await client.publish(topic, b"", qos=1, retain=True)


class DeviceLikeBackend(NumpyBackend):
    """The NumPy backend posing as a device: uploads take the staging path, downloads copy to the host.

    Counts its block copies, and fails on request: ``fail_empty`` (out of memory at allocation),
    ``fail_copy`` (a kernel error in a block copy).
    """

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0
        self.fail_empty = False
        self.fail_copy = False

    @property
    def name(self) -> str:
        return "numpy-device"

    @property
    def host_resident(self) -> bool:
        return False

    @property
    def kernel_errors(self) -> tuple[type[BaseException], ...]:
        return (RuntimeError,)

    def to_host(self, array: Any) -> np.ndarray:
        return np.array(array, order="C")

    def empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        if self.fail_empty:
            raise MemoryError("the pretend device is full")
        return super().empty(shape, dtype)

    def copy_in(self, array: Any, offset: int, block: np.ndarray) -> None:
        if self.fail_copy:
            raise RuntimeError("the pretend device failed a copy")
        self.copies += 1
        super().copy_in(array, offset, block)


@asynccontextmanager
async def agent_in_process(
    backend: ArrayBackend, *, memory_limit: int = 64 << 20, raw: bool = True
) -> AsyncIterator[tuple[str, BufferRegistry]]:
    """An AgentService with one worker on ``backend``, served on a loopback port of this process.

    Yields its endpoint and its registry. ``raw=False`` serves the generated methods only, as an agent
    from before UploadRaw and DownloadRaw did.
    """
    worker = Worker(index=0, backend=backend, memory_limit=memory_limit)
    registry = BufferRegistry([memory_limit])
    service = AgentService(
        workers=[worker],
        registry=registry,
        counters=Counters(),
        accepting=lambda: True,
        status=control_pb2.AgentStatus,
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    if raw:
        add_to_server(service, server)
    else:
        agent_pb2_grpc.add_AgentServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", registry
    finally:
        await server.stop(None)
        worker.shutdown()
