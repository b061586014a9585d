"""The coordinator against each broker kind: registration, last wills, restarts, malformed payloads.

The coordinator runs as a subprocess; agents are simulated with real aiomqtt clients (one of them in a
subprocess of its own, so that killing it drops the connection the way a crash does).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import aiomqtt

from gpupool._config import parse_broker_url
from gpupool._process import spawn
from gpupool._proto.v1 import control_pb2
from gpupool.protocol.codec import encode_json
from gpupool.protocol.topics import Topics

from .conftest import StartCoordinator
from .simagent import CORDONED, OFFLINE, READY, SimulatedAgent, clear_retained
from .support import CoordinatorClient, eventually, run


def test_an_agent_is_listed_within_two_seconds_of_its_status(
    broker_url: str, topic_prefix: str, start_coordinator: StartCoordinator
):
    coordinator = start_coordinator(broker_url, topic_prefix)
    topics = Topics(topic_prefix)

    async def body() -> None:
        async with CoordinatorClient.of(coordinator) as client:
            assert await client.agents() == {}
            async with SimulatedAgent(
                broker_url, topics, "a1b2c3d4e5f6", name="rig-1", workers=[(4000, 1000)]
            ) as agent:
                sent = time.monotonic()
                record = await eventually(
                    lambda: _get(client, "a1b2c3d4e5f6"), within=2.0, what="the agent in ListAgents"
                )
                assert time.monotonic() - sent < 2.0
                assert record.status.name == "rig-1"
                assert record.status.state == READY
                assert record.status.workers[0].memory_limit == 4000
                assert record.seconds_since_seen < 2.0
                await agent.publish_telemetry([2500])
                record = await eventually(
                    lambda: _telemetry_used(client, "a1b2c3d4e5f6", 2500), within=2.0, what="telemetry"
                )

    run(body())


async def _get(client: CoordinatorClient, agent_id: str, include_offline: bool = False):
    return (await client.agents(include_offline)).get(agent_id)


async def _telemetry_used(client: CoordinatorClient, agent_id: str, used: int):
    record = await _get(client, agent_id)
    if (
        record is not None
        and record.HasField("telemetry")
        and record.telemetry.workers[0].memory_used == used
    ):
        return record
    return None


def test_a_dropped_agent_is_shown_offline_by_its_last_will(
    broker_url: str, topic_prefix: str, start_coordinator: StartCoordinator
):
    coordinator = start_coordinator(broker_url, topic_prefix)
    script = Path(__file__).with_name("simagent.py")
    holder = spawn(
        "simagent",
        [
            sys.executable,
            str(script),
            "--broker",
            broker_url,
            "--prefix",
            topic_prefix,
            "--id",
            "dead0000beef",
        ],
        timeout=30,
    )
    try:

        async def body() -> None:
            async with CoordinatorClient.of(coordinator) as client:
                await eventually(lambda: _get(client, "dead0000beef"), within=5.0, what="the agent listed")
                holder.kill()  # SIGKILL: the socket closes with no MQTT DISCONNECT, so the will is sent

                async def offline():
                    record = await _get(client, "dead0000beef", include_offline=True)
                    return record is not None and record.status.state == OFFLINE

                await eventually(offline, within=5.0, what="the agent offline")
                assert "dead0000beef" not in await client.agents()  # offline agents only on request

        run(body())
    finally:
        holder.kill()
        run(clear_retained(broker_url, Topics(topic_prefix), ["dead0000beef"]))


def test_a_restarted_coordinator_rebuilds_its_registry_from_retained_status(
    broker_url: str, topic_prefix: str, start_coordinator: StartCoordinator
):
    topics = Topics(topic_prefix)

    async def body() -> None:
        async with SimulatedAgent(broker_url, topics, "ab0000000001", name="kept") as agent:
            await agent.publish_status(state=CORDONED)
            first = start_coordinator(broker_url, topic_prefix)
            async with CoordinatorClient.of(first) as client:
                await eventually(lambda: _get(client, "ab0000000001"), within=5.0, what="listed by the first")
            await asyncio.to_thread(first.stop)
            # The agent says nothing more: only its retained status can tell the new coordinator.
            second = start_coordinator(broker_url, topic_prefix)
            async with CoordinatorClient.of(second) as client:
                record = await eventually(
                    lambda: _get(client, "ab0000000001"), within=5.0, what="listed again"
                )
                assert (record.status.name, record.status.state) == ("kept", CORDONED)

    run(body())


def test_malformed_payloads_are_skipped_and_the_coordinator_keeps_serving(
    broker_url: str, topic_prefix: str, start_coordinator: StartCoordinator
):
    topics = Topics(topic_prefix)
    bad_version = control_pb2.AgentStatus(schema_version=99, agent_id="badversion01", state=READY)
    wrong_id = control_pb2.AgentStatus(agent_id="someoneelse1", endpoint="h:1", state=READY)
    garbage = {
        topics.status("notjson00001"): b"{this is not json",
        topics.status("badversion01"): encode_json(bad_version),
        topics.status("wrongid00001"): encode_json(wrong_id),
        topics.status("wrongtype001"): b'{"agentId": "wrongtype001", "workers": "many"}',
        topics.telemetry("notjson00001"): b"\xff\xfe",
        f"{topic_prefix}/v1/agents/x/y/status": b"{}",
    }

    async def publish_garbage(retain: bool) -> None:
        broker = parse_broker_url(broker_url)
        async with asyncio.timeout(10), aiomqtt.Client(broker.host, broker.port) as mqtt:
            for topic, payload in garbage.items():
                await mqtt.publish(topic, payload, qos=1, retain=retain and "/status" in topic)

    async def body() -> None:
        await publish_garbage(retain=True)  # waiting for the coordinator when it starts
        coordinator = start_coordinator(broker_url, topic_prefix)
        try:
            async with CoordinatorClient.of(coordinator) as client:
                await publish_garbage(retain=False)  # and again while it runs
                async with SimulatedAgent(broker_url, topics, "good00000001"):
                    await eventually(lambda: _get(client, "good00000001"), within=5.0, what="the good agent")
                    listed = await client.agents(include_offline=True)
                    assert set(listed) == {"good00000001"}
                    assert coordinator.alive()
        finally:
            await clear_retained(
                broker_url, topics, ["notjson00001", "badversion01", "wrongid00001", "wrongtype001"]
            )

    run(body())
