"""The agent under pressure: failed programs free their memory, stalled uploads lose their reservations,
sessions are capped and take turns, and a program's deadline grows with its work.

Pure parts (the work estimate, the turn gate, the registry's session caps) are tested without a network;
the rest against real agent processes on loopback, measuring what an outside tester measured (RSS with
psutil, a small op's latency behind another session's long program).
"""

from __future__ import annotations

import asyncio
import functools
import math
import threading
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, contextmanager

import grpc
import numpy as np
import psutil
import pytest

from gpupool._config import Timeouts
from gpupool._errors import DeviceOutOfMemory, UsageError
from gpupool._process import Child
from gpupool._proto.v1 import agent_pb2, control_pb2
from gpupool.agent.backend import NumpyBackend
from gpupool.agent.buffers import BufferRegistry
from gpupool.agent.main import build_parser, config_from_args
from gpupool.agent.program import estimate_work, run_program
from gpupool.agent.turns import TurnGate
from gpupool.agent.workers import Worker
from gpupool.client.channels import CHANNEL_OPTIONS, AgentChannel
from gpupool.protocol.codec import meta_of
from gpupool.protocol.errors import RpcRefusal
from gpupool.protocol.rawstream import ACCEPTED, UPLOAD_RAW
from gpupool.protocol.topics import Topics

from .agent_helpers import (
    DeviceLikeBackend,
    agent_stub,
    buffer,
    clear_retained,
    constant,
    new_prefix,
    op,
    refused,
    run,
    scalar,
    start_agent,
    upload,
)

MiB = 1 << 20
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def session_id() -> str:
    return "t" + uuid.uuid4().hex[:8]


@contextmanager
def agent_process(system_broker_url: str, *flags: str) -> Iterator[Child]:
    """A NumPy agent process with ``flags``, stopped (and its retained status cleared) on exit."""
    prefix = new_prefix()
    child = start_agent(system_broker_url, prefix, "--backend", "numpy", *flags)
    try:
        yield child
    finally:
        child.stop()
        run(clear_retained(system_broker_url, Topics(prefix).status(child.ready["agent_id"])))


async def worker_status(stub: object) -> control_pb2.WorkerStatus:
    reply: agent_pb2.HealthReply = await stub.Health(agent_pb2.HealthRequest(), timeout=10)  # type: ignore[attr-defined]
    return reply.status.workers[0]


def upload_header(buffer_id: str, session: str, dtype: str, shape: tuple[int, ...]) -> bytes:
    """A serialized UploadRaw header."""
    header = agent_pb2.UploadHeader(
        buffer_id=buffer_id, session=session, meta=meta_of(np.dtype(dtype), shape)
    )
    return header.SerializeToString()


# -- deadlines that scale with the work (pure) -----------------------------------------------------------


def test_for_work_adds_the_work_at_the_floors_to_the_fixed_part() -> None:
    timeouts = Timeouts(rpc=5.0)
    assert timeouts.for_work(0, 0) == 5.0
    assert timeouts.for_work(int(Timeouts.WORK_BYTES_PER_SECOND), 0) == pytest.approx(6.0)
    assert timeouts.for_work(0, int(Timeouts.WORK_FLOPS_PER_SECOND * 3)) == pytest.approx(8.0)
    assert Timeouts().stall == 10.0


def test_estimate_work_counts_matmul_as_2mnk_and_every_byte_touched() -> None:
    sizes = {"x": 64 * 32 * 4, "w": 32 * 16 * 4}  # float32 (64, 32) and (32, 16), resident
    request = agent_pb2.ExecuteRequest(
        ops=[
            op("matmul", [buffer("x"), buffer("w")], "xw", "float32", (64, 16)),
            op("add", [buffer("xw"), scalar(1.0)], "y", "float32", (64, 16)),
            op("sum", [buffer("y")], "s", "float64", ()),
        ],
        fetch=["s", "x"],
    )
    nbytes, flops = estimate_work(request, lambda buffer_id: sizes.get(buffer_id, 0))
    assert flops == 2 * 64 * 16 * 32 + 64 * 16 + 64 * 16
    xw = 64 * 16 * 4
    assert nbytes == (sizes["x"] + sizes["w"] + xw) + (xw + xw) + (xw + 8) + sizes["x"]


def test_estimate_work_of_vector_batched_and_chained_matmuls() -> None:
    def flops_of(request: agent_pb2.ExecuteRequest, sizes: dict[str, int]) -> int:
        return estimate_work(request, lambda buffer_id: sizes.get(buffer_id, 0))[1]

    dot = agent_pb2.ExecuteRequest(ops=[op("matmul", [buffer("a"), buffer("b")], "d", "float64", ())])
    assert flops_of(dot, {"a": 1000 * 8, "b": 1000 * 8}) == 2 * 1000
    # (8, 100, 50) @ (8, 50, 20): k is over-counted by sqrt(batch), never under
    batched = agent_pb2.ExecuteRequest(
        ops=[op("matmul", [buffer("a"), buffer("b")], "p", "float32", (8, 100, 20))]
    )
    flops = flops_of(batched, {"a": 8 * 100 * 50 * 4, "b": 8 * 50 * 20 * 4})
    assert 2 * 8 * 100 * 20 * 50 <= flops <= 2 * 8 * 100 * 20 * 50 * math.sqrt(8) + 1
    # a chain reads the previous op's declared output, and a constant's bytes
    chain = agent_pb2.ExecuteRequest(
        ops=[
            op(
                "matmul", [buffer("a"), constant(np.ones((300, 200), np.float32))], "p", "float32", (100, 200)
            ),
            op("matmul", [buffer("p"), constant(np.ones((200, 10), np.float32))], "q", "float32", (100, 10)),
        ]
    )
    assert flops_of(chain, {"a": 100 * 300 * 4}) == 2 * 100 * 200 * 300 + 2 * 100 * 10 * 200
    # a long program gets a long deadline: 100 matmuls of 4096^2 take far more than the fixed part
    sizes = {"x": 4096 * 4096 * 4}
    many = agent_pb2.ExecuteRequest(
        ops=[op("matmul", [buffer("x"), buffer("x")], f"m{i}", "float32", (4096, 4096)) for i in range(100)]
    )
    nbytes, flops = estimate_work(many, lambda buffer_id: sizes.get(buffer_id, 0))
    assert flops == 100 * 2 * 4096**3
    assert Timeouts().for_work(nbytes, flops) > 100 * Timeouts().rpc


# -- turns (pure) ----------------------------------------------------------------------------------------


def test_turns_go_round_robin_across_waiting_sessions() -> None:
    gate = TurnGate()
    order: list[str] = []
    gate.acquire("a")  # held while the others queue: a2 and a3 of session a, then b1

    def take(name: str) -> None:
        gate.acquire(name[0])
        order.append(name)
        gate.release()

    threads = []
    for queued, name in enumerate(("a2", "a3", "b1"), start=1):
        thread = threading.Thread(target=take, args=(name,))
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 10
        while gate.waiting() < queued:
            assert time.monotonic() < deadline, f"{name} never queued"
            time.sleep(0.001)
    gate.release()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert order == ["a2", "b1", "a3"]  # not first come, first served: b's turn comes between a's
    assert gate.idle()


def test_a_session_keeps_the_turn_while_nobody_else_waits() -> None:
    gate = TurnGate()
    for _ in range(3):
        gate.acquire("a")
        assert not gate.idle()
        gate.release()
    assert gate.idle()


def test_a_small_op_waits_for_at_most_one_op_of_a_long_program() -> None:
    """In one process: a worker's turns interleave two sessions' programs at op boundaries."""
    registry = BufferRegistry([512 * MiB])
    x = np.random.default_rng(1).standard_normal((512, 512)).astype(np.float32) / 32
    registry.commit(registry.reserve(worker=0, buffer_id="x", nbytes=x.nbytes, session="a"), x)
    worker = Worker(index=0, backend=NumpyBackend(), memory_limit=512 * MiB)
    log: list[tuple[str, str]] = []
    lock = threading.Lock()
    under_way = threading.Event()  # the long program has had a few turns

    def turn_of(session: str) -> AbstractContextManager[object]:
        @contextmanager
        def recorded() -> Iterator[None]:
            with lock:
                log.append((session, "waits"))
            with worker.turn(session):
                with lock:
                    log.append((session, "turn"))
                    if log.count(("a", "turn")) == 3:
                        under_way.set()
                yield

        return recorded()

    long = agent_pb2.ExecuteRequest(
        session="a",
        ops=[op("matmul", [buffer("x"), buffer("x")], f"a{i}", "float32", (512, 512)) for i in range(200)],
        free=[f"a{i}" for i in range(200)],
    )
    small = agent_pb2.ExecuteRequest(session="b", ops=[op("sum", [buffer("x")], "b0", "float64", ())])

    async def body() -> None:
        first = asyncio.ensure_future(
            worker.call(
                lambda: run_program(
                    long, backend=worker.backend, registry=registry, turn=lambda: turn_of("a")
                )
            )
        )
        assert await asyncio.to_thread(under_way.wait, 30)
        await worker.call(
            lambda: run_program(small, backend=worker.backend, registry=registry, turn=lambda: turn_of("b"))
        )
        assert not first.done(), "the long program ended before the small one: no interleaving to see"
        await first

    try:
        run(body())
    finally:
        worker.shutdown()
    waits = log.index(("b", "waits"))
    turn = log.index(("b", "turn"))
    assert sum(1 for entry in log[waits:turn] if entry == ("a", "turn")) <= 1
    assert registry.contains("b0")


def test_on_an_asynchronous_device_each_turn_ends_with_the_device_idle() -> None:
    """A turn on a device that computes asynchronously (CuPy) ends with a synchronisation, whose errors
    are refusals like the op's own."""

    class Device(DeviceLikeBackend):
        def __init__(self) -> None:
            super().__init__()
            self.synchronized = 0
            self.fail_sync = False

        def synchronize(self) -> None:
            self.synchronized += 1
            if self.fail_sync:
                raise RuntimeError("the pretend device failed a kernel")

    backend = Device()
    registry = BufferRegistry([MiB])
    x = np.arange(6, dtype=np.float32)
    registry.commit(registry.reserve(worker=0, buffer_id="x", nbytes=x.nbytes, session="s"), x)
    worker = Worker(index=0, backend=backend, memory_limit=MiB)

    def execute(*ops: agent_pb2.Op) -> agent_pb2.ExecuteReply:
        request = agent_pb2.ExecuteRequest(session="s", ops=ops)
        return run_program(
            request, backend=backend, registry=registry, turn=functools.partial(worker.turn, "s")
        )

    async def body() -> None:
        ops = [op("negative", [buffer("x")], f"n{i}", "float32", (6,)) for i in range(3)]
        await worker.call(execute, *ops)
        assert backend.synchronized >= 3  # one per turn (and the commit's own)
        backend.fail_sync = True
        with pytest.raises(RpcRefusal) as caught:
            await worker.call(execute, op("negative", [buffer("x")], "bad", "float32", (6,)))
        assert caught.value.kind == "kernel-failed"
        assert not registry.contains("bad")
        assert registry.usage(0).reserved == 0

    try:
        run(body())
    finally:
        worker.shutdown()


# -- failed programs keep no memory -----------------------------------------------------------------------


N_KEPT = 4 * MiB
FAILING = {
    "op by op": [
        op("astype", [buffer("x")], "a", "float64", (N_KEPT,)),
        op("sum", [buffer("a")], "s", "float64", ()),
        op("add", [buffer("a"), constant(np.ones(5))], "bad", "float64", (N_KEPT,)),
    ],
    # a fused run (NumPy) that fails in its first block, its full-size outputs already made
    "fused": [
        op("multiply", [buffer("x"), scalar(2.0)], "a", "float64", (N_KEPT,)),
        op("add", [buffer("a"), constant(np.ones(5))], "bad", "float64", (N_KEPT,)),
    ],
}


@pytest.mark.parametrize("ops", FAILING.values(), ids=FAILING.keys())
def test_a_kept_refusal_keeps_no_arrays_of_the_failed_program(ops: list[agent_pb2.Op]) -> None:
    """gRPC keeps the error a call aborted with; the program's intermediates must not hang off it."""
    n = N_KEPT
    registry = BufferRegistry([1 << 30])
    x = np.ones(n, np.float32)
    registry.commit(registry.reserve(worker=0, buffer_id="x", nbytes=x.nbytes, session="s"), x)
    request = agent_pb2.ExecuteRequest(session="s", ops=ops)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with pytest.raises(RpcRefusal) as caught:
            run_program(request, backend=NumpyBackend(), registry=registry)
        kept = caught.value  # as the call's state keeps it
        assert kept.kind == "kernel-failed"
        assert tracemalloc.get_traced_memory()[0] - before < MiB
    finally:
        tracemalloc.stop()
    assert registry.usage(0).reserved == 0
    assert registry.usage(0).used == x.nbytes


def oom_program(tag: str, n: int) -> list[agent_pb2.Op]:
    """Two outputs of 8n bytes are computed (op by op: no fusion), the third is over the limit."""
    return [
        op("astype", [buffer("x")], f"{tag}.a", "float64", (n,)),
        op("sum", [buffer(f"{tag}.a")], f"{tag}.s", "float64", ()),
        op("multiply", [buffer(f"{tag}.a"), scalar(2.0)], f"{tag}.b", "float64", (n,)),
        op("sum", [buffer(f"{tag}.b")], f"{tag}.t", "float64", ()),
        op("add", [buffer(f"{tag}.b"), scalar(1.0)], f"{tag}.c", "float64", (n,)),
    ]


def bad_op_program(tag: str, n: int) -> list[agent_pb2.Op]:
    """A big intermediate, then an op whose operands do not broadcast."""
    return [
        op("astype", [buffer("x")], f"{tag}.a", "float64", (n,)),
        op("sum", [buffer(f"{tag}.a")], f"{tag}.s", "float64", ()),
        op("add", [buffer(f"{tag}.a"), constant(np.ones(5))], f"{tag}.c", "float64", (n,)),
    ]


def test_failed_programs_and_uploads_leave_rss_and_accounting_where_they_were(system_broker_url: str) -> None:
    limit = 256 * MiB
    n = 12 * MiB  # x: float32, 48 MiB; each float64 intermediate 96 MiB
    with agent_process(system_broker_url, "--memory-limit", str(limit)) as agent:
        process = psutil.Process(agent.pid)
        session = session_id()

        async def body() -> None:
            async with agent_stub(agent.ready["endpoint"]) as stub:
                await upload(stub, "x", np.ones(n, np.float32), session=session)
                before = await worker_status(stub)
                for i in range(10):
                    request = agent_pb2.ExecuteRequest(session=session, ops=oom_program(f"p{i}", n))
                    code, kind, details = await refused(stub.Execute(request, timeout=60))
                    assert (code, kind) == (EXHAUSTED, "out-of-memory"), details
                for i in range(5):
                    request = agent_pb2.ExecuteRequest(session=session, ops=bad_op_program(f"q{i}", n))
                    _, kind, details = await refused(stub.Execute(request, timeout=60))
                    assert kind == "kernel-failed", details
                async with grpc.aio.insecure_channel(
                    agent.ready["endpoint"], options=CHANNEL_OPTIONS
                ) as channel:
                    for i in range(5):  # uploads cut short, each after 120 of its 128 MiB
                        header = upload_header(f"u{i}", session, "float32", (32 * MiB,))

                        async def short(header: bytes = header) -> AsyncIterator[bytes]:
                            yield header
                            for _ in range(120):
                                yield b"\1" * MiB

                        _, kind, _ = await refused(
                            channel.stream_unary(UPLOAD_RAW, None, None)(short(), timeout=60)
                        )
                        assert kind == "bad-request"
                # The agent and its worker process (where the buffers are, and the computing).
                rss = sum(p.memory_info().rss for p in (process, *process.children()))
                print(
                    f"agent + worker RSS after 15 failed programs and 5 failed uploads: {rss / MiB:.0f} MiB "
                    f"(limit {limit / MiB:.0f} MiB)"
                )
                assert rss <= limit + 150 * MiB
                after = await worker_status(stub)
                assert (after.memory_used, after.buffers) == (before.memory_used, before.buffers)
                # nothing stays reserved either: the rest of the limit can be taken in one piece
                rest = np.zeros((limit - after.memory_used) // 8, np.float64)
                await upload(stub, "rest", rest, session=session)
                await stub.Free(agent_pb2.FreeRequest(session=session), timeout=10)

        run(body(), timeout=120)


# -- stalled uploads ----------------------------------------------------------------------------------------


def test_stalled_uploads_lose_their_reservations_within_the_stall_timeout(system_broker_url: str) -> None:
    limit = 64 * MiB
    with agent_process(system_broker_url, "--memory-limit", str(limit), "--stall-timeout", "1") as agent:
        session = session_id()

        async def body() -> None:
            quiet = asyncio.Event()
            async with grpc.aio.insecure_channel(agent.ready["endpoint"], options=CHANNEL_OPTIONS) as channel:
                upload_raw = channel.stream_unary(UPLOAD_RAW, None, None)

                async def header_only(buffer_id: str) -> AsyncIterator[bytes]:
                    yield upload_header(buffer_id, session, "int32", (limit // 16,))
                    await quiet.wait()  # the stream stays open, and sends nothing

                calls = [upload_raw(header_only(f"{session}.h{i}"), timeout=60) for i in range(4)]
                for call in calls:  # each has the go-ahead: a quarter of the limit is reserved for it
                    assert ACCEPTED in tuple(await asyncio.wait_for(call.initial_metadata(), 10) or ())
                full = np.ones(limit // 4, np.int32)
                client = AgentChannel(agent.ready["agent_id"], agent.ready["endpoint"], Timeouts())
                try:
                    with pytest.raises(DeviceOutOfMemory):
                        await client.upload(f"{session}.full", 0, full, session)
                    started = time.monotonic()
                    async with asyncio.timeout(10):  # far less than the stream deadline (30 s + 1 s/MiB)
                        while True:
                            try:
                                await client.upload(f"{session}.full", 0, full, session)
                                break
                            except DeviceOutOfMemory:
                                await asyncio.sleep(0.1)  # still reserved: try again shortly
                    print(f"a full-size upload succeeded {time.monotonic() - started:.1f} s after the stall")
                    for call in calls:
                        code, _, details = await refused(call)
                        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
                        assert "stalled" in details
                    await client.free(session=session)
                finally:
                    quiet.set()
                    await client.close()

        run(body(), timeout=60)


# -- per-session caps -------------------------------------------------------------------------------------


def test_the_registry_caps_each_sessions_bytes_on_a_worker() -> None:
    registry = BufferRegistry([100, 100], session_limits=[50, None])
    first = registry.reserve(worker=0, buffer_id="a", nbytes=30, session="s")
    with pytest.raises(RpcRefusal) as caught:
        registry.reserve(worker=0, buffer_id="b", nbytes=30, session="s")
    assert caught.value.kind == "out-of-memory"
    assert "session s" in caught.value.message
    assert "50-byte session cap" in caught.value.message
    assert caught.value.extra["available"] == "20"
    other = registry.reserve(worker=0, buffer_id="c", nbytes=30, session="t")  # another session's own share
    registry.reserve(worker=1, buffer_id="d", nbytes=90, session="s")  # no cap on worker 1
    registry.commit(first, np.zeros(30, np.uint8))
    assert registry.session_usage(0, "s") == 30
    registry.release(other)
    assert registry.session_usage(0, "t") == 0
    registry.reserve(worker=0, buffer_id="e", nbytes=20, session="s")
    registry.free(["a"])
    assert registry.session_usage(0, "s") == 20
    registry.free_session("s")
    assert registry.session_usage(0, "s") == 20  # the reservation is still held
    assert registry.session_limit(0) == 50
    assert registry.session_limit(1) is None


def test_a_program_output_over_the_session_cap_is_refused_and_nothing_kept() -> None:
    registry = BufferRegistry([1 << 20], session_limits=[1500])
    x = np.zeros(100, np.float32)  # 400 bytes
    registry.commit(registry.reserve(worker=0, buffer_id="x", nbytes=x.nbytes, session="s"), x)
    request = agent_pb2.ExecuteRequest(
        session="s",
        ops=[
            op("negative", [buffer("x")], "n", "float32", (100,)),
            op("astype", [buffer("n")], "d", "float64", (100,)),
        ],
    )
    with pytest.raises(RpcRefusal) as caught:
        run_program(request, backend=NumpyBackend(), registry=registry)
    assert caught.value.kind == "out-of-memory"
    assert "session cap" in caught.value.message
    assert registry.session_usage(0, "s") == x.nbytes
    assert registry.usage(0).reserved == 0
    request.session = "t"  # another session has room for it
    run_program(request, backend=NumpyBackend(), registry=registry)
    assert registry.session_usage(0, "t") == 400 + 800


def test_the_command_line_takes_the_new_limits() -> None:
    args = build_parser().parse_args(
        ["--broker", "mqtt://127.0.0.1:1883", "--stall-timeout", "2.5", "--session-memory-limit", "50%"]
    )
    config = config_from_args(args)
    assert config.timeouts.stall == 2.5
    assert config.session_limit(1000) == 500
    assert config_from_args(build_parser().parse_args(["--broker", "mqtt://h"])).session_limit(1000) is None
    assert config.bulk_port == 0  # a free port, unless told
    for text, port in (("off", None), ("OFF", None), ("50053", 50053), ("0", 0)):
        assert (
            config_from_args(
                build_parser().parse_args(["--broker", "mqtt://h", "--bulk-port", text])
            ).bulk_port
            == port
        )
    for flags in (
        ["--stall-timeout", "0"],
        ["--session-memory-limit", "lots"],
        ["--bulk-port", "65536"],
        ["--bulk-port", "-1"],
        ["--bulk-port", "auto"],
    ):
        with pytest.raises(UsageError):
            config_from_args(build_parser().parse_args(["--broker", "mqtt://h", *flags]))


def test_an_agent_caps_each_session(system_broker_url: str) -> None:
    limit = 64 * MiB
    with agent_process(
        system_broker_url, "--memory-limit", str(limit), "--session-memory-limit", "50%"
    ) as agent:
        greedy, modest = session_id(), session_id()

        async def body() -> None:
            client = AgentChannel(agent.ready["agent_id"], agent.ready["endpoint"], Timeouts())
            async with agent_stub(agent.ready["endpoint"]) as stub:
                await upload(stub, f"{greedy}.a", np.ones(4 * MiB, np.float32), session=greedy)  # 16 MiB
                await upload(stub, f"{greedy}.b", np.ones(2 * MiB, np.float32), session=greedy)  # 8 MiB
                with pytest.raises(DeviceOutOfMemory) as caught:
                    await client.upload(f"{greedy}.c", 0, np.ones(4 * MiB, np.float32), greedy)
                await client.close()
                assert f"session {greedy}" in str(caught.value)
                assert f"{limit // 2}-byte session cap" in str(caught.value)
                program = agent_pb2.ExecuteRequest(
                    session=greedy,
                    ops=[op("astype", [buffer(f"{greedy}.a")], f"{greedy}.d", "float32", (4 * MiB,))],
                )
                code, kind, details = await refused(stub.Execute(program, timeout=30))
                assert (code, kind) == (EXHAUSTED, "out-of-memory")
                assert "session cap" in details
                await upload(stub, f"{modest}.a", np.ones(6 * MiB, np.float32), session=modest)  # its share
                status = await worker_status(stub)
                assert status.memory_used == 48 * MiB
                for session in (greedy, modest):
                    await stub.Free(agent_pb2.FreeRequest(session=session), timeout=10)

        run(body())


# -- fairness between sessions ----------------------------------------------------------------------------


def test_a_small_op_is_not_held_behind_another_sessions_long_program(system_broker_url: str) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((256, 4096)).astype(np.float32)
    w = rng.standard_normal((4096, 256)).astype(np.float32) / 64
    x @ w
    started = time.perf_counter()
    for _ in range(5):
        x @ w
    one_op = (time.perf_counter() - started) / 5
    count = max(200, min(2000, int(2.0 / one_op)))  # about 2 s of matmuls here (never under 0.4 s)
    with agent_process(system_broker_url, "--memory-limit", str(1 << 30)) as agent:
        a, b = session_id(), session_id()

        async def body() -> None:
            async with agent_stub(agent.ready["endpoint"]) as stub:
                await upload(stub, f"{a}.x", x, session=a)
                await upload(stub, f"{a}.w", w, session=a)
                await upload(stub, f"{b}.v", np.arange(1000, dtype=np.float32), session=b)
                long = agent_pb2.ExecuteRequest(
                    session=a,
                    ops=[
                        op("matmul", [buffer(f"{a}.x"), buffer(f"{a}.w")], f"{a}.m{i}", "float32", (256, 256))
                        for i in range(count)
                    ],
                    free=[f"{a}.m{i}" for i in range(count)],
                )
                small = agent_pb2.ExecuteRequest(
                    session=b, ops=[op("sum", [buffer(f"{b}.v")], f"{b}.s", "float64", ())], fetch=[f"{b}.s"]
                )
                finished: dict[str, float] = {}

                async def timed(name: str, request: agent_pb2.ExecuteRequest) -> None:
                    await stub.Execute(request, timeout=120)
                    finished[name] = time.perf_counter()

                began = time.perf_counter()
                first = asyncio.ensure_future(timed("a", long))
                await asyncio.sleep(0.1)  # "shortly after": A is under way (it takes about 2 s)
                sent = time.perf_counter()
                await timed("b", small)
                await first
                a_time, b_latency = finished["a"] - began, finished["b"] - sent
                print(
                    f"B's latency {b_latency * 1000:.1f} ms while A's {count}-matmul program took "
                    f"{a_time * 1000:.0f} ms (ratio {b_latency / a_time:.4f}; one op about "
                    f"{a_time / count * 1000:.1f} ms)"
                )
                assert finished["b"] < finished["a"], "the small op waited for the whole long program"
                await stub.Free(agent_pb2.FreeRequest(session=a), timeout=10)
                await stub.Free(agent_pb2.FreeRequest(session=b), timeout=10)

        run(body(), timeout=120)
