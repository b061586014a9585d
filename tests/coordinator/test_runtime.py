"""The Coordinator component in-process: short deadlines, clean shutdown, a missing broker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gpupool._config import Timeouts, parse_broker_url
from gpupool._errors import ConnectError, DeadlineExceeded
from gpupool._proto.v1 import coordinator_pb2 as pb
from gpupool.broker import free_port, start_broker
from gpupool.coordinator import Coordinator
from gpupool.protocol.topics import Topics

from .conftest import admin_token
from .simagent import CORDONED, OFFLINE, READY, SimulatedAgent
from .support import CoordinatorClient, eventually, run


def test_an_unconfirmed_command_is_refused_once_the_deadline_passes(
    system_broker_url: str, topic_prefix: str, tmp_path: Path
):
    token = admin_token(tmp_path)
    topics = Topics(topic_prefix)

    async def body() -> None:
        async with Coordinator(
            broker=parse_broker_url(system_broker_url),
            listen="127.0.0.1:0",
            topics=topics,
            timeouts=Timeouts(command=0.5),
            state_dir=tmp_path,
            allow_unenrolled=True,
        ) as coordinator:
            runner = asyncio.create_task(coordinator.run())
            await coordinator.wait_connected()
            async with (
                CoordinatorClient(coordinator.address, token) as client,
                SimulatedAgent(system_broker_url, topics, "deaf00000001", answer_commands=False) as agent,
            ):
                await eventually(lambda: _listed(client), within=5.0, what="the agent listed")
                started = time.monotonic()
                with pytest.raises(
                    DeadlineExceeded, match=r"was sent, but the agent's status still shows ready"
                ):
                    await client.call(client.admin.Cordon, pb.AdminRequest(agent_id="deaf00000001"))
                assert 0.5 <= time.monotonic() - started < 3.0
                assert len(agent.commands) == 1
                # Confirmation that comes late still lands in the registry.
                await agent.publish_status(state=CORDONED)
                await eventually(lambda: _state(client, CORDONED), within=2.0, what="cordoned at last")
            await coordinator.close()
            async with asyncio.timeout(5):
                await runner

    run(body())


async def _listed(client: CoordinatorClient) -> bool:
    return "deaf00000001" in await client.agents()


async def _state(client: CoordinatorClient, state: int) -> bool:
    record = (await client.agents()).get("deaf00000001")
    return record is not None and record.status.state == state


def test_without_a_broker_the_coordinator_still_serves_and_close_ends_run(topic_prefix: str, tmp_path: Path):
    token = admin_token(tmp_path)

    async def body() -> None:
        broker = parse_broker_url(f"mqtt://127.0.0.1:{free_port()}")
        async with Coordinator(
            broker=broker,
            listen="127.0.0.1:0",
            topics=Topics(topic_prefix),
            timeouts=Timeouts(connect=0.5),
            state_dir=tmp_path,
        ) as coordinator:
            runner = asyncio.create_task(coordinator.run())
            with pytest.raises(ConnectError):
                await coordinator.wait_connected()
            async with CoordinatorClient(coordinator.address, token) as client:
                assert await client.agents() == {}
                # ... but says that its registry is blind, rather than showing an empty, healthy pool.
                reply = await client.call(client.coordinator.ListAgents, pb.ListAgentsRequest())
                assert not reply.broker_connected
                assert "cannot reach its MQTT broker" in reply.broker_detail
            await coordinator.close()
            async with asyncio.timeout(5):
                await runner

    run(body())


def test_a_busy_address_is_a_connect_error(topic_prefix: str, tmp_path: Path):
    async def body() -> None:
        broker = parse_broker_url("mqtt://127.0.0.1:1")
        async with Coordinator(
            broker=broker, listen="127.0.0.1:0", topics=Topics(topic_prefix), state_dir=tmp_path / "a"
        ) as first:
            with pytest.raises(ConnectError, match="cannot listen"):
                async with Coordinator(
                    broker=broker, listen=first.address, topics=Topics(topic_prefix), state_dir=tmp_path / "b"
                ):
                    pass

    run(body())


def test_after_a_broker_restart_agents_not_heard_from_again_go_offline(topic_prefix: str, tmp_path: Path):
    topics = Topics(topic_prefix)
    token = admin_token(tmp_path)
    port = free_port()
    brokers = [start_broker("auto", port=port)]
    url = brokers[0].ready["url"]

    async def states(client: CoordinatorClient) -> dict[str, int]:
        return {k: r.status.state for k, r in (await client.agents(include_offline=True)).items()}

    async def body() -> None:
        async with Coordinator(
            broker=parse_broker_url(url),
            listen="127.0.0.1:0",
            topics=topics,
            timeouts=Timeouts(connect=0.5, heartbeat=0.2),
            state_dir=tmp_path,
            allow_unenrolled=True,
        ) as coordinator:
            runner = asyncio.create_task(coordinator.run())
            await coordinator.wait_connected()
            async with (
                CoordinatorClient(coordinator.address, token) as client,
                SimulatedAgent(url, topics, "live00000001"),
                SimulatedAgent(url, topics, "dead00000001"),
            ):
                both_ready = {"live00000001": READY, "dead00000001": READY}

                async def ready() -> bool:
                    return await states(client) == both_ready

                await eventually(ready, within=5.0, what="both agents ready")
                # The broker restarts and forgets everything; only the live agent comes back.
                await asyncio.to_thread(brokers[0].kill)
                brokers.append(await asyncio.to_thread(start_broker, "auto", port=port))
                async with SimulatedAgent(url, topics, "live00000001"):
                    expected = {"live00000001": READY, "dead00000001": OFFLINE}

                    async def settled() -> bool:
                        return await states(client) == expected

                    await eventually(settled, within=10.0, what="the dead agent offline, the live one ready")
                    record = (await client.agents(include_offline=True))["dead00000001"]
                    assert "not heard from" in record.status.note
            await coordinator.close()
            async with asyncio.timeout(5):
                await runner

    try:
        run(body())
    finally:
        for broker in brokers:
            broker.stop()
