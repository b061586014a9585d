"""LocalPool: a whole pool on this machine, as subprocesses, and nothing left behind."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest

from gpupool._errors import ConnectError, UsageError
from gpupool._process import Child
from gpupool._proto.v1 import control_pb2
from gpupool.local import LocalPool


def prefix() -> str:
    return f"gpupool-test-{uuid.uuid4().hex[:10]}"


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def states(pool: LocalPool) -> dict[str, int]:
    return {r.status.name: r.status.state for r in pool.list_agents(include_offline=True)}


def children_of(pool: LocalPool) -> list[Child]:
    return [c for c in (pool.broker, pool.coordinator, *pool.agents) if c is not None]


def test_a_pool_starts_ready_and_stops_completely() -> None:
    with LocalPool(agents=2, port=0, backend="numpy", topic_prefix=prefix()) as pool:
        assert pool.embedded_broker
        assert pool.broker_kind in ("mosquitto", "amqtt")
        assert pool.broker_url.startswith("mqtt://127.0.0.1:")
        assert pool.coordinator_address.startswith("127.0.0.1:")
        assert [a.ready["name"] for a in pool.agents] == ["agent-0", "agent-1"]
        records = pool.list_agents()
        assert {r.status.agent_id for r in records} == {a.ready["agent_id"] for a in pool.agents}
        assert {r.status.state for r in records} == {control_pb2.AGENT_STATE_READY}
        started = children_of(pool)
        assert len(started) == 4
    assert not any(child.alive() for child in started)
    pool.stop()  # idempotent
    with pytest.raises(UsageError):
        pool.list_agents()


def test_agents_come_and_go(system_broker_url: str) -> None:
    with LocalPool(
        agents=1, broker_url=system_broker_url, port=0, backend="numpy", topic_prefix=prefix()
    ) as pool:
        assert pool.broker is None
        assert pool.broker_kind == "external"
        added = pool.add_agent()
        assert added.ready["name"] == "agent-1"
        assert states(pool) == {
            "agent-0": control_pb2.AGENT_STATE_READY,
            "agent-1": control_pb2.AGENT_STATE_READY,
        }

        assert pool.stop_agent(1) == 0  # a clean stop: the agent says OFFLINE itself
        wait_until(lambda: states(pool)["agent-1"] == control_pb2.AGENT_STATE_OFFLINE, 10, "agent-1 offline")

        pool.kill_agent(0)  # SIGKILL: only the broker's last will can tell
        wait_until(lambda: states(pool)["agent-0"] == control_pb2.AGENT_STATE_OFFLINE, 15, "agent-0 offline")
        assert pool.live_agents() == []
        assert pool.list_agents() == []


def test_restart_broker_keeps_the_port_and_the_agents_return() -> None:
    with LocalPool(agents=1, port=0, backend="numpy", topic_prefix=prefix()) as pool:
        url = pool.broker_url
        first = pool.broker
        pool.restart_broker()
        assert pool.broker is not first
        assert first is not None
        assert not first.alive()
        assert pool.broker_url == url
        assert pool.broker is not None
        assert pool.broker.ready["url"] == url
        pool.wait_ready(timeout=30)  # the agent republished its status to the new broker
        assert [r.status.name for r in pool.list_agents()] == ["agent-0"]


def test_restart_broker_needs_an_embedded_broker(system_broker_url: str) -> None:
    with (
        LocalPool(
            agents=1, broker_url=system_broker_url, port=0, backend="numpy", topic_prefix=prefix()
        ) as pool,
        pytest.raises(UsageError, match="external broker"),
    ):
        pool.restart_broker()


def test_a_failed_start_leaves_nothing_running(system_broker_url: str) -> None:
    pool = LocalPool(
        agents=2,
        broker_url=system_broker_url,
        port=0,
        backend="numpy",
        topic_prefix=prefix(),
        agent_args=["--no-such-option"],
    )
    with pytest.raises(ConnectError, match="agent"):
        pool.start()
    assert pool.coordinator is not None
    assert not pool.coordinator.alive()
    assert not any(child.alive() for child in children_of(pool))


def test_bad_options_are_refused_before_anything_starts() -> None:
    with pytest.raises(UsageError):
        LocalPool(agents=-1)
    with pytest.raises(UsageError):
        LocalPool(port=70000)
    with pytest.raises(UsageError):
        LocalPool(broker_url="http://example.org")
