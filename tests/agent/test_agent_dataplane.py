"""The data plane of a real agent process over real gRPC: shards in and out, programs, refusals."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np
import pytest

from gpupool._config import SUPPORTED_DTYPES
from gpupool._process import Child
from gpupool._proto.v1 import agent_pb2, agent_pb2_grpc, control_pb2
from gpupool.protocol.topics import Topics

from .agent_helpers import (
    agent_stub,
    buffer,
    clear_retained,
    constant,
    download,
    fetched_array,
    header,
    mqtt_watch,
    new_prefix,
    next_matching,
    op,
    refused,
    run,
    scalar,
    stall,
    start_agent,
    upload,
)

MEMORY_LIMIT = 24 << 20
RNG = np.random.default_rng(11)

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def prefix() -> str:
    """One topic prefix for the module's agent."""
    return new_prefix()


@pytest.fixture(scope="module")
def agent(system_broker_url: str, prefix: str) -> Iterator[Child]:
    """One NumPy agent for the module, with a small memory limit."""
    child = start_agent(system_broker_url, prefix, "--memory-limit", str(MEMORY_LIMIT), "--backend", "numpy")
    yield child
    child.stop()
    run(clear_retained(system_broker_url, Topics(prefix).status(child.ready["agent_id"])))


def session_id() -> str:
    return "t" + uuid.uuid4().hex[:8]


def sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bool":
        return RNG.random(shape) > 0.5
    if dtype.startswith("int"):
        return RNG.integers(-(1 << 30), 1 << 30, shape).astype(dtype)
    return RNG.standard_normal(shape).astype(dtype)


async def health(stub: agent_pb2_grpc.AgentStub) -> control_pb2.AgentStatus:
    reply: agent_pb2.HealthReply = await stub.Health(agent_pb2.HealthRequest(), timeout=10)
    return reply.status


async def assert_serves(stub: agent_pb2_grpc.AgentStub, session: str) -> None:
    """A refusal left the agent fine: a fresh upload and download work."""
    probe = np.arange(10, dtype=np.int64)
    buffer_id = f"{session}.probe-{uuid.uuid4().hex[:6]}"
    await upload(stub, buffer_id, probe, session=session)
    np.testing.assert_array_equal(await download(stub, buffer_id), probe)
    await stub.Free(agent_pb2.FreeRequest(buffer_ids=[buffer_id]), timeout=10)


def test_ready_line(agent: Child) -> None:
    assert agent.ready["role"] == "agent"
    assert agent.ready["backend"] == "numpy"
    assert agent.ready["workers"] == 1
    assert agent.ready["endpoint"].startswith("127.0.0.1:")


def test_round_trip_of_every_dtype(agent: Child) -> None:
    session = session_id()

    async def body() -> None:
        async with agent_stub(agent.ready["endpoint"]) as stub:
            for dtype in SUPPORTED_DTYPES:
                for shape in [(1237, 3), (), (0, 5), (7,)]:
                    array = sample(dtype, shape)
                    buffer_id = f"{session}.{dtype}.{len(shape)}.{array.size}"
                    reply = await upload(stub, buffer_id, array, session=session, chunk_bytes=1000)
                    assert reply.nbytes == array.nbytes
                    for chunk_bytes in (0, 4096):
                        back = await download(stub, buffer_id, chunk_bytes)
                        assert back.dtype == array.dtype
                        assert back.shape == array.shape
                        np.testing.assert_array_equal(back, array)
            freed = await stub.Free(agent_pb2.FreeRequest(session=session), timeout=10)
            assert freed.freed == len(SUPPORTED_DTYPES) * 4

    run(body())


def test_round_trip_of_a_large_array(agent: Child) -> None:
    session = session_id()
    array = sample("float64", (393_217,))  # 3 MiB and 8 bytes: several chunks, a ragged last one

    async def body() -> None:
        async with agent_stub(agent.ready["endpoint"]) as stub:
            await upload(stub, f"{session}.big", array, session=session)
            np.testing.assert_array_equal(await download(stub, f"{session}.big"), array)
            status = await health(stub)
            assert status.workers[0].memory_used >= array.nbytes
            freed = await stub.Free(
                agent_pb2.FreeRequest(buffer_ids=[f"{session}.big", "nonexistent"]), timeout=10
            )
            assert (freed.freed, freed.bytes_freed) == (1, array.nbytes)

    run(body())


def test_programs_match_numpy(agent: Child) -> None:
    session = session_id()
    x = sample("float32", (1001, 7))
    w = sample("float32", (7, 5))
    row = np.linspace(-1, 1, 5, dtype=np.float32)
    s = f"{session}."

    async def body() -> None:
        async with agent_stub(agent.ready["endpoint"]) as stub:
            await upload(stub, s + "x", x, session=session)
            await upload(stub, s + "w", w, session=session)
            program = [
                op("matmul", [buffer(s + "x"), buffer(s + "w")], s + "xw", "float32", (1001, 5)),
                op("tanh", [buffer(s + "xw")], s + "t", "float32", (1001, 5)),
                op("multiply", [buffer(s + "t"), scalar(2.0)], s + "t2", "float32", (1001, 5)),
                op("add", [buffer(s + "t2"), constant(row)], s + "y", "float32", (1001, 5)),
                op("greater", [buffer(s + "y"), scalar(0.5)], s + "mask", "bool", (1001, 5)),
                op(
                    "where",
                    [buffer(s + "mask"), buffer(s + "y"), scalar(0.0)],
                    s + "clipped",
                    "float32",
                    (1001, 5),
                ),
                op("sum", [buffer(s + "clipped")], s + "colsum", "float32", (5,), axis=0),
                op("mean", [buffer(s + "y")], s + "mean", "float64", ()),
                op("astype", [buffer(s + "y")], s + "ints", "int32", (1001, 5)),
                op("maximum", [buffer(s + "ints"), scalar(0, "int32")], s + "relu", "int32", (1001, 5)),
                op("any", [buffer(s + "mask")], s + "any", "bool", ()),
            ]
            request = agent_pb2.ExecuteRequest(
                worker=0,
                ops=program,
                session=session,
                fetch=[s + "colsum", s + "mean", s + "any"],
                free=[s + "xw", s + "t", s + "t2"],
            )
            reply = await stub.Execute(request, timeout=30)
            y = np.tanh(x @ w) * 2 + row
            mask = y > 0.5
            clipped = np.where(mask, y, 0.0).astype(np.float32)
            got = {item.buffer_id: fetched_array(item) for item in reply.fetched}
            np.testing.assert_allclose(got[s + "colsum"], clipped.sum(axis=0), rtol=1e-4)
            np.testing.assert_allclose(got[s + "mean"], y.mean(dtype=np.float64), rtol=1e-5)
            assert bool(got[s + "any"]) == bool(mask.any())
            np.testing.assert_array_equal(await download(stub, s + "mask"), mask)
            np.testing.assert_array_equal(await download(stub, s + "relu"), np.maximum(y.astype(np.int32), 0))
            code, kind, _ = await refused(download(stub, s + "xw"))  # freed by the program
            assert (code, kind) == (grpc.StatusCode.NOT_FOUND, "buffer-not-found")
            assert reply.memory_used == (await health(stub)).workers[0].memory_used
            await stub.Free(agent_pb2.FreeRequest(session=session), timeout=10)

    run(body())


def test_bad_headers_are_refused(agent: Child) -> None:
    session = session_id()

    async def one(request: agent_pb2.UploadRequest) -> AsyncIterator[agent_pb2.UploadRequest]:
        yield request

    async def body() -> None:
        async with agent_stub(agent.ready["endpoint"]) as stub:
            float16 = header(f"{session}.h", np.zeros(3, np.float32), session=session)
            float16.header.meta.dtype = "float128"
            assert (await refused(stub.Upload(one(float16), timeout=10)))[:2] == (INVALID, "bad-request")
            negative = header(f"{session}.h", np.zeros(3, np.float32), session=session)
            negative.header.meta.shape[:] = [-3]
            assert (await refused(stub.Upload(one(negative), timeout=10)))[:2] == (INVALID, "bad-request")
            chunk_first = agent_pb2.UploadRequest(chunk=b"1234")
            assert (await refused(stub.Upload(one(chunk_first), timeout=10)))[:2] == (INVALID, "bad-request")
            no_worker = header(f"{session}.h", np.zeros(3, np.float32), session=session, worker=5)
            code, kind, _ = await refused(stub.Upload(one(no_worker), timeout=10))
            assert (code, kind) == (grpc.StatusCode.FAILED_PRECONDITION, "not-accepting")
            await assert_serves(stub, session)

    run(body())


def test_an_upload_over_the_limit_is_refused_before_its_data(agent: Child) -> None:
    session = session_id()
    too_big = np.zeros(MEMORY_LIMIT // 8 + 1, np.float64)
    sent_data = asyncio.Event()

    async def header_then_wait() -> AsyncIterator[agent_pb2.UploadRequest]:
        yield header(f"{session}.big", too_big, session=session)
        await stall()  # the refusal must come without any data
        sent_data.set()
        yield agent_pb2.UploadRequest(chunk=b"\0" * 8)

    async def body() -> None:
        async with agent_stub(agent.ready["endpoint"]) as stub:
            started = time.monotonic()
            code, kind, details = await refused(stub.Upload(header_then_wait(), timeout=20))
            assert (code, kind) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "out-of-memory")
            assert "limit" in details
            assert time.monotonic() - started < 10
            assert not sent_data.is_set()
            await assert_serves(stub, session)
            assert (await health(stub)).workers[0].memory_limit == MEMORY_LIMIT

    run(body())


def test_streams_too_short_or_too_long_are_refused_and_release_their_reservation(agent: Child) -> None:
    session = session_id()
    array = sample("int32", (1000, 3))
    data = array.tobytes()

    def stream(payload: bytes) -> AsyncIterator[agent_pb2.UploadRequest]:
        async def requests() -> AsyncIterator[agent_pb2.UploadRequest]:
            yield header(f"{session}.a", array, session=session)
            yield agent_pb2.UploadRequest(chunk=payload)

        return requests()

    async def body() -> None:
        async with agent_stub(agent.ready["endpoint"]) as stub:
            used_before = (await health(stub)).workers[0].memory_used
            code, kind, details = await refused(stub.Upload(stream(data[:-5]), timeout=10))
            assert (code, kind) == (INVALID, "bad-request")
            assert "ended after" in details
            code, kind, details = await refused(stub.Upload(stream(data + b"x"), timeout=10))
            assert (code, kind) == (INVALID, "bad-request")
            assert "more than" in details
            status = await health(stub)
            assert status.workers[0].memory_used == used_before
            await upload(stub, f"{session}.a", array, session=session)  # the id is free again
            np.testing.assert_array_equal(await download(stub, f"{session}.a"), array)
            await stub.Free(agent_pb2.FreeRequest(session=session), timeout=10)

    run(body())


def test_a_duplicate_buffer_id_is_refused_and_the_original_kept(agent: Child) -> None:
    session = session_id()
    first = sample("float32", (50,))

    async def body() -> None:
        async with agent_stub(agent.ready["endpoint"]) as stub:
            await upload(stub, f"{session}.d", first, session=session)
            code, kind, _ = await refused(
                upload(stub, f"{session}.d", sample("float32", (50,)), session=session)
            )
            assert (code, kind) == (grpc.StatusCode.ALREADY_EXISTS, "buffer-exists")
            np.testing.assert_array_equal(await download(stub, f"{session}.d"), first)
            program = agent_pb2.ExecuteRequest(
                worker=0,
                session=session,
                ops=[op("negative", [buffer(f"{session}.d")], f"{session}.d", "float32", (50,))],
            )
            code, kind, _ = await refused(stub.Execute(program, timeout=10))
            assert (code, kind) == (grpc.StatusCode.ALREADY_EXISTS, "buffer-exists")
            np.testing.assert_array_equal(await download(stub, f"{session}.d"), first)
            await stub.Free(agent_pb2.FreeRequest(session=session), timeout=10)

    run(body())


def test_execute_refusals_keep_other_buffers(agent: Child) -> None:
    session = session_id()
    s = f"{session}."
    a = sample("float64", (6, 4))

    def program(*ops: agent_pb2.Op, worker: int = 0) -> agent_pb2.ExecuteRequest:
        return agent_pb2.ExecuteRequest(worker=worker, session=session, ops=ops)

    async def body() -> None:
        async with agent_stub(agent.ready["endpoint"]) as stub:
            await upload(stub, s + "a", a, session=session)
            await upload(stub, s + "gone", a, session=session)
            await stub.Free(agent_pb2.FreeRequest(buffer_ids=[s + "gone"]), timeout=10)
            cases = [
                (
                    program(op("add", [buffer(s + "a"), buffer(s + "a")], s + "o", "float64", (4, 6))),
                    INVALID,
                    "bad-request",
                ),
                (
                    program(
                        op("exp", [buffer(s + "a")], s + "e", "float64", (6, 4)),
                        op("add", [buffer(s + "e"), constant(np.ones(3))], s + "o", "float64", (6, 4)),
                    ),
                    INVALID,
                    "kernel-failed",
                ),
                (
                    program(op("exp", [buffer(s + "gone")], s + "o", "float64", (6, 4))),
                    grpc.StatusCode.NOT_FOUND,
                    "buffer-not-found",
                ),
                (
                    program(op("exp", [buffer(s + "a")], s + "o", "float64", (MEMORY_LIMIT // 8,))),
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "out-of-memory",
                ),
                (program(op("eval", [buffer(s + "a")], s + "o", "float64", (6, 4))), INVALID, "bad-request"),
                (
                    program(op("exp", [buffer(s + "a")], s + "o", "float64", (6, 4)), worker=3),
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "not-accepting",
                ),
            ]
            for request, want_code, want_kind in cases:
                code, kind, _ = await refused(stub.Execute(request, timeout=10))
                assert (code, kind) == (want_code, want_kind), request
                status = await health(stub)
                assert status.workers[0].buffers >= 1
            # nothing of the failed programs was kept: their output ids are free
            reply = await stub.Execute(
                agent_pb2.ExecuteRequest(
                    worker=0,
                    session=session,
                    fetch=[s + "o"],
                    ops=[
                        op("exp", [buffer(s + "a")], s + "e", "float64", (6, 4)),
                        op("add", [buffer(s + "e"), constant(np.ones(4))], s + "o", "float64", (6, 4)),
                    ],
                ),
                timeout=10,
            )
            np.testing.assert_allclose(fetched_array(reply.fetched[0]), np.exp(a) + 1)
            np.testing.assert_array_equal(await download(stub, s + "a"), a)
            await assert_serves(stub, session)
            freed = await stub.Free(agent_pb2.FreeRequest(session=session), timeout=10)
            assert freed.freed == 3

    run(body())


def test_health_and_telemetry_report_the_work(agent: Child, system_broker_url: str, prefix: str) -> None:
    session = session_id()
    agent_id = agent.ready["agent_id"]
    telemetry_topic = Topics(prefix).telemetry(agent_id)

    async def body() -> None:
        async with (
            agent_stub(agent.ready["endpoint"]) as stub,
            mqtt_watch(system_broker_url, telemetry_topic) as mqtt,
        ):
            status = await health(stub)
            assert status.agent_id == agent_id
            assert status.state == control_pb2.AGENT_STATE_READY
            await upload(stub, f"{session}.x", np.ones(1000), session=session)
            await stub.Execute(
                agent_pb2.ExecuteRequest(
                    worker=0,
                    session=session,
                    ops=[op("sqrt", [buffer(f"{session}.x")], f"{session}.r", "float64", (1000,))],
                ),
                timeout=10,
            )
            report = await next_matching(
                mqtt,
                telemetry_topic,
                control_pb2.AgentTelemetry,
                lambda t: t.ops_executed >= 1 and t.bytes_received >= 8000 and t.workers[0].buffers >= 2,
            )
            assert report.agent_id == agent_id
            assert report.workers[0].memory_limit == MEMORY_LIMIT
            assert report.workers[0].memory_used >= 16000
            await stub.Free(agent_pb2.FreeRequest(session=session), timeout=10)

    run(body())


def test_a_cancelled_upload_releases_its_reservation(agent: Child) -> None:
    session = session_id()
    array = sample("float64", (MEMORY_LIMIT // 8 * 3 // 4,))  # three quarters of the limit
    data = array.tobytes()
    half_sent = asyncio.Event()

    async def half_then_wait() -> AsyncIterator[agent_pb2.UploadRequest]:
        yield header(f"{session}.c", array, session=session)
        yield agent_pb2.UploadRequest(chunk=data[: len(data) // 2])
        half_sent.set()
        await stall()

    async def body() -> None:
        async with agent_stub(agent.ready["endpoint"]) as stub:
            call = stub.Upload(half_then_wait(), timeout=20)
            await asyncio.wait_for(half_sent.wait(), 10)
            await asyncio.sleep(0.2)
            call.cancel()
            # the reservation (id and memory) goes once the agent sees the cancellation
            async with asyncio.timeout(10):
                while True:
                    try:
                        await upload(stub, f"{session}.c", array, session=session)
                        break
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() not in (
                            grpc.StatusCode.ALREADY_EXISTS,
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                        ):
                            raise
                        await asyncio.sleep(0.05)
            np.testing.assert_array_equal(await download(stub, f"{session}.c"), array)
            await stub.Free(agent_pb2.FreeRequest(session=session), timeout=10)

    run(body())


def test_concurrent_uploads_and_programs(agent: Child) -> None:
    session = session_id()
    arrays = [sample("float32", (100_000 + i, 3)) for i in range(8)]  # 1.2 MiB each

    async def one(stub: agent_pb2_grpc.AgentStub, i: int) -> None:
        name = f"{session}.{i}"
        await upload(stub, name, arrays[i], session=session)
        reply = await stub.Execute(
            agent_pb2.ExecuteRequest(
                worker=0,
                session=session,
                fetch=[name + ".sum"],
                free=[name + ".sq"],
                ops=[
                    op("square", [buffer(name)], name + ".sq", "float32", arrays[i].shape),
                    op("sum", [buffer(name + ".sq")], name + ".sum", "float64", ()),
                ],
            ),
            timeout=30,
        )
        want = np.square(arrays[i]).sum(dtype=np.float64)
        np.testing.assert_allclose(fetched_array(reply.fetched[0]), want, rtol=1e-4)
        np.testing.assert_array_equal(await download(stub, name), arrays[i])

    async def body() -> None:
        async with agent_stub(agent.ready["endpoint"]) as stub:
            await asyncio.gather(*(one(stub, i) for i in range(len(arrays))))
            status = await health(stub)
            assert status.workers[0].buffers >= 2 * len(arrays)
            freed = await stub.Free(agent_pb2.FreeRequest(session=session), timeout=10)
            assert freed.freed == 2 * len(arrays)

    run(body())
