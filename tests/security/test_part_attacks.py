"""Attacks on uploads in parts (``UploadHeader.has_rows``: several streams fill one buffer), by a client of
the pool with genuine credentials of its own: a real secure pool of one enrolled agent on the system
broker, raw ``UploadRaw`` streams as an attacker would send them.

What must hold: a part's range lies inside the buffer, is not empty and overlaps no other part's; a part
agrees with the first part; a buffer already kept takes no parts; another session's upload in progress is
unnameable; any refused, failed or killed part drops the whole upload, and what arrived goes with it (the
memory is free again for an upload of three quarters of the agent's limit, the id for a new upload).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from gpupool._proto.v1 import agent_pb2, coordinator_pb2
from gpupool.local import LocalPool
from gpupool.protocol.codec import iter_chunks, meta_of
from gpupool.protocol.rawstream import ACCEPTED

from .attackers import AgentCalls, CoordinatorCalls, create_token, refused, run

MEMORY = 32 << 20
#: Three quarters of the agent's memory: a second one fits only if the first was let go.
ROWS = MEMORY * 3 // 4 // (1024 * 8)
BAD = grpc.StatusCode.INVALID_ARGUMENT
#: How a part still writing hears that another part was refused: the refusal, or, when the agent's answer
#: cuts its writes off, INTERNAL from gRPC itself (grpc/grpc#36066; gpupool's client cancels such parts).
SIBLING = (BAD, grpc.StatusCode.INTERNAL)


@pytest.fixture(scope="module")
def local(system_broker_url: str) -> Iterator[LocalPool]:
    with LocalPool(
        agents=1,
        broker_url=system_broker_url,
        port=0,
        topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
        backend="numpy",
        memory_limit=str(MEMORY),
    ) as pool:
        yield pool


@dataclass
class Client:
    session: str
    capability: str


@pytest.fixture
def clients(local: LocalPool) -> Iterator[tuple[Client, Client]]:
    """Two clients, each with its own token, session and capability on the agent."""
    assert local.credentials is not None
    agent_id = str(local.agents[0].ready["agent_id"])
    made = []
    for name in ("alice", "mallory"):
        token, _ = create_token(
            local.credentials.coordinator_dir, role="client", name=f"{name}-{uuid.uuid4().hex[:6]}"
        )
        calls = CoordinatorCalls(local.coordinator_address, token)
        session = calls.connect().session
        made.append((calls, Client(session, calls.grant(session, [agent_id])[agent_id])))
    yield made[0][1], made[1][1]
    for calls, client in made:
        calls.call("Disconnect", coordinator_pb2.DisconnectRequest(session=client.session))
        calls.close()


def agent_calls(local: LocalPool, client: Client) -> AgentCalls:
    assert local.credentials is not None
    child = local.agents[0]
    return AgentCalls(
        str(child.ready["endpoint"]),
        str(child.ready["agent_id"]),
        local.credentials.ca_path.read_bytes(),
        client.capability,
    )


def whole() -> np.ndarray:
    return np.arange(ROWS * 1024, dtype=np.float64).reshape(ROWS, 1024)


async def send_part(
    agent: AgentCalls,
    buffer_id: str,
    array: np.ndarray,
    start: int,
    stop: int,
    *,
    session: str = "",
    data: np.ndarray | None = None,
    sent_half: asyncio.Event | None = None,
    go_on: asyncio.Event | None = None,
) -> agent_pb2.UploadReply:
    """One part of ``array`` (rows ``[start, stop)``, or ``data`` instead of them) as ``buffer_id``.

    With ``sent_half``, set it after half the part's bytes and wait for ``go_on`` before the rest.
    """
    header = agent_pb2.UploadHeader(
        buffer_id=buffer_id,
        meta=meta_of(array.dtype, array.shape),
        session=session,
        has_rows=True,
        start=start,
        stop=stop,
    )
    body = array[start:stop] if data is None else data
    chunks = [bytes(chunk) for chunk in iter_chunks(body)]
    call = agent.upload_raw_call(None, timeout=30, metadata=agent.metadata)
    try:
        await call.write(header.SerializeToString())
        if ACCEPTED not in tuple(await call.initial_metadata() or ()):
            await call
        for index, chunk in enumerate(chunks):
            if sent_half is not None and index == len(chunks) // 2:
                sent_half.set()
                assert go_on is not None
                await go_on.wait()
            await call.write(chunk)
        await call.done_writing()
    except asyncio.InvalidStateError:
        pass
    except asyncio.CancelledError:
        call.cancel()  # as a client killed midway: its connection's end cancels the call
        raise
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.INTERNAL:
            raise
        await call
        raise
    return agent_pb2.UploadReply.FromString(await call)


async def fits_again(agent: AgentCalls, buffer_id: str) -> None:
    """The dropped upload left nothing: the same id, whole, at three quarters of the memory, goes in."""
    array = whole()
    await agent.upload_raw(buffer_id, array)
    np.testing.assert_array_equal(await agent.download_raw(buffer_id), array)
    await agent.free(agent_pb2.FreeRequest(buffer_ids=[buffer_id]))


def test_parts_fill_one_buffer(local: LocalPool, clients: tuple[Client, Client]) -> None:
    alice, _ = clients
    array = whole()

    async def body() -> None:
        async with agent_calls(local, alice) as agent:
            cuts = [0, 1, ROWS // 3, ROWS - 1, ROWS]
            replies = await asyncio.gather(
                *(send_part(agent, "b", array, lo, hi) for lo, hi in itertools.pairwise(cuts))
            )
            assert sum(r.nbytes for r in replies) == array.nbytes
            np.testing.assert_array_equal(await agent.download_raw("b"), array)
            await agent.free(agent_pb2.FreeRequest(buffer_ids=["b"]))

    run(body())


@pytest.mark.parametrize(
    ("first", "second"),
    [((0, 10), (5, ROWS)), ((0, ROWS), (ROWS - 1, ROWS)), ((3, 9), (3, 9)), ((0, 4), (2, 3))],
    ids=["overlap", "inside-a-whole", "same-range", "nested"],
)
def test_overlapping_parts_drop_the_upload(
    local: LocalPool, clients: tuple[Client, Client], first: tuple[int, int], second: tuple[int, int]
) -> None:
    alice, _ = clients
    array = whole()

    async def body() -> None:
        async with agent_calls(local, alice) as agent:
            sent_half, go_on = asyncio.Event(), asyncio.Event()
            holder = asyncio.ensure_future(
                send_part(agent, "o", array, *first, sent_half=sent_half, go_on=go_on)
            )
            await asyncio.wait_for(sent_half.wait(), 10)
            refusal = await refused(send_part(agent, "o", array, *second))
            assert (refusal.code, refusal.kind) == (BAD, "bad-request"), refusal
            assert "overlap" in refusal.details
            go_on.set()
            refusal = await refused(holder)  # the part already under way is dropped with it
            assert refusal.code in SIBLING, refusal
            await fits_again(agent, "o")

    run(body())


@pytest.mark.parametrize(
    "rows", [(0, ROWS + 1), (ROWS, ROWS + 1), (-1, 3), (5, 5), (7, 3), (1 << 62, (1 << 62) + 1)]
)
def test_a_range_outside_the_buffer_is_refused(
    local: LocalPool, clients: tuple[Client, Client], rows: tuple[int, int]
) -> None:
    alice, _ = clients
    array = np.zeros((ROWS, 1024))

    async def body() -> None:
        async with agent_calls(local, alice) as agent:
            refusal = await refused(send_part(agent, "r", array, *rows, data=np.zeros((1, 1024))))
            assert (refusal.code, refusal.kind) == (BAD, "bad-request"), refusal
            assert f"[{rows[0]}, {rows[1]})" in refusal.details
            await fits_again(agent, "r")

    run(body())


def test_a_part_that_disagrees_with_the_first_drops_the_upload(
    local: LocalPool, clients: tuple[Client, Client]
) -> None:
    alice, _ = clients
    array = whole()

    async def body() -> None:
        async with agent_calls(local, alice) as agent:
            sent_half, go_on = asyncio.Event(), asyncio.Event()
            holder = asyncio.ensure_future(
                send_part(agent, "d", array, 0, ROWS // 2, sent_half=sent_half, go_on=go_on)
            )
            await asyncio.wait_for(sent_half.wait(), 10)
            other = array.astype(np.float32)  # same shape, another dtype
            refusal = await refused(send_part(agent, "d", other, ROWS // 2, ROWS))
            assert (refusal.code, refusal.kind) == (BAD, "bad-request"), refusal
            assert "disagrees" in refusal.details
            go_on.set()
            assert (await refused(holder)).code in SIBLING
            await fits_again(agent, "d")

    run(body())


def test_a_finished_buffer_takes_no_parts(local: LocalPool, clients: tuple[Client, Client]) -> None:
    alice, _ = clients
    array = np.arange(64 * 1024, dtype=np.float64).reshape(64, 1024)

    async def body() -> None:
        async with agent_calls(local, alice) as agent:
            await asyncio.gather(send_part(agent, "f", array, 0, 32), send_part(agent, "f", array, 32, 64))
            for rows in ((0, 32), (32, 64), (0, 64)):
                refusal = await refused(
                    send_part(agent, "f", array, *rows, data=np.full((rows[1] - rows[0], 1024), 666.0))
                )
                assert (refusal.code, refusal.kind) == (grpc.StatusCode.ALREADY_EXISTS, "buffer-exists"), (
                    refusal
                )
            np.testing.assert_array_equal(await agent.download_raw("f"), array)
            await agent.free(agent_pb2.FreeRequest(buffer_ids=["f"]))

    run(body())


def test_another_sessions_upload_in_progress_is_unnameable(
    local: LocalPool, clients: tuple[Client, Client]
) -> None:
    alice, mallory = clients
    array = np.arange(64 * 1024, dtype=np.float64).reshape(64, 1024)
    forged = np.full((32, 1024), 666.0)

    async def body() -> None:
        async with agent_calls(local, alice) as mine, agent_calls(local, mallory) as theirs:
            sent_half, go_on = asyncio.Event(), asyncio.Event()
            first = asyncio.ensure_future(
                send_part(mine, "v", array, 0, 32, sent_half=sent_half, go_on=go_on)
            )
            await asyncio.wait_for(sent_half.wait(), 10)
            # naming alice's session outright
            refusal = await refused(send_part(theirs, "v", array, 32, 64, session=alice.session, data=forged))
            assert refusal.code == grpc.StatusCode.PERMISSION_DENIED, refusal
            # naming the buffer by alice's id, or by the agent's qualified name for it: mallory's own upload
            for name in ("v", f"{alice.session}/v"):
                waiting = asyncio.ensure_future(send_part(theirs, name, array, 32, 64, data=forged))
                await asyncio.sleep(0.3)
                assert not waiting.done()  # waits for its own rows [0, 32), never alice's
                waiting.cancel()
            go_on.set()
            second = await send_part(mine, "v", array, 32, 64)
            assert (await first).nbytes + second.nbytes == array.nbytes
            np.testing.assert_array_equal(await mine.download_raw("v"), array)
            await mine.free(agent_pb2.FreeRequest(buffer_ids=["v"]))

    run(body())


def test_a_part_killed_midway_drops_the_upload_and_what_arrived(
    local: LocalPool, clients: tuple[Client, Client]
) -> None:
    alice, _ = clients
    array = whole()

    async def body() -> None:
        async with agent_calls(local, alice) as agent:
            arrived = asyncio.ensure_future(
                send_part(agent, "k", array, 0, 1)
            )  # in full, waiting for the rest
            sent_half, go_on = asyncio.Event(), asyncio.Event()
            killed = asyncio.ensure_future(
                send_part(agent, "k", array, 1, ROWS, sent_half=sent_half, go_on=go_on)
            )
            await asyncio.wait_for(sent_half.wait(), 10)
            killed.cancel()
            refusal = await refused(arrived)  # the part that had arrived is refused, not kept
            assert (refusal.code, refusal.kind) == (BAD, "bad-request"), refusal
            async with asyncio.timeout(10):
                while True:  # the agent sees the cancel soon after
                    try:
                        await fits_again(agent, "k")
                        break
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() not in (
                            grpc.StatusCode.ALREADY_EXISTS,
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                        ):
                            raise
                        await asyncio.sleep(0.05)

    run(body())
