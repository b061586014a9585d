"""``Pull`` and ``Download`` with a row range on real gRPC servers in this process: two open (insecure)
agents, one of them on the device-like backend (rows copied off the device, the result onto it).

The guarded, enrolled agent's checks are tested in tests/security/test_pull_attacks.py.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import numpy as np
import pytest

from gpupool._proto.v1 import agent_pb2, agent_pb2_grpc, control_pb2
from gpupool.agent.backend import ArrayBackend, NumpyBackend
from gpupool.agent.buffers import BufferRegistry
from gpupool.agent.peers import Peers
from gpupool.agent.pull import Puller
from gpupool.agent.service import AgentService, add_to_server
from gpupool.agent.status import Counters
from gpupool.agent.workers import Worker
from gpupool.protocol.codec import meta_of
from gpupool.transport.backoff import Backoff
from gpupool.transport.rpc import SERVER_OPTIONS

from .agent_helpers import DeviceLikeBackend, download, refused, run, upload

SESSION = "test"


@asynccontextmanager
async def pulling_agent(
    agent_id: str, backend: ArrayBackend, *, memory_limit: int = 64 << 20
) -> AsyncIterator[tuple[agent_pb2_grpc.AgentStub, str, BufferRegistry, Counters]]:
    """An open agent that takes pulls, served on a loopback port: its stub, endpoint, registry, counters."""
    worker = Worker(index=0, backend=backend, memory_limit=memory_limit)
    registry, counters = BufferRegistry([memory_limit]), Counters()
    peers = Peers(
        agent_id=agent_id, coordinator_key=None, ca_pem=None, backoff=Backoff(base=0.05, attempts=2)
    )
    puller = Puller(
        workers=[worker], registry=registry, peers=peers, counters=counters, accepting=lambda: True
    )
    service = AgentService(
        workers=[worker],
        registry=registry,
        counters=counters,
        accepting=lambda: True,
        status=control_pb2.AgentStatus,
        puller=puller,
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    add_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    endpoint = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            yield agent_pb2_grpc.AgentStub(channel), endpoint, registry, counters  # type: ignore[no-untyped-call]
    finally:
        await server.stop(None)
        await peers.close()
        worker.shutdown()


def source(agent_id: str, buffer_id: str, start: int, stop: int, endpoint: str = "") -> agent_pb2.PullSource:
    return agent_pb2.PullSource(
        agent_id=agent_id, buffer_id=buffer_id, start=start, stop=stop, endpoint=endpoint
    )


def request(
    output: str, *sources: agent_pb2.PullSource, dtype: object, shape: tuple[int, ...], **fields: object
) -> agent_pb2.PullRequest:
    return agent_pb2.PullRequest(
        output=output,
        sources=list(sources),
        expect=meta_of(np.dtype(dtype), shape),
        session=SESSION,
        **fields,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("backends", ["numpy", "device"])
def test_concatenate_reshape_and_sum_from_a_peer_and_oneself(backends: str) -> None:
    a_data = np.arange(40, dtype=np.float32).reshape(10, 4)
    b_data = -np.arange(24, dtype=np.float32).reshape(6, 4)

    def backend() -> ArrayBackend:
        return DeviceLikeBackend() if backends == "device" else NumpyBackend()

    async def body() -> None:
        async with (
            pulling_agent("a", backend()) as (a, a_endpoint, _, _),
            pulling_agent("b", backend()) as (b, _, b_registry, b_counters),
        ):
            await upload(a, "x", a_data)
            await upload(b, "y", b_data)
            # rows 2-7 of a's x, then rows 1-4 of b's own y
            reply = await b.Pull(
                request(
                    "joined",
                    source("a", "x", 2, 7, a_endpoint),
                    source("b", "y", 1, 4),
                    dtype=np.float32,
                    shape=(8, 4),
                ),
                timeout=30,
            )
            assert reply.nbytes == 8 * 4 * 4
            assert reply.bytes_pulled == 5 * 4 * 4
            np.testing.assert_array_equal(
                await download(b, "joined"), np.concatenate([a_data[2:7], b_data[1:4]])
            )
            # along axis 1, then reshaped
            reply = await b.Pull(
                request(
                    "wide",
                    source("a", "x", 0, 6, a_endpoint),
                    source("b", "y", 0, 6),
                    dtype=np.float32,
                    shape=(4, 12),
                    axis=1,
                ),
                timeout=30,
            )
            wide = np.concatenate([a_data[:6], b_data], axis=1).reshape(4, 12)
            np.testing.assert_array_equal(await download(b, "wide"), wide)
            # a sum of a peer's rows and one's own
            await b.Pull(
                request(
                    "total",
                    source("a", "x", 4, 10, a_endpoint),
                    source("b", "y", 0, 6),
                    dtype=np.float32,
                    shape=(6, 4),
                    combine="sum",
                ),
                timeout=30,
            )
            np.testing.assert_array_equal(await download(b, "total"), a_data[4:10] + b_data)
            # a pull of one's own rows is a copy: the new buffer does not alias the old
            await b.Pull(request("copy", source("b", "y", 0, 6), dtype=np.float32, shape=(6, 4)), timeout=30)
            assert b_registry.get("copy").array is not b_registry.get("y").array
            assert b_counters.bytes_received >= 2 * 5 * 4 * 4

    run(body())


def test_download_of_a_row_range() -> None:
    data = np.arange(30, dtype=np.int64).reshape(10, 3)

    async def body() -> None:
        async with pulling_agent("a", DeviceLikeBackend()) as (a, _, _, _):
            await upload(a, "x", data)
            call = a.Download(
                agent_pb2.DownloadRequest(buffer_id="x", has_rows=True, start=3, stop=5), timeout=30
            )
            messages = [m async for m in call]
            assert list(messages[0].meta.shape) == [2, 3]
            got = np.frombuffer(b"".join(m.chunk for m in messages[1:]), np.int64).reshape(2, 3)
            np.testing.assert_array_equal(got, data[3:5])
            bad = a.Download(
                agent_pb2.DownloadRequest(buffer_id="x", has_rows=True, start=8, stop=11), timeout=30
            )
            code, kind, _ = await refused(_drain(bad))
            assert (code, kind) == (grpc.StatusCode.INVALID_ARGUMENT, "bad-request")

    run(body())


async def _drain(call: object) -> None:
    async for _ in call:  # type: ignore[attr-defined]
        pass


def test_refused_pulls_keep_nothing() -> None:
    data = np.arange(12, dtype=np.float64).reshape(4, 3)

    async def body() -> None:
        async with (
            pulling_agent("a", NumpyBackend()) as (a, a_endpoint, _, _),
            pulling_agent("b", NumpyBackend()) as (b, _, b_registry, _),
        ):
            await upload(a, "x", data)
            await upload(b, "mine", data)
            held = len(b_registry), b_registry.usage(0)
            cases = {
                "no sources": (request("out", dtype=np.float64, shape=(0, 3)), "bad-request"),
                "unknown combine": (
                    request("out", source("b", "mine", 0, 4), dtype=np.float64, shape=(4, 3), combine="max"),
                    "bad-request",
                ),
                "another dtype": (
                    request("out", source("a", "x", 0, 4, a_endpoint), dtype=np.float32, shape=(4, 3)),
                    "bad-request",
                ),
                "another shape": (
                    request("out", source("a", "x", 0, 4, a_endpoint), dtype=np.float64, shape=(5, 3)),
                    "bad-request",
                ),
                "rows past the end": (
                    request("out", source("a", "x", 2, 9, a_endpoint), dtype=np.float64, shape=(7, 3)),
                    "bad-request",
                ),
                "a missing buffer": (
                    request("out", source("a", "nope", 0, 4, a_endpoint), dtype=np.float64, shape=(4, 3)),
                    "buffer-not-found",
                ),
                "a missing local buffer": (
                    request("out", source("b", "nope", 0, 4), dtype=np.float64, shape=(4, 3)),
                    "buffer-not-found",
                ),
                "no endpoint for a peer": (
                    request("out", source("a", "x", 0, 4), dtype=np.float64, shape=(4, 3)),
                    "bad-request",
                ),
                "an output that exists": (
                    request("mine", source("a", "x", 0, 4, a_endpoint), dtype=np.float64, shape=(4, 3)),
                    "buffer-exists",
                ),
                "too large for the worker": (
                    request("out", source("a", "x", 0, 4, a_endpoint), dtype=np.float64, shape=(1 << 24, 3)),
                    "out-of-memory",
                ),
            }
            for name, (pull, kind) in cases.items():
                _, got, details = await refused(b.Pull(pull, timeout=30))
                assert got == kind, (name, got, details)
            assert (len(b_registry), b_registry.usage(0)) == held

    run(body())


def test_a_pull_from_nobody_fails_naming_the_agent_after_bounded_tries() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"

    async def body() -> None:
        async with pulling_agent("b", NumpyBackend()) as (b, _, b_registry, _):
            code, kind, details = await refused(
                b.Pull(
                    request("out", source("ghost", "x", 0, 4, dead), dtype=np.float64, shape=(4, 3)),
                    timeout=30,
                )
            )
            assert (code, kind) == (grpc.StatusCode.UNAVAILABLE, "peer-unavailable")
            assert f"pull from agent ghost at {dead} failed after 3 tries" in details
            assert len(b_registry) == 0

    run(body(), timeout=30)
