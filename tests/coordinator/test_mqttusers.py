"""Agents' MQTT users through the dynamic-security plugin: the commands, then a real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from gpupool._config import Timeouts
from gpupool._errors import DeadlineExceeded, ProtocolError, UsageError
from gpupool._process import Child
from gpupool.broker import secure, start_broker
from gpupool.coordinator import mqttusers
from gpupool.coordinator.mqttusers import CONTROL_RESPONSE_TOPIC, CONTROL_TOPIC, MqttUsers, agent_acls
from gpupool.protocol.topics import Topics

# ---------------------------------------------------------------- the commands, against a scripted plugin


@dataclass
class ScriptedPlugin:
    """Answers each command as the plugin would, with the error ``errors`` gives its command name."""

    errors: dict[str, str] = field(default_factory=dict)
    silent: bool = False
    batches: list[list[dict[str, Any]]] = field(default_factory=list)
    users: MqttUsers | None = None

    async def publish(self, topic: str, payload: bytes) -> None:
        assert topic == CONTROL_TOPIC
        commands = json.loads(payload)["commands"]
        self.batches.append(commands)
        if self.silent or self.users is None:
            return
        responses = [
            {"command": c["command"], "correlationData": c["correlationData"]}
            | ({"error": self.errors[c["command"]]} if c["command"] in self.errors else {})
            for c in commands
        ]
        # Another administrator's answer, and one we cannot read, arrive too; both are ignored.
        self.users.handle_response(json.dumps({"responses": [{"command": "listClients"}]}).encode())
        self.users.handle_response(b"not json")
        self.users.handle_response(json.dumps({"responses": responses}).encode())


def scripted(**kwargs: Any) -> tuple[MqttUsers, ScriptedPlugin]:
    plugin = ScriptedPlugin(**kwargs)
    plugin.users = MqttUsers(publish=plugin.publish, topics=Topics("p"), timeouts=Timeouts(rpc=0.3))
    return plugin.users, plugin


def names(batch: list[dict[str, Any]]) -> list[str]:
    return [command["command"] for command in batch]


def test_constants_agree_with_the_broker() -> None:
    assert mqttusers.CONTROL_TOPIC == secure.CONTROL_TOPIC
    assert mqttusers.CONTROL_RESPONSE_TOPIC == secure.CONTROL_RESPONSE_TOPIC
    assert mqttusers.ADMIN_USERNAME == secure.ADMIN_USERNAME


def test_an_agent_may_publish_its_status_and_telemetry_and_read_its_commands() -> None:
    acls = {(a["acltype"], a["topic"]) for a in agent_acls(Topics("p"), "a1") if a["allow"]}
    assert acls == {
        ("publishClientSend", "p/v1/agents/a1/status"),
        ("publishClientSend", "p/v1/agents/a1/telemetry"),
        ("subscribePattern", "p/v1/agents/a1/commands"),
        ("publishClientReceive", "p/v1/agents/a1/commands"),
    }


def test_a_new_agent_takes_one_batch() -> None:
    users, plugin = scripted()
    asyncio.run(users.ensure_agent("a1", "pw"))
    (batch,) = plugin.batches
    assert names(batch) == ["createRole", "createClient"]
    assert batch[0]["rolename"] == "gpupool-agent-a1"
    assert batch[1]["username"] == "a1"
    assert batch[1]["password"] == "pw"
    assert batch[1]["roles"] == [{"rolename": "gpupool-agent-a1"}]
    assert len({c["correlationData"] for c in batch}) == 2


def test_a_known_agent_gets_its_password_and_role_reset() -> None:
    users, plugin = scripted(
        errors={"createRole": "Role already exists", "createClient": "Client already exists"}
    )
    asyncio.run(users.ensure_agent("a1", "new"))
    assert [names(b) for b in plugin.batches] == [
        ["createRole", "createClient"],
        ["modifyRole", "modifyClient"],
    ]
    modify_role, modify_client = plugin.batches[1]
    assert modify_role["acls"] == agent_acls(Topics("p"), "a1")
    assert modify_client["password"] == "new"
    assert modify_client["roles"] == [{"rolename": "gpupool-agent-a1"}]


def test_deleting_an_unknown_agent_is_fine() -> None:
    users, plugin = scripted(errors={"deleteClient": "Client not found", "deleteRole": "Role not found"})
    asyncio.run(users.delete_agent("a1"))
    assert [names(b) for b in plugin.batches] == [["deleteClient", "deleteRole"]]


def test_a_refused_command_raises_with_the_brokers_reason() -> None:
    users, _ = scripted(errors={"createClient": "Internal error"})
    with pytest.raises(ProtocolError, match="refused createClient for agent a1: Internal error"):
        asyncio.run(users.ensure_agent("a1", "pw"))


def test_no_answer_is_a_deadline() -> None:
    users, _ = scripted(silent=True)
    with pytest.raises(DeadlineExceeded, match="no answer to delete for agent a1"):
        asyncio.run(users.delete_agent("a1"))
    assert not users._pending  # nothing left waiting


@pytest.mark.parametrize("agent_id", ["", "a/b", "a+", "#", "gpupool-coordinator"])
def test_ids_that_cannot_be_users_are_refused_before_sending(agent_id: str) -> None:
    users, plugin = scripted()
    with pytest.raises(UsageError):
        asyncio.run(users.ensure_agent(agent_id, "pw"))
    with pytest.raises(UsageError):
        asyncio.run(users.delete_agent(agent_id))
    assert not plugin.batches


# ---------------------------------------------------------------- a real Mosquitto

QUIET = 0.3  # seconds to watch for a message that must not come, after an in-order sentinel has come


@pytest.fixture
def broker(tmp_path: Path, topic_prefix: str) -> Iterator[Child]:
    """A secure Mosquitto of this test's own (skipped where Mosquitto or its plugin is missing)."""
    try:
        child = start_broker("mosquitto", secure=True, state_dir=tmp_path, topic_prefix=topic_prefix)
    except UsageError as exc:
        pytest.skip(str(exc))
    yield child
    child.stop()


@dataclass
class Coordinator:
    """The admin's connection as the coordinator would use it: users, and every agent message."""

    users: MqttUsers
    client: aiomqtt.Client
    received: asyncio.Queue[tuple[str, bytes]]

    async def next(self) -> tuple[str, bytes]:
        async with asyncio.timeout(5):
            return await self.received.get()

    async def assert_quiet(self) -> None:
        await asyncio.sleep(QUIET)
        assert self.received.empty(), self.received.get_nowait()


def payload_of(message: aiomqtt.Message) -> bytes:
    assert isinstance(message.payload, bytes | bytearray)
    return bytes(message.payload)


@contextlib.asynccontextmanager
async def coordinator(ready: dict[str, Any], topics: Topics) -> AsyncIterator[Coordinator]:
    async with aiomqtt.Client(
        "127.0.0.1", ready["port"], username=ready["admin_username"], password=ready["admin_password"]
    ) as client:

        async def publish(topic: str, payload: bytes) -> None:
            await client.publish(topic, payload, qos=1)

        users = MqttUsers(publish=publish, topics=topics, timeouts=Timeouts(rpc=5))
        received: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        await client.subscribe(CONTROL_RESPONSE_TOPIC, qos=1)
        await client.subscribe(f"{topics.root}/#", qos=1)

        async def route() -> None:
            async for message in client.messages:
                if message.topic.value == CONTROL_RESPONSE_TOPIC:
                    users.handle_response(payload_of(message))
                else:
                    received.put_nowait((message.topic.value, payload_of(message)))

        task = asyncio.create_task(route())
        try:
            yield Coordinator(users, client, received)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def agent(ready: dict[str, Any], name: str, password: str, **kwargs: Any) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        ready["port"],
        username=name,
        password=password,
        identifier=f"gpupool-agent-{name}",
        **kwargs,
    )


async def refused(ready: dict[str, Any], name: str, password: str) -> None:
    with pytest.raises(aiomqtt.MqttCodeError, match="Not authorized"):
        async with agent(ready, name, password):
            pass


async def retained(ready: dict[str, Any], topic: str) -> bytes:
    """The retained message on ``topic``, read by a fresh admin session."""
    async with (
        asyncio.timeout(5),
        aiomqtt.Client(
            "127.0.0.1", ready["port"], username=ready["admin_username"], password=ready["admin_password"]
        ) as client,
    ):
        await client.subscribe(topic, qos=1)
        async for message in client.messages:
            return payload_of(message)
    raise AssertionError("unreachable")


def failed(code: int | ReasonCode) -> bool:
    """Whether a SUBACK code refuses the subscription (MQTT 3.1.1 answers 0x80, MQTT 5 a reason code)."""
    return code >= 0x80 if isinstance(code, int) else code.is_failure


async def until_disconnected(client: aiomqtt.Client) -> None:
    async with asyncio.timeout(5):
        async for _ in client.messages:
            pass


def ids() -> tuple[str, str]:
    return f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"


def test_agents_publish_only_their_own_status(broker: Child, topic_prefix: str) -> None:
    ready, topics = broker.ready, Topics(topic_prefix)
    a, b = ids()

    async def body() -> None:
        async with asyncio.timeout(30), coordinator(ready, topics) as coord:
            await coord.users.ensure_agent(a, "pw-a")
            await coord.users.ensure_agent(b, "pw-b")
            async with agent(ready, b, "pw-b") as agent_b:
                await agent_b.publish(topics.status(b), b"b-real", qos=1, retain=True)
            assert await coord.next() == (topics.status(b), b"b-real")

            async with agent(ready, a, "pw-a") as agent_a:
                await agent_a.publish(topics.status(a), b"a-online", qos=1, retain=True)
                assert await coord.next() == (topics.status(a), b"a-online")
                for forged in (topics.status(b), topics.telemetry(b), topics.commands(b), topics.commands(a)):
                    await agent_a.publish(forged, b"forged", qos=1, retain=True)
                await agent_a.publish(topics.telemetry(a), b"sentinel", qos=1)
                # One publisher's messages arrive in order: the forged ones would have come first.
                assert await coord.next() == (topics.telemetry(a), b"sentinel")
                await coord.assert_quiet()
            assert await retained(ready, topics.status(b)) == b"b-real"
            assert await retained(ready, topics.status(a)) == b"a-online"

    asyncio.run(body())


def test_agents_read_only_their_own_commands(broker: Child, topic_prefix: str) -> None:
    ready, topics = broker.ready, Topics(topic_prefix)
    a, b = ids()

    async def body() -> None:
        async with asyncio.timeout(30), coordinator(ready, topics) as coord:
            await coord.users.ensure_agent(a, "pw-a")
            await coord.users.ensure_agent(b, "pw-b")
            async with agent(ready, a, "pw-a") as agent_a:
                (others,) = await agent_a.subscribe(topics.commands(b), qos=1)
                assert failed(others)  # MQTT 5: "Not authorized"
                (everyone,) = await agent_a.subscribe(topics.all_of("commands"), qos=1)
                assert failed(everyone)
                (own,) = await agent_a.subscribe(topics.commands(a), qos=1)
                assert not failed(own)
                await coord.client.publish(topics.commands(b), b"for-b", qos=1)
                await coord.client.publish(topics.commands(a), b"for-a", qos=1)
                async for message in agent_a.messages:
                    assert (message.topic.value, payload_of(message)) == (topics.commands(a), b"for-a")
                    break

    asyncio.run(body())


WILL_HOLDER = """
import asyncio, sys, aiomqtt
async def main(port, user, password, will_topic):
    will = aiomqtt.Will(will_topic, b"offline", qos=1, retain=True)
    async with aiomqtt.Client("127.0.0.1", int(port), username=user, password=password, will=will,
                              identifier=f"will-{will_topic}"):
        print("connected", flush=True)
        # held until the test kills this process (or closes its stdin), 60 s at the most
        await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, sys.stdin.read), 60)
asyncio.run(main(*sys.argv[1:]))
"""


async def hold_and_kill(ready: dict[str, Any], name: str, password: str, will_topic: str) -> None:
    """Connect in another process with a last will on ``will_topic``, then SIGKILL it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WILL_HOLDER,
        str(ready["port"]),
        name,
        password,
        will_topic,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(15):
            assert await process.stdout.readline() == b"connected\n"
    finally:
        process.kill()  # no DISCONNECT: the broker sends the will, if the ACL allows it
        await process.wait()


def test_a_last_will_goes_only_to_the_agents_own_status(broker: Child, topic_prefix: str) -> None:
    ready, topics = broker.ready, Topics(topic_prefix)
    a, b = ids()

    async def body() -> None:
        async with asyncio.timeout(60), coordinator(ready, topics) as coord:
            await coord.users.ensure_agent(a, "pw-a")
            await coord.users.ensure_agent(b, "pw-b")
            await hold_and_kill(ready, a, "pw-a", topics.status(b))  # checked when sent: dropped
            await hold_and_kill(ready, a, "pw-a", topics.status(a))
            assert await coord.next() == (topics.status(a), b"offline")
            await coord.assert_quiet()
            assert await retained(ready, topics.status(a)) == b"offline"

    asyncio.run(body())


def test_passwords_are_checked_and_reset(broker: Child, topic_prefix: str) -> None:
    ready, topics = broker.ready, Topics(topic_prefix)
    a, _ = ids()

    async def body() -> None:
        async with asyncio.timeout(30), coordinator(ready, topics) as coord:
            await coord.users.ensure_agent(a, "first")
            await refused(ready, a, "wrong")
            async with agent(ready, a, "first"):
                pass
            await coord.users.ensure_agent(a, "second")  # re-enrolment: same user, new password
            await refused(ready, a, "first")
            async with agent(ready, a, "second") as agent_a:
                await agent_a.publish(topics.status(a), b"still-confined", qos=1)
            assert await coord.next() == (topics.status(a), b"still-confined")

    asyncio.run(body())


def test_a_deleted_agent_is_disconnected_and_cannot_return(broker: Child, topic_prefix: str) -> None:
    ready, topics = broker.ready, Topics(topic_prefix)
    a, b = ids()

    async def body() -> None:
        async with asyncio.timeout(30), coordinator(ready, topics) as coord:
            await coord.users.ensure_agent(a, "pw-a")
            await coord.users.ensure_agent(b, "pw-b")
            async with agent(ready, a, "pw-a") as agent_a:
                await coord.users.delete_agent(a)
                with pytest.raises(aiomqtt.MqttError):  # kicked by the broker
                    await until_disconnected(agent_a)
            await refused(ready, a, "pw-a")
            await coord.users.delete_agent(a)  # again: already gone is fine
            async with agent(ready, b, "pw-b"):
                pass

    asyncio.run(body())


def test_agent_users_survive_a_broker_restart(tmp_path: Path, topic_prefix: str) -> None:
    topics = Topics(topic_prefix)
    a, _ = ids()
    try:
        first = start_broker("mosquitto", secure=True, state_dir=tmp_path, topic_prefix=topic_prefix)
    except UsageError as exc:
        pytest.skip(str(exc))
    port = first.ready["port"]

    async def enrol() -> None:
        async with asyncio.timeout(30), coordinator(first.ready, topics) as coord:
            await coord.users.ensure_agent(a, "pw-a")

    try:
        asyncio.run(enrol())
    finally:
        first.stop()
    second = start_broker("mosquitto", secure=True, state_dir=tmp_path, topic_prefix=topic_prefix, port=port)

    async def reconnect() -> None:
        async with asyncio.timeout(30), agent(second.ready, a, "pw-a") as agent_a:
            await agent_a.publish(topics.status(a), b"back", qos=1, retain=True)
        assert await retained(second.ready, topics.status(a)) == b"back"

    try:
        asyncio.run(reconnect())
    finally:
        second.stop()
