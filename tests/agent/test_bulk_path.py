"""The bulk byte path between agents (gpupool/protocol/bulk.py, gpupool/agent/bulk.py): real sockets and real
gRPC servers in this process, open (insecure) agents. Which pulls take it, the fallback to gRPC where it
cannot be reached, refusals passed on, and what a stranger on the socket can do: send garbage, oversized
frames, nothing at all, too many connections, hang up midway.

The enrolled agent's bulk path (TLS, capabilities, sessions) is attacked in
tests/security/test_pull_attacks.py.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from gpupool._config import Timeouts
from gpupool._proto.v1 import agent_pb2, agent_pb2_grpc, control_pb2
from gpupool.agent.backend import ArrayBackend, NumpyBackend
from gpupool.agent.buffers import BufferRegistry
from gpupool.agent.bulk import MAX_CONNECTIONS, BulkServer
from gpupool.agent.peers import BULK_MIN_BYTES, Peers
from gpupool.agent.pull import Puller
from gpupool.agent.service import AgentService, add_to_server
from gpupool.agent.status import Counters
from gpupool.agent.workers import Worker
from gpupool.protocol import bulk
from gpupool.protocol.codec import meta_of
from gpupool.protocol.errors import RpcRefusal
from gpupool.transport.backoff import Backoff
from gpupool.transport.rpc import SERVER_OPTIONS

from .agent_helpers import DeviceLikeBackend, download, refused, run, upload

SESSION = "test"
STALL = 0.5


@dataclass
class BulkAgent:
    stub: agent_pb2_grpc.AgentStub
    endpoint: str
    registry: BufferRegistry
    counters: Counters
    bulk: BulkServer


@asynccontextmanager
async def bulk_agent(
    agent_id: str, backend: ArrayBackend | None = None, *, claimed_port: int | None = None
) -> AsyncIterator[BulkAgent]:
    """An open agent with a bulk path, on loopback; its status gives ``claimed_port`` instead of the real
    port where one is given (a path that cannot be reached)."""
    worker = Worker(index=0, backend=backend or NumpyBackend(), memory_limit=256 << 20)
    registry, counters = BufferRegistry([256 << 20]), Counters()
    timeouts = Timeouts(stall=STALL, connect=2.0)
    peers = Peers(
        agent_id=agent_id,
        coordinator_key=None,
        ca_pem=None,
        timeouts=timeouts,
        backoff=Backoff(base=0.05, attempts=1),
    )
    puller = Puller(
        workers=[worker], registry=registry, peers=peers, counters=counters, accepting=lambda: True
    )
    port = 0

    def status() -> control_pb2.AgentStatus:
        return control_pb2.AgentStatus(agent_id=agent_id, bulk_port=port)

    service = AgentService(
        workers=[worker],
        registry=registry,
        counters=counters,
        accepting=lambda: True,
        status=status,
        timeouts=timeouts,
        puller=puller,
    )
    server = BulkServer(
        read_rows=service.host_rows, confine=None, counters=counters, timeouts=timeouts, tls=None
    )
    bound = await server.start("127.0.0.1")
    port = bound if claimed_port is None else claimed_port
    grpc_server = grpc.aio.server(options=SERVER_OPTIONS)
    add_to_server(service, grpc_server)
    endpoint = f"127.0.0.1:{grpc_server.add_insecure_port('127.0.0.1:0')}"
    await grpc_server.start()
    try:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            stub = agent_pb2_grpc.AgentStub(channel)  # type: ignore[no-untyped-call]
            yield BulkAgent(stub, endpoint, registry, counters, server)
    finally:
        await grpc_server.stop(None)
        await server.close()
        await peers.close()
        worker.shutdown()


def pull_request(
    output: str, *sources: agent_pb2.PullSource, shape: tuple[int, ...], combine: str = ""
) -> agent_pb2.PullRequest:
    return agent_pb2.PullRequest(
        output=output,
        sources=list(sources),
        expect=meta_of(np.dtype(np.float32), shape),
        session=SESSION,
        combine=combine,
    )


def source(agent_id: str, buffer_id: str, start: int, stop: int, endpoint: str = "") -> agent_pb2.PullSource:
    return agent_pb2.PullSource(
        agent_id=agent_id, buffer_id=buffer_id, start=start, stop=stop, endpoint=endpoint
    )


BIG = np.arange(1024 * 1024, dtype=np.float32).reshape(1024, 1024)  # 4 MiB


@pytest.mark.parametrize("backends", ["numpy", "device"])
def test_a_large_pull_goes_over_the_bulk_path(backends: str) -> None:
    def backend() -> ArrayBackend:
        return DeviceLikeBackend() if backends == "device" else NumpyBackend()

    mine = -np.ones((24, 1024), np.float32)

    async def body() -> None:
        async with bulk_agent("a", backend()) as a, bulk_agent("b", backend()) as b:
            await upload(a.stub, "x", BIG)
            await upload(b.stub, "y", mine)
            reply = await b.stub.Pull(
                pull_request(
                    "joined",
                    source("a", "x", 100, 900, a.endpoint),
                    source("b", "y", 0, 24),
                    shape=(824, 1024),
                ),
                timeout=30,
            )
            assert reply.bytes_pulled == 800 * 1024 * 4
            np.testing.assert_array_equal(
                await download(b.stub, "joined"), np.concatenate([BIG[100:900], mine])
            )
            assert a.bulk.reads == 1  # the 3 MiB went over the bulk path, not DownloadRaw
            # summed pieces (not written in place) take it too
            halves = source("a", "x", 0, 512, a.endpoint), source("a", "x", 512, 1024, a.endpoint)
            await b.stub.Pull(pull_request("total", *halves, shape=(512, 1024), combine="sum"), timeout=30)
            np.testing.assert_array_equal(await download(b.stub, "total"), BIG[:512] + BIG[512:])
            assert a.bulk.reads == 3

    run(body())


def test_small_pulls_stay_on_grpc() -> None:
    async def body() -> None:
        async with bulk_agent("a") as a, bulk_agent("b") as b:
            await upload(a.stub, "x", BIG)
            rows = BULK_MIN_BYTES // (1024 * 4) - 1
            await b.stub.Pull(
                pull_request("few", source("a", "x", 0, rows, a.endpoint), shape=(rows, 1024)), timeout=30
            )
            np.testing.assert_array_equal(await download(b.stub, "few"), BIG[:rows])
            assert a.bulk.reads == 0

    run(body())


def unused_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def test_a_bulk_path_that_cannot_be_reached_falls_back_to_grpc() -> None:
    async def body() -> None:
        async with bulk_agent("a", claimed_port=unused_port()) as a, bulk_agent("b") as b:
            await upload(a.stub, "x", BIG)
            for output in ("first", "second"):  # the second read does not try the bulk path again
                await b.stub.Pull(
                    pull_request(output, source("a", "x", 0, 1024, a.endpoint), shape=(1024, 1024)),
                    timeout=30,
                )
                np.testing.assert_array_equal(await download(b.stub, output), BIG)
            assert a.bulk.reads == 0

    run(body())


def test_the_holders_refusals_are_passed_on() -> None:
    async def body() -> None:
        async with bulk_agent("a") as a, bulk_agent("b") as b:
            await upload(a.stub, "x", BIG)
            held = len(b.registry)
            missing = pull_request("out", source("a", "nothing", 0, 1024, a.endpoint), shape=(1024, 1024))
            code, kind, details = await refused(b.stub.Pull(missing, timeout=30))
            assert (code, kind) == (grpc.StatusCode.NOT_FOUND, "buffer-not-found")
            assert "agent a" in details
            outside = pull_request("out", source("a", "x", 512, 1536, a.endpoint), shape=(1024, 1024))
            code, kind, _ = await refused(b.stub.Pull(outside, timeout=30))
            assert kind == "bad-request"
            assert len(b.registry) == held
            assert a.bulk.reads == 0

    run(body())


# -- the socket, as a stranger would use it ---------------------------------------------------------------


def connect(server: BulkServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.settimeout(10)
    return sock


def read_rows(server: BulkServer, buffer_id: str, start: int, stop: int) -> np.ndarray | RpcRefusal:
    """A read as the puller makes it (blocking: run it in a thread)."""
    with connect(server) as sock:
        request = agent_pb2.DownloadRequest(buffer_id=buffer_id, has_rows=True, start=start, stop=stop)
        sock.sendall(bulk.encode_request(request, ""))
        reply = bulk.read_reply(sock)
        if isinstance(reply, RpcRefusal):
            return reply
        out = np.empty(tuple(reply.shape), np.dtype(reply.dtype))
        bulk.recv_into(sock, out.reshape(-1).view(np.uint8).data, deadline=float("inf"))
        return out


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server ends the connection (within the socket's timeout) without a word."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_garbage_oversized_frames_and_silence_end_the_connection_and_nothing_else() -> None:
    async def body() -> None:
        async with bulk_agent("a") as a:
            await upload(a.stub, "x", BIG)

            def attacks() -> list[bool]:
                ended = []
                with connect(a.bulk) as sock:  # another protocol
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    ended.append(closed_by_server(sock))
                with connect(a.bulk) as sock:  # a request "4 GiB long"
                    sock.sendall(bulk.MAGIC + struct.pack(">I", 0xFFFFFFFF))
                    ended.append(closed_by_server(sock))
                with connect(a.bulk) as sock:  # a request that is not a DownloadRequest
                    sock.sendall(bulk.MAGIC + struct.pack(">I", 3) + b"\xff\xff\xff" + struct.pack(">I", 0))
                    ended.append(closed_by_server(sock))
                with connect(a.bulk) as sock:  # half a request, then silence: closed after the stall limit
                    sock.sendall(bulk.MAGIC + struct.pack(">I", 100))
                    ended.append(closed_by_server(sock))
                return ended

            assert await asyncio.to_thread(attacks) == [True, True, True, True]
            got = await asyncio.to_thread(read_rows, a.bulk, "x", 10, 20)
            assert isinstance(got, np.ndarray)
            np.testing.assert_array_equal(got, BIG[10:20])

    run(body())


def test_connections_past_the_limit_are_closed_and_idle_ones_expire() -> None:
    async def body() -> None:
        async with bulk_agent("a") as a:
            await upload(a.stub, "x", BIG)

            def flood() -> tuple[bool, bool]:
                idle = [connect(a.bulk) for _ in range(MAX_CONNECTIONS)]
                try:
                    with connect(a.bulk) as extra:
                        extra_closed = closed_by_server(extra)
                    idle_closed = all(closed_by_server(sock) for sock in idle)  # after the stall limit
                finally:
                    for sock in idle:
                        sock.close()
                return extra_closed, idle_closed

            assert await asyncio.to_thread(flood) == (True, True)
            got = await asyncio.to_thread(read_rows, a.bulk, "x", 0, 1024)
            assert isinstance(got, np.ndarray)
            np.testing.assert_array_equal(got, BIG)

    run(body())


def test_a_reader_that_hangs_up_midway_costs_nothing() -> None:
    async def body() -> None:
        async with bulk_agent("a") as a:
            await upload(a.stub, "x", BIG)

            def hang_up() -> None:
                with connect(a.bulk) as sock:
                    request = agent_pb2.DownloadRequest(buffer_id="x")
                    sock.sendall(bulk.encode_request(request, ""))
                    assert not isinstance(bulk.read_reply(sock), RpcRefusal)
                    sock.recv(1000)

            await asyncio.to_thread(hang_up)
            for _ in range(3):
                got = await asyncio.to_thread(read_rows, a.bulk, "x", 0, 1024)
                assert isinstance(got, np.ndarray)
            assert a.bulk.reads == 3
            refusal = await asyncio.to_thread(read_rows, a.bulk, "x", 1000, 1025)
            assert isinstance(refusal, RpcRefusal)
            assert refusal.kind == "bad-request"

    run(body())


def test_closing_the_server_ends_a_transfer_in_flight() -> None:
    async def body() -> None:
        async with bulk_agent("a") as a:
            await upload(a.stub, "x", BIG)
            sock = await asyncio.to_thread(connect, a.bulk)
            with sock:
                sock.sendall(bulk.encode_request(agent_pb2.DownloadRequest(buffer_id="x"), ""))
                await asyncio.sleep(0.2)  # the server is blocked sending to a reader that does not read
                await asyncio.wait_for(a.bulk.close(), timeout=10)

                def drain() -> int:
                    total = 0
                    while chunk := sock.recv(1 << 20):
                        total += len(chunk)
                    return total

                assert await asyncio.to_thread(drain) < BIG.nbytes

    run(body())


def test_the_wire_format_round_trips() -> None:
    left, right = socket.socketpair()
    with left, right:
        request = agent_pb2.DownloadRequest(buffer_id="s/x", has_rows=True, start=3, stop=9)
        left.sendall(bulk.encode_request(request, "token"))
        assert bulk.read_request(right) == (request, "token")
        left.sendall(bulk.encode_refusal(RpcRefusal("out-of-memory", "full", buffer_id="s/x")))
        refusal = bulk.read_reply(right)
        assert isinstance(refusal, RpcRefusal)
        assert (refusal.kind, refusal.message, refusal.buffer_id) == ("out-of-memory", "full", "s/x")
        meta = meta_of(np.dtype(np.int16), (2, 3))
        left.sendall(bulk.encode_meta(meta))
        assert bulk.read_reply(right) == meta
