"""Moved buffers on the agent that held them: forwards in the registry, the calls an inventory waits for,
the owner's pause answer. Pure or in-process, no network."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gpupool._proto.v1 import agent_pb2
from gpupool.agent.buffers import BufferRegistry, Forward
from gpupool.agent.control import PAUSE_WAIT, _parse_request
from gpupool.agent.evacuation import CallsInFlight, Evacuation
from gpupool.agent.main import pause_lines
from gpupool.protocol.errors import RpcRefusal

HOME = Forward("s", "agent-b", "10.0.0.2:50052", 1)


def holding(*ids: str, session: str = "s") -> BufferRegistry:
    registry = BufferRegistry([1000])
    for buffer_id in ids:
        registry.commit(
            registry.reserve(worker=0, buffer_id=buffer_id, nbytes=8, session=session), np.zeros(1)
        )
    return registry


def refusal(call: object) -> RpcRefusal:
    assert callable(call)
    with pytest.raises(RpcRefusal) as caught:
        call()
    return caught.value


def test_a_forwarded_buffer_is_freed_and_every_look_up_names_its_new_home() -> None:
    registry = holding("s/a", "s/b")
    forwarded, missing = registry.forward([("s/a", HOME), ("s/gone", HOME)])
    assert [b.buffer_id for b in forwarded] == ["s/a"]
    assert missing == ["s/gone"]
    assert registry.usage(0).used == 8
    assert len(registry) == 1
    moved = refusal(lambda: registry.get("s/a"))
    assert (moved.kind, moved.buffer_id, moved.extra) == (
        "buffer-moved",
        "s/a",
        {"moved-to": "agent-b|10.0.0.2:50052|1"},
    )
    assert refusal(lambda: registry.check_not_moved(["s/b", "s/a"])).kind == "buffer-moved"
    registry.check_not_moved(["s/b", "unknown"])  # nothing moved among them
    assert refusal(lambda: registry.get("s/gone")).kind == "buffer-not-found"  # never here: not forwarded


def test_a_buffer_moving_back_replaces_its_forward() -> None:
    registry = holding("s/a")
    registry.forward([("s/a", HOME)])
    reservation = registry.reserve(worker=0, buffer_id="s/a", nbytes=8, session="s")
    assert refusal(lambda: registry.get("s/a")).kind == "buffer-moved"
    registry.commit(reservation, np.ones(1))
    assert registry.get("s/a").array[0] == 1


def test_forwards_go_with_their_session() -> None:
    registry = holding("s/a", "t/b")
    registry.forward([("s/a", HOME), ("t/b", Forward("t", "agent-c", "h:1", 0))])
    assert registry.drop_forwards("s") == 1
    assert refusal(lambda: registry.get("s/a")).kind == "buffer-not-found"
    assert refusal(lambda: registry.get("t/b")).kind == "buffer-moved"


def test_an_inventory_waits_for_the_calls_before_it_not_after() -> None:
    async def body() -> None:
        calls = CallsInFlight()
        release = asyncio.Event()

        async def handler(request: int, context: object) -> int:
            await release.wait()
            return request

        tracked = calls.track(handler)
        early = asyncio.create_task(tracked(1, None))
        await asyncio.sleep(0)
        assert len(calls) == 1
        assert not await calls.settle(0.05)  # still running
        settling = asyncio.create_task(calls.settle(5))
        await asyncio.sleep(0)
        late = asyncio.create_task(tracked(2, None))  # came after: not waited for
        await asyncio.sleep(0)
        release.set()
        assert await early == 1
        assert await settling
        await late

    asyncio.run(body())


def test_the_summary_a_pause_waits_for() -> None:
    async def body() -> None:
        registry = holding("s/a", "s/b")
        evacuation = Evacuation(registry=registry, calls=CallsInFlight())
        evacuation.begin()
        inventory = await evacuation.inventory(agent_pb2.InventoryRequest(settle_seconds=1))
        assert sorted(b.buffer_id for b in inventory.buffers) == ["s/a", "s/b"]
        assert inventory.settled
        home = agent_pb2.BufferHome(session="s", buffer_id="s/a", agent_id="b", endpoint="h:1", worker=0)
        reply = await evacuation.forward(agent_pb2.ForwardRequest(moves=[home]))
        assert (reply.forwarded, reply.bytes_forwarded) == (1, 8)
        assert not (await evacuation.wait(0.01)).finished
        await evacuation.forward(agent_pb2.ForwardRequest(final=True, left=1, left_bytes=8, note="no room"))
        summary = await evacuation.wait(1)
        assert summary.finished
        assert (summary.left, summary.note) == (1, "no room")
        answer = {"state": "draining", "held": 1, **summary.as_dict()}
        assert pause_lines(answer) == [
            "moved 1 buffer(s), 8 bytes, of session s to agent b (h:1) worker 0",
            "1 buffer(s), 8 bytes, stay here: no room",
        ]
        assert pause_lines({"state": "draining", "held": 0, "moved": [], "finished": False}) == []

    asyncio.run(body())


def test_the_control_socket_reads_a_pause_with_its_wait() -> None:
    assert _parse_request("pause") == ("pause", PAUSE_WAIT)
    assert _parse_request("pause 30") == ("pause", 30.0)
    assert _parse_request("state") == ("state", PAUSE_WAIT)
    for bad in ("pause soon", "pause -1", "resume 3", "stop"):
        with pytest.raises(ValueError, match=r"unknown request|a pause waits"):
            _parse_request(bad)
