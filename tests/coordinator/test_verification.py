"""Clients' verification reports and observed throughput, through a coordinator subprocess with simulated
agents over the system broker: quarantine and taking an agent back, what a client may not report, and
the figures ``ListAgents`` shows."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from gpupool._errors import AuthError, PlacementError, UsageError
from gpupool._proto.v1 import coordinator_pb2 as pb
from gpupool.client.verifyreport import VerificationOutcome, report_verification
from gpupool.protocol.topics import Topics
from gpupool.security.store import StateStore

from .conftest import StartCoordinator
from .simagent import READY, SimulatedAgent
from .support import CoordinatorClient, eventually, run

MiB = 1 << 20
A, B, C = "aaaa00000001", "bbbb00000002", "cccc00000003"


async def _ready(client: CoordinatorClient, count: int) -> bool:
    agents = await client.agents()
    return sum(1 for record in agents.values() if record.status.state == READY) == count


async def _report(
    client: CoordinatorClient, session: str, agent_id: str, reference: str, *, agreed: bool, detail: str = ""
) -> VerificationOutcome:
    """The client library's call, over the test's channel."""

    async def call(method: str, request: Any) -> Any:
        return await client.call(getattr(client.coordinator, method), request)

    return await report_verification(
        call, session, agent_id=agent_id, reference_agent_id=reference, agreed=agreed, detail=detail
    )


def _client_token(state_dir: Path, name: str) -> str:
    with StateStore.open(state_dir) as store:
        token, _ = store.create_token(role="client", name=name, ttl=None, now=time.time())
    return token


def test_mismatches_quarantine_an_agent_placement_skips_it_and_uncordon_takes_it_back(
    system_broker_url: str, topic_prefix: str, start_coordinator: StartCoordinator
) -> None:
    coordinator = start_coordinator(system_broker_url, topic_prefix, "--quarantine-after", "2")
    topics = Topics(topic_prefix)

    async def body() -> None:
        async with (
            CoordinatorClient.of(coordinator) as client,
            SimulatedAgent(system_broker_url, topics, A, name="rig-a"),
            SimulatedAgent(system_broker_url, topics, B, name="rig-b"),
        ):
            await eventually(lambda: _ready(client, 2), within=5.0, what="two ready agents")
            session = await client.connect()
            assert {s[0] for s in await client.place(session, "float64", (4,))} == {A, B}

            agreed = await _report(client, session, A, B, agreed=True)
            assert (agreed.counted, agreed.checks, agreed.mismatches, agreed.score) == (True, 1, 0, 2 / 3)
            first = await _report(client, session, A, B, agreed=False, detail="row 1: 0.5 vs 7.0")
            assert (first.checks, first.mismatches, first.quarantined) == (2, 1, False)
            second = await _report(client, session, A, B, agreed=False, detail="row 3: 1.5 vs -1.5")
            assert second.quarantined
            assert (second.checks, second.mismatches, second.score) == (3, 2, 0.4)
            assert "2 of 3 verified results disagreed" in second.reason
            assert "row 3: 1.5 vs -1.5" in second.reason

            listed = await client.agents()
            assert listed[A].trust.quarantined
            assert listed[A].trust.reason == second.reason
            assert listed[A].status.state == READY  # the agent's own state: quarantine is the coordinator's
            assert not listed[B].HasField("trust")  # never checked
            # Placement skips the quarantined agent, and says so when nothing else is left.
            assert {s[0] for s in await client.place(session, "float64", (4,))} == {B}
            with pytest.raises(PlacementError, match="1 quarantined for wrong answers"):
                await client.place(session, "float64", (4,), exclude=(B,))

            reply = await client.call(client.admin.Uncordon, pb.AdminRequest(agent_id="rig-a"))
            assert reply.agent.state == READY
            assert not (await client.agents())[A].HasField("trust")  # a clean record
            assert {s[0] for s in await client.place(session, "float64", (4,))} == {A, B}

    run(body())


def test_observed_throughput_is_smoothed_per_agent_and_listed(
    system_broker_url: str, topic_prefix: str, start_coordinator: StartCoordinator
) -> None:
    coordinator = start_coordinator(system_broker_url, topic_prefix)
    topics = Topics(topic_prefix)

    def renew(session: str, *figures: tuple[str, int, float]) -> pb.RenewRequest:
        request = pb.RenewRequest(session=session)
        for agent_id, nbytes, seconds in figures:
            request.observed.add(agent_id=agent_id, bytes=nbytes, seconds=seconds)
        return request

    async def body() -> None:
        async with (
            CoordinatorClient.of(coordinator) as client,
            SimulatedAgent(system_broker_url, topics, A),
            SimulatedAgent(system_broker_url, topics, B),
            SimulatedAgent(system_broker_url, topics, C),
        ):
            await eventually(lambda: _ready(client, 3), within=5.0, what="three ready agents")
            session = await client.connect()
            await client.place(session, "float64", (4,), exclude=(C,))
            # C is a stranger to this session: its figure is hearsay and ignored, as is a tiny transfer.
            await client.call(
                client.coordinator.Renew,
                renew(session, (A, 100 * MiB, 1.0), (B, 1000, 1e-6), (C, 100 * MiB, 0.01)),
            )
            await client.call(client.coordinator.Renew, renew(session, (A, 200 * MiB, 1.0)))
            listed = await client.agents()
            assert listed[A].network_bytes_per_second == pytest.approx(130 * MiB)  # EWMA, weight 0.3
            assert listed[B].network_bytes_per_second == 0.0
            assert listed[C].network_bytes_per_second == 0.0

    run(body())


def test_a_client_cannot_report_on_agents_it_was_not_placed_on_nor_for_another_tokens_session(
    tmp_path: Path, system_broker_url: str, topic_prefix: str, start_coordinator: StartCoordinator
) -> None:
    victim_token, attacker_token = _client_token(tmp_path, "victim"), _client_token(tmp_path, "attacker")
    coordinator = start_coordinator(
        system_broker_url, topic_prefix, "--quarantine-after", "100", state_dir=tmp_path
    )
    topics = Topics(topic_prefix)

    async def body() -> None:
        async with (
            CoordinatorClient.of(coordinator) as admin,
            CoordinatorClient.of(coordinator, token=victim_token) as victim,
            CoordinatorClient.of(coordinator, token=attacker_token) as attacker,
            SimulatedAgent(system_broker_url, topics, A),
            SimulatedAgent(system_broker_url, topics, B),
            SimulatedAgent(system_broker_url, topics, C),
        ):
            await eventually(lambda: _ready(admin, 3), within=5.0, what="three ready agents")
            victims = await victim.connect()
            await victim.place(victims, "float64", (4,), exclude=(C,))  # on A and B
            mine = await attacker.connect()
            await attacker.place(mine, "float64", (4,), exclude=(B, C))  # on A only

            # An agent the session was never placed on, as the one checked or as the reference.
            with pytest.raises(AuthError, match=f"never placed on {B}"):
                await _report(attacker, mine, B, A, agreed=False)
            with pytest.raises(AuthError, match=f"never placed on {C}"):
                await _report(attacker, mine, A, C, agreed=False)
            # Someone else's session, which was placed on both.
            with pytest.raises(AuthError, match="belongs to another token"):
                await _report(attacker, victims, B, A, agreed=False)
            with pytest.raises(UsageError, match="its own result"):
                await _report(attacker, mine, A, A, agreed=False)
            with pytest.raises(PlacementError, match="unknown session"):
                await _report(attacker, "job-nope", A, B, agreed=False)
            listed = await admin.agents()
            assert not any(record.HasField("trust") for record in listed.values())

            # A session's mismatch reports are rate-limited: a burst of four, then not counted.
            outcomes = [await _report(victim, victims, B, A, agreed=False) for _ in range(6)]
            assert [o.counted for o in outcomes] == [True, True, True, True, False, False]
            assert "limit of 4 mismatch reports" in outcomes[-1].note
            assert outcomes[-1].mismatches == 4

    run(body())


def test_a_quarantine_survives_a_coordinator_restart(
    tmp_path: Path, system_broker_url: str, topic_prefix: str, start_coordinator: StartCoordinator
) -> None:
    topics = Topics(topic_prefix)
    first = start_coordinator(system_broker_url, topic_prefix, "--quarantine-after", "1", state_dir=tmp_path)

    async def quarantine() -> None:
        async with CoordinatorClient.of(first) as client:
            await eventually(lambda: _ready(client, 2), within=5.0, what="two ready agents")
            session = await client.connect()
            await client.place(session, "float64", (4,))
            assert (await _report(client, session, B, A, agreed=False, detail="bad")).quarantined

    async def after_restart() -> None:
        second = start_coordinator(system_broker_url, topic_prefix, state_dir=tmp_path)
        async with CoordinatorClient.of(second) as client:
            await eventually(lambda: _ready(client, 2), within=5.0, what="two ready agents again")
            assert (await client.agents())[B].trust.quarantined
            session = await client.connect()
            assert {s[0] for s in await client.place(session, "float64", (4,))} == {A}

    async def body() -> None:
        async with (
            SimulatedAgent(system_broker_url, topics, A),
            SimulatedAgent(system_broker_url, topics, B),
        ):
            await quarantine()
            first.stop(timeout=10)
            await after_restart()

    run(body())
