"""Confirming an OFFLINE status by asking the agent: Health calls to a loopback gRPC server, and the
coordinator's side (one probe per agent, the status applied only when the agent does not answer)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from gpupool._proto.v1 import agent_pb2, agent_pb2_grpc, control_pb2
from gpupool._proto.v1.control_pb2 import AgentStatus
from gpupool.broker import free_port
from gpupool.coordinator.probe import OfflineProbes, Probed, probe_agent
from gpupool.coordinator.registry import AgentWentOffline, Registry, RegistryEvent
from gpupool.transport.backoff import Backoff
from gpupool.transport.rpc import start_server

READY = control_pb2.AGENT_STATE_READY
OFFLINE = control_pb2.AGENT_STATE_OFFLINE
QUICK = Backoff(base=0.01, cap=0.02, attempts=2)


def status(agent_id: str = "a1", *, state: int = READY, started: int = 50, endpoint: str = "") -> AgentStatus:
    message = AgentStatus(agent_id=agent_id, state=state, endpoint=endpoint)  # type: ignore[arg-type]
    message.started.FromSeconds(started)
    message.updated.FromSeconds(100)
    return message


class FakeAgent(agent_pb2_grpc.AgentServicer):
    """Answers Health with ``answer`` (or never, while ``hang``); counts the calls."""

    def __init__(self, answer: AgentStatus) -> None:
        self.answer = answer
        self.hang = False
        self.calls = 0

    async def Health(self, request: agent_pb2.HealthRequest, context: Any) -> agent_pb2.HealthReply:
        self.calls += 1
        if self.hang:
            await asyncio.sleep(30)
        return agent_pb2.HealthReply(status=self.answer)


@asynccontextmanager
async def serving(answer: AgentStatus) -> AsyncIterator[tuple[FakeAgent, str]]:
    agent = FakeAgent(answer)
    server, address = await start_server(
        "127.0.0.1:0", lambda s: agent_pb2_grpc.add_AgentServicer_to_server(agent, s), tls=None
    )
    try:
        yield agent, address
    finally:
        await server.stop(None)


async def ask(address: str, will: AgentStatus, **options: Any) -> Probed:
    return await probe_agent(
        will, endpoint=address, ca_pem=None, backoff=QUICK, rng=random.Random(0), **options
    )


@pytest.mark.parametrize(
    ("answer", "alive", "why"),
    [
        (status(), True, "as ready"),
        (status(state=control_pb2.AGENT_STATE_DRAINING), True, "as draining"),
        (status(state=OFFLINE), False, "as offline (stopping)"),
        (status("someone-else"), False, "answers as agent 'someone-else'"),
        (status(started=51), False, "another start"),
    ],
    ids=["ready", "draining", "stopping", "another-agent", "restarted"],
)
def test_a_probe_believes_only_the_same_agent_alive_in_the_same_start(
    answer: AgentStatus, alive: bool, why: str
) -> None:
    async def body() -> None:
        async with serving(answer) as (agent, address):
            probed = await ask(address, status(state=OFFLINE))
            assert (probed.alive, probed.tries, agent.calls) == (alive, 1, 1), probed
            assert why in probed.why, probed.why

    asyncio.run(body())


def test_a_refused_connection_is_not_tried_again() -> None:
    probed = asyncio.run(ask(f"127.0.0.1:{free_port()}", status(state=OFFLINE)))
    assert (probed.alive, probed.tries) == (False, 1), probed
    assert "UNAVAILABLE" in probed.why, probed.why


def test_a_hung_agent_is_tried_a_bounded_number_of_times_each_within_the_deadline() -> None:
    async def body() -> None:
        async with serving(status()) as (agent, address):
            agent.hang = True
            started = time.monotonic()
            probed = await ask(address, status(state=OFFLINE), deadline=0.2)
            took = time.monotonic() - started
            assert (probed.alive, probed.tries, agent.calls) == (False, 3, 3), probed
            assert "DEADLINE_EXCEEDED" in probed.why, probed.why
            assert took < 3 * 0.2 + 0.02 + 0.5, took  # three deadlines and two short waits

    asyncio.run(body())


class Recorder:
    def __init__(self) -> None:
        self.applied: list[RegistryEvent] = []

    def __call__(self, events: list[RegistryEvent]) -> None:
        self.applied.extend(events)


def scripted(results: dict[str, bool], gate: asyncio.Event | None = None) -> Callable[..., Awaitable[Probed]]:
    """A probe that answers alive or not per agent id (after ``gate``, if given)."""

    async def probe(will: AgentStatus, *, endpoint: str, ca_pem: bytes | None) -> Probed:
        assert endpoint
        assert ca_pem is None  # an open agent: no certificate fingerprint in its status
        if gate is not None:
            await gate.wait()
        return Probed(results[will.agent_id], None, "scripted", 1)

    return probe


def test_offline_is_applied_only_for_agents_that_do_not_answer() -> None:
    async def body() -> None:
        registry = Registry()
        for agent_id in ("alive", "dead"):
            registry.apply_status(status(agent_id, endpoint="127.0.0.1:1"), now=1.0)
        recorder = Recorder()
        probes = OfflineProbes(
            registry=registry, ca_pem=b"", applied=recorder, probe=scripted({"alive": True, "dead": False})
        )
        async with asyncio.TaskGroup() as group:
            assert probes.start(group, status("alive", state=OFFLINE))
            assert probes.start(group, status("dead", state=OFFLINE))
            assert not probes.start(group, status("unknown", state=OFFLINE))  # nothing to confirm
        assert registry.get("alive").state == READY  # type: ignore[union-attr]
        assert registry.get("dead").state == OFFLINE  # type: ignore[union-attr]
        assert [type(e) for e in recorder.applied] == [AgentWentOffline]
        assert (probes.confirmed, probes.refuted, len(probes)) == (1, 1, 0)
        # Already offline: applied at once by the caller, no probe.
        assert not probes.start(group, status("dead", state=OFFLINE))

    asyncio.run(body())


def test_a_newer_status_cancels_the_probe() -> None:
    async def body() -> None:
        registry = Registry()
        registry.apply_status(status("a1", endpoint="127.0.0.1:1"), now=1.0)
        recorder = Recorder()
        gate = asyncio.Event()
        probes = OfflineProbes(
            registry=registry, ca_pem=b"", applied=recorder, probe=scripted({"a1": False}, gate)
        )
        async with asyncio.TaskGroup() as group:
            assert probes.start(group, status("a1", state=OFFLINE))
            await asyncio.sleep(0)
            probes.cancel("a1")  # the agent reconnected and said READY again
            gate.set()
        assert registry.get("a1").state == READY  # type: ignore[union-attr]
        assert (recorder.applied, probes.confirmed, len(probes)) == ([], 0, 0)

    asyncio.run(body())
