"""The control plane of a real agent process: retained status, last will, commands, broker restarts."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import aiomqtt
import grpc
import numpy as np
import pytest

from gpupool._config import parse_broker_url
from gpupool._process import Child
from gpupool._proto.v1 import agent_pb2, control_pb2
from gpupool.broker import free_port, start_broker
from gpupool.protocol.codec import encode_json
from gpupool.protocol.topics import Topics

from .agent_helpers import (
    agent_stub,
    clear_retained,
    download,
    mqtt_watch,
    next_matching,
    refused,
    run,
    start_agent,
    upload,
)

READY = control_pb2.AGENT_STATE_READY
CORDONED = control_pb2.AGENT_STATE_CORDONED
DRAINING = control_pb2.AGENT_STATE_DRAINING
OFFLINE = control_pb2.AGENT_STATE_OFFLINE


def in_state(state: int) -> object:
    return lambda status: status.state == state


async def send_command(broker_url: str, topic: str, kind: int) -> None:
    address = parse_broker_url(broker_url)
    command = control_pb2.AgentCommand(command_id=uuid.uuid4().hex, kind=kind, reason="test")
    async with aiomqtt.Client(
        address.host, address.port, identifier=f"test-{uuid.uuid4().hex[:8]}"
    ) as client:
        await client.publish(topic, encode_json(command), qos=1)


def test_retained_status_then_offline_on_a_clean_stop(broker_url: str, topic_prefix: str) -> None:
    agent = start_agent(broker_url, topic_prefix, "--backend", "numpy", name="rig-7")
    topic = Topics(topic_prefix).status(agent.ready["agent_id"])
    try:

        async def registered() -> control_pb2.AgentStatus:
            async with mqtt_watch(broker_url, topic) as mqtt:  # subscribes after the agent published
                return await next_matching(mqtt, topic, control_pb2.AgentStatus)

        status = run(registered())
        assert status.schema_version == 1
        assert status.agent_id == agent.ready["agent_id"]
        assert status.name == "rig-7"
        assert status.endpoint == agent.ready["endpoint"]
        assert status.state == READY
        assert status.backend == "numpy"
        assert status.version
        assert status.hostname
        assert status.started.seconds > 0
        assert status.updated.ToNanoseconds() >= status.started.ToNanoseconds()
        assert "NumPy" in status.note
        assert len(status.workers) == 1
        assert status.workers[0].backend == "numpy"
        assert status.workers[0].memory_limit > 0

        async def stopped() -> control_pb2.AgentStatus:
            async with mqtt_watch(broker_url, topic) as mqtt:
                await next_matching(mqtt, topic, control_pb2.AgentStatus, in_state(READY))
                assert agent.stop() == 0
                return await next_matching(mqtt, topic, control_pb2.AgentStatus, in_state(OFFLINE))

        assert run(stopped()).agent_id == agent.ready["agent_id"]
    finally:
        agent.stop()
        run(clear_retained(broker_url, topic))


def test_a_killed_agent_goes_offline_by_its_last_will(system_broker_url: str, topic_prefix: str) -> None:
    agent = start_agent(system_broker_url, topic_prefix)
    topic = Topics(topic_prefix).status(agent.ready["agent_id"])
    try:

        async def body() -> control_pb2.AgentStatus:
            async with mqtt_watch(system_broker_url, topic) as mqtt:
                await next_matching(mqtt, topic, control_pb2.AgentStatus, in_state(READY))
                agent.kill()
                return await next_matching(mqtt, topic, control_pb2.AgentStatus, in_state(OFFLINE), within=20)

        will = run(body())
        assert will.endpoint == agent.ready["endpoint"]
    finally:
        agent.kill()
        run(clear_retained(system_broker_url, topic))


def test_commands_change_the_state_and_draining_refuses_uploads(
    system_broker_url: str, topic_prefix: str
) -> None:
    agent = start_agent(system_broker_url, topic_prefix)
    topics = Topics(topic_prefix)
    agent_id = agent.ready["agent_id"]
    status_topic = topics.status(agent_id)
    commands = topics.commands(agent_id)
    kept = np.arange(100, dtype=np.float32)

    async def body() -> None:
        async with (
            mqtt_watch(system_broker_url, status_topic) as mqtt,
            agent_stub(agent.ready["endpoint"]) as stub,
        ):
            await next_matching(mqtt, status_topic, control_pb2.AgentStatus, in_state(READY))
            await send_command(system_broker_url, commands, control_pb2.COMMAND_KIND_CORDON)
            await next_matching(mqtt, status_topic, control_pb2.AgentStatus, in_state(CORDONED))
            await upload(stub, "s.kept", kept, session="s")  # cordoned still takes uploads
            await next_matching(  # the status follows the memory in use
                mqtt, status_topic, control_pb2.AgentStatus, lambda s: s.workers[0].buffers == 1
            )
            await send_command(system_broker_url, commands, control_pb2.COMMAND_KIND_UNCORDON)
            await next_matching(mqtt, status_topic, control_pb2.AgentStatus, in_state(READY))
            await send_command(system_broker_url, commands, control_pb2.COMMAND_KIND_DRAIN)
            await next_matching(mqtt, status_topic, control_pb2.AgentStatus, in_state(DRAINING))
            code, kind, _ = await refused(upload(stub, "s.new", kept, session="s"))
            assert (code, kind) == (grpc.StatusCode.FAILED_PRECONDITION, "not-accepting")
            np.testing.assert_array_equal(
                await download(stub, "s.kept"), kept
            )  # draining serves what it holds
            health = await stub.Health(agent_pb2.HealthRequest(), timeout=10)
            assert health.status.state == DRAINING
            await send_command(system_broker_url, commands, control_pb2.COMMAND_KIND_UNCORDON)
            await next_matching(mqtt, status_topic, control_pb2.AgentStatus, in_state(READY))
            await upload(stub, "s.new", kept, session="s")

    try:
        run(body())
    finally:
        agent.stop()
        run(clear_retained(system_broker_url, status_topic))


def test_the_agent_registers_again_after_the_broker_restarts(topic_prefix: str) -> None:
    port = free_port()
    try:
        broker = start_broker("mosquitto", port=port)
    except Exception as exc:  # no mosquitto here
        pytest.skip(f"needs mosquitto: {exc}")
    url = str(broker.ready["url"])
    agent: Child | None = None
    try:
        agent = start_agent(url, topic_prefix)
        topic = Topics(topic_prefix).status(agent.ready["agent_id"])
        broker.stop()
        broker = start_broker("mosquitto", port=port)  # not persistent: the retained status is gone

        async def body() -> control_pb2.AgentStatus:
            async with mqtt_watch(url, topic) as mqtt:
                return await next_matching(mqtt, topic, control_pb2.AgentStatus, in_state(READY), within=20)

        assert run(body()).endpoint == agent.ready["endpoint"]
    finally:
        if agent is not None:
            agent.stop()
        broker.stop()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpupool.agent", *args], capture_output=True, text=True, timeout=60
    )


def test_an_agent_never_enrolled_needs_a_join_token_or_insecure(tmp_path: Path) -> None:
    done = run_cli("--broker", "mqtt://127.0.0.1:1", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path))
    assert done.returncode == 2
    assert "this agent is not enrolled" in done.stderr
    assert "--join-token" in done.stderr
    assert "--insecure" in done.stderr
    done = run_cli("--broker", "mqtt://127.0.0.1:1", "--id", "abc", "--state-dir", str(tmp_path))
    assert done.returncode == 2
    assert "--id is for --insecure agents only" in done.stderr


def test_usage_errors_exit_non_zero_with_a_message() -> None:
    done = run_cli("--listen", "127.0.0.1:0")
    assert done.returncode == 2
    assert "--broker is required" in done.stderr
    done = run_cli("--broker", "mqtt://127.0.0.1:1", "--memory-limit", "lots")
    assert done.returncode == 2
    assert "memory limit 'lots'" in done.stderr


def test_backend_cupy_without_cuda_exits_non_zero() -> None:
    try:
        from gpupool.agent._cupy import CudaUnavailable, probe_cuda

        probe_cuda()
        pytest.skip("CUDA works here")
    except CudaUnavailable:
        pass
    done = run_cli(
        "--broker", "mqtt://127.0.0.1:1", "--listen", "127.0.0.1:0", "--backend", "cupy", "--insecure"
    )
    assert done.returncode == 2
    assert "--backend cupy, but CUDA is not usable here" in done.stderr


def test_a_taken_port_is_refused(system_broker_url: str, topic_prefix: str) -> None:
    agent = start_agent(system_broker_url, topic_prefix)
    try:
        port = agent.ready["endpoint"].rsplit(":", 1)[1]
        done = run_cli(
            "--broker",
            system_broker_url,
            "--listen",
            f"127.0.0.1:{port}",
            "--topic-prefix",
            topic_prefix,
            "--insecure",
        )
        assert done.returncode == 2
        assert "cannot listen on 127.0.0.1:" in done.stderr
    finally:
        agent.stop()
        run(clear_retained(system_broker_url, Topics(topic_prefix).status(agent.ready["agent_id"])))
