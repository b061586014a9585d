"""The secure embedded broker: Mosquitto with the dynamic-security plugin, refusing anonymous clients."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from gpupool._errors import ConnectError, UsageError
from gpupool._process import Child
from gpupool.broker import free_port, start_broker
from gpupool.broker.secure import (
    ADMIN_ROLE,
    ADMIN_USERNAME,
    SALT_BYTES,
    dynsec_config,
    find_dynsec_plugin,
    hash_password,
    probe_login,
    secure_mosquitto_config,
)
from gpupool.protocol.topics import Topics

TEMPLATE = Path(__file__).parents[2] / "scripts" / "mosquitto-secure.conf"


def _start_secure(state_dir: Path, prefix: str = "gpupool", port: int = 0) -> Child:
    """A secure broker, or a skip saying which part of Mosquitto is missing."""
    try:
        return start_broker("mosquitto", secure=True, state_dir=state_dir, topic_prefix=prefix, port=port)
    except UsageError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def secure_broker(tmp_path: Path, topic_prefix: str) -> Iterator[Child]:
    """A secure Mosquitto of this test's own, on a free port."""
    child = _start_secure(tmp_path / "broker", topic_prefix)
    yield child
    child.stop()


async def _refusal(port: int, username: str | None, password: str | None) -> str:
    """Why the broker refused this login (fails the test if it accepted it)."""
    async with asyncio.timeout(10):
        try:
            async with aiomqtt.Client("127.0.0.1", port, username=username, password=password, timeout=5):
                pass
        except aiomqtt.MqttError as exc:
            return str(exc)
    raise AssertionError(f"the broker accepted {username!r}")


def failed(code: int | ReasonCode) -> bool:
    """Whether a SUBACK code refuses the subscription (MQTT 3.1.1 answers 0x80, MQTT 5 a reason code)."""
    return code >= 0x80 if isinstance(code, int) else code.is_failure


def _directives(text: str) -> dict[str, str]:
    """Mosquitto configuration lines as {name: value} (the last one wins; comments dropped)."""
    pairs = (line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {pair[0]: pair[1] if len(pair) > 1 else "" for pair in pairs if pair[0] != "log_type"}


def test_password_hash_matches_mosquitto_ctrl(tmp_path: Path) -> None:
    ctrl = shutil.which("mosquitto_ctrl")
    if ctrl is None:
        pytest.skip("mosquitto_ctrl is not installed")
    path = tmp_path / "init.json"
    subprocess.run(
        [ctrl, "dynsec", "init", str(path), "someone", "s3cret-pass"],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=10,
    )
    client = json.loads(path.read_text())["clients"][0]
    salt = base64.b64decode(client["salt"])
    mine = hash_password("s3cret-pass", salt=salt, iterations=client["iterations"])
    assert mine == {k: client[k] for k in ("password", "salt", "iterations")}


def test_password_hash_has_the_salt_the_plugin_loads() -> None:
    fields = hash_password("x")
    assert len(base64.b64decode(fields["salt"])) == SALT_BYTES  # any other length: the client is skipped
    assert len(base64.b64decode(fields["password"])) == 64
    assert fields != hash_password("x")  # a fresh salt every time
    with pytest.raises(UsageError):
        hash_password("x", salt=b"short")


def test_new_broker_has_the_coordinator_only_with_default_deny() -> None:
    config = dynsec_config(admin_password="pw", topics=Topics("pool7"))
    assert config["defaultACLAccess"] == {
        "publishClientSend": False,
        "publishClientReceive": True,
        "subscribe": False,
        "unsubscribe": True,
    }
    assert [c["username"] for c in config["clients"]] == [ADMIN_USERNAME]
    assert config["clients"][0]["roles"] == [{"rolename": ADMIN_ROLE}]
    (role,) = config["roles"]
    acls = {(a["acltype"], a["topic"]) for a in role["acls"]}
    assert acls == {
        ("publishClientSend", "$CONTROL/dynamic-security/v1/#"),
        ("publishClientReceive", "$CONTROL/dynamic-security/v1/#"),
        ("subscribePattern", "$CONTROL/dynamic-security/v1/response"),
        ("subscribePattern", "pool7/v1/agents/#"),
        ("publishClientReceive", "pool7/v1/agents/#"),
        ("publishClientSend", "pool7/v1/agents/+/commands"),
        ("publishClientSend", "pool7/v1/agents/+/status"),
        ("publishClientSend", "pool7/v1/agents/+/telemetry"),
    }
    assert all(a["allow"] for a in role["acls"])


def test_the_shipped_template_says_what_the_generated_config_says() -> None:
    generated = _directives(
        secure_mosquitto_config(
            host="127.0.0.1", port=1883, plugin=Path("/p.so"), dynsec_file=Path("/d.json")
        )
    )
    shipped = _directives(TEMPLATE.read_text())
    assert generated.pop("user")  # the embedded broker stays the user who started it; operators use chown
    assert shipped.keys() == generated.keys()
    for name in ("per_listener_settings", "allow_anonymous", "set_tcp_nodelay", "listener", "persistence"):
        assert shipped[name] == generated[name], name
    assert shipped["per_listener_settings"] == "false"
    assert shipped["allow_anonymous"] == "false"
    assert shipped["plugin"].endswith("mosquitto_dynamic_security.so")


def test_amqtt_cannot_be_secure() -> None:
    with pytest.raises(UsageError, match="amqtt"):
        start_broker("amqtt", secure=True)


def test_secure_broker_refuses_anonymous_and_wrong_passwords(secure_broker: Child) -> None:
    ready = secure_broker.ready
    port = ready["port"]
    assert ready["secure"] is True
    assert ready["admin_username"] == ADMIN_USERNAME
    assert Path(ready["dynsec_file"]).is_file()
    assert Path(ready["admin_password_file"]).read_text().strip() == ready["admin_password"]
    assert Path(ready["admin_password_file"]).stat().st_mode & 0o077 == 0

    assert "Not authorized" in asyncio.run(_refusal(port, None, None))
    assert "Not authorized" in asyncio.run(_refusal(port, ADMIN_USERNAME, "wrong"))
    assert "Not authorized" in asyncio.run(_refusal(port, "nobody", "nothing"))
    assert probe_login("127.0.0.1", port, username=None, password=None) == 5
    assert probe_login("127.0.0.1", port, username=ADMIN_USERNAME, password=ready["admin_password"]) == 0


def test_the_coordinator_may_command_agents_and_nothing_else(secure_broker: Child, topic_prefix: str) -> None:
    ready = secure_broker.ready
    topics = Topics(topic_prefix)

    async def body() -> list[tuple[str, bytes]]:
        received: list[tuple[str, bytes]] = []
        async with (
            asyncio.timeout(10),
            aiomqtt.Client(
                "127.0.0.1", ready["port"], username=ADMIN_USERNAME, password=ready["admin_password"]
            ) as client,
        ):
            (granted,) = await client.subscribe(f"{topics.root}/#", qos=1)
            assert not failed(granted)
            (refused,) = await client.subscribe("elsewhere/#", qos=1)
            assert failed(refused)
            await client.publish(f"{topics.root}/a1/other", b"dropped", qos=1)  # not an agent channel
            await client.publish(topics.commands("a1"), b"drain", qos=1)
            await client.publish(topics.status("a1"), b"", qos=1, retain=True)  # forgetting an agent
            # Delivered in order: once this arrives, whatever the broker let through has arrived.
            await client.publish(topics.telemetry("a1"), b"last", qos=1)
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                received.append((message.topic.value, message.payload))
                if message.topic.value == topics.telemetry("a1"):
                    return received
        raise AssertionError("unreachable")

    assert asyncio.run(body()) == [
        (topics.commands("a1"), b"drain"),
        (topics.status("a1"), b""),
        (topics.telemetry("a1"), b"last"),
    ]


def test_anonymous_remains_the_default() -> None:
    try:
        child = start_broker("mosquitto")
    except UsageError as exc:
        pytest.skip(str(exc))
    try:
        assert "secure" not in child.ready
        assert probe_login("127.0.0.1", child.ready["port"], username=None, password=None) == 0
    finally:
        child.stop()


def test_a_restarted_broker_keeps_its_users(tmp_path: Path) -> None:
    port = free_port()
    first = _start_secure(tmp_path, port=port)
    password = first.ready["admin_password"]
    first.stop()
    second = _start_secure(tmp_path, port=port)
    try:
        assert second.ready["admin_password"] == password
        assert probe_login("127.0.0.1", port, username=ADMIN_USERNAME, password=password) == 0
    finally:
        second.stop()


def test_a_plugin_file_without_the_coordinator_is_reported(tmp_path: Path) -> None:
    if find_dynsec_plugin() is None:
        pytest.skip("no mosquitto_dynamic_security.so")
    (tmp_path / "dynamic-security.json").write_text(json.dumps({"clients": [], "roles": []}))
    (tmp_path / "admin-password").write_text("whatever\n")
    with pytest.raises(ConnectError, match="refused the coordinator"):
        start_broker("mosquitto", secure=True, state_dir=tmp_path, timeout=10)
