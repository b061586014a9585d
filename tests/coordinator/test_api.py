"""The client and admin APIs of a coordinator subprocess, with simulated agents over a real broker."""

from __future__ import annotations

import pytest

from gpupool._errors import AgentNotAccepting, NoCapacity, PlacementError, UsageError
from gpupool._proto.v1 import coordinator_pb2 as pb
from gpupool.protocol.topics import Topics

from .conftest import StartCoordinator
from .simagent import CORDONED, DRAINING, READY, SimulatedAgent
from .support import CoordinatorClient, eventually, run


async def _ready_count(client: CoordinatorClient, expected: int) -> bool:
    agents = await client.agents()
    return sum(1 for record in agents.values() if record.status.state == READY) == expected


def test_place_splits_rows_over_ready_agents_by_free_memory(
    system_broker_url: str, topic_prefix: str, start_coordinator: StartCoordinator
):
    coordinator = start_coordinator(system_broker_url, topic_prefix)
    topics = Topics(topic_prefix)

    async def body() -> None:
        async with (
            CoordinatorClient.of(coordinator) as client,
            SimulatedAgent(system_broker_url, topics, "aaaa00000001", workers=[(3000, 0)]) as big,
            SimulatedAgent(system_broker_url, topics, "bbbb00000002", workers=[(2000, 1000)]),
            SimulatedAgent(system_broker_url, topics, "cccc00000003", workers=[(10**9, 0)], state=CORDONED),
        ):
            await eventually(lambda: _listed(client, 3), within=5.0, what="three agents listed")
            session = await client.connect()
            # float32 rows of 10 elements: 40 bytes. Free: a 3000 (75 rows), b 1000 (25 rows); c is cordoned.
            assert await client.place(session, "float32", (100, 10)) == [
                ("aaaa00000001", 0, 0, 75),
                ("bbbb00000002", 0, 75, 100),
            ]
            # Those bytes count as used until the agents report again: nothing is left.
            with pytest.raises(NoCapacity) as caught:
                await client.place(session, "float32", (1, 10))
            assert (caught.value.needed, caught.value.available, caught.value.ready_workers) == (40, 0, 2)
            # Telemetry says a holds nothing after all (say the upload never came): its memory is free again.
            await big.publish_telemetry([0])

            async def placed_on_a():
                try:
                    return await client.place(session, "int64", (3, 2))
                except NoCapacity:
                    return None

            assert await eventually(placed_on_a, within=2.0, what="room on a again") == [
                ("aaaa00000001", 0, 0, 3)
            ]
            with pytest.raises(NoCapacity) as caught:
                await client.place(session, "float64", (1000, 1000))
            assert caught.value.needed == 8_000_000
            assert "need 8000000 bytes" in str(caught.value)

    run(body())


async def _listed(client: CoordinatorClient, count: int) -> bool:
    return len(await client.agents()) == count


def test_place_excludes_agents_the_client_names_and_splits_small_arrays_one_row_each(
    system_broker_url: str, topic_prefix: str, start_coordinator: StartCoordinator
):
    coordinator = start_coordinator(system_broker_url, topic_prefix)
    topics = Topics(topic_prefix)

    async def body() -> None:
        async with (
            CoordinatorClient.of(coordinator) as client,
            SimulatedAgent(system_broker_url, topics, "aaaa00000001", workers=[(1000, 0), (1000, 0)]),
            SimulatedAgent(system_broker_url, topics, "bbbb00000002", workers=[(4000, 0)]),
        ):
            await eventually(lambda: _ready_count(client, 2), within=5.0, what="two ready agents")
            session = await client.connect()
            assert await client.place(session, "float64", (2,)) == [
                ("aaaa00000001", 0, 0, 1),
                ("bbbb00000002", 0, 1, 2),
            ]
            assert await client.place(session, "float64", (6,), exclude=("bbbb00000002",)) == [
                ("aaaa00000001", 0, 0, 3),
                ("aaaa00000001", 1, 3, 6),
            ]
            assert await client.place(session, "bool", (0, 5)) == [("bbbb00000002", 0, 0, 0)]
            with pytest.raises(PlacementError, match=r"no ready agents: 2 known \(2 ready\); 2 excluded"):
                await client.place(session, "float32", (4,), exclude=("aaaa00000001", "bbbb00000002"))

    run(body())


def test_place_refuses_without_agents_sessions_or_a_known_dtype(
    system_broker_url: str, topic_prefix: str, start_coordinator: StartCoordinator
):
    coordinator = start_coordinator(system_broker_url, topic_prefix)

    async def body() -> None:
        async with CoordinatorClient.of(coordinator) as client:
            session = await client.connect()
            with pytest.raises(PlacementError, match="no agent has registered"):
                await client.place(session, "float32", (4, 4))
            with pytest.raises(PlacementError, match="unknown session 'job-nope'"):
                await client.place("job-nope", "float32", (4, 4))
            with pytest.raises(UsageError, match="unsupported dtype 'object'"):
                await client.place(session, "object", (4, 4))
            with pytest.raises(UsageError, match="needs the array's meta"):
                await client.call(client.coordinator.Place, pb.PlaceRequest(session=session))

    run(body())


def test_cordon_uncordon_and_drain_round_trip_through_the_agent(
    broker_url: str, topic_prefix: str, start_coordinator: StartCoordinator
):
    coordinator = start_coordinator(broker_url, topic_prefix)
    topics = Topics(topic_prefix)

    async def body() -> None:
        async with (
            CoordinatorClient.of(coordinator) as client,
            SimulatedAgent(broker_url, topics, "f00d00000001", name="rig-a") as agent,
            SimulatedAgent(broker_url, topics, "beef00000002", name="rig-b"),
        ):
            await eventually(lambda: _ready_count(client, 2), within=5.0, what="two ready agents")
            session = await client.connect()

            reply = await client.call(
                client.admin.Cordon, pb.AdminRequest(agent_id="rig-a", reason="maintenance")
            )
            assert (reply.agent.agent_id, reply.agent.state) == ("f00d00000001", CORDONED)
            assert [c.command_id for c in agent.commands] == [reply.command_id]
            assert agent.commands[0].reason == "maintenance"
            assert [s[0] for s in await client.place(session, "float32", (8,))] == ["beef00000002"]

            reply = await client.call(client.admin.Uncordon, pb.AdminRequest(agent_id="f00d"))
            assert reply.agent.state == READY
            assert {s[0] for s in await client.place(session, "float32", (8,))} == {
                "f00d00000001",
                "beef00000002",
            }

            reply = await client.call(client.admin.Drain, pb.AdminRequest(agent_id="f00d00000001"))
            assert reply.agent.state == DRAINING
            assert [s[0] for s in await client.place(session, "float32", (8,))] == ["beef00000002"]
            assert len(agent.commands) == 3

    run(body())


def test_admin_refuses_unknown_ambiguous_and_offline_agents(
    system_broker_url: str, topic_prefix: str, start_coordinator: StartCoordinator
):
    coordinator = start_coordinator(system_broker_url, topic_prefix)
    topics = Topics(topic_prefix)

    async def body() -> None:
        async with (
            CoordinatorClient.of(coordinator) as client,
            SimulatedAgent(system_broker_url, topics, "abc000000001"),
            SimulatedAgent(system_broker_url, topics, "abc000000002") as second,
        ):
            await eventually(lambda: _ready_count(client, 2), within=5.0, what="two ready agents")
            with pytest.raises(PlacementError, match="no agent 'nosuch'"):
                await client.call(client.admin.Drain, pb.AdminRequest(agent_id="nosuch"))
            with pytest.raises(PlacementError, match=r"'abc' is ambiguous: 2 agents match by id prefix"):
                await client.call(client.admin.Cordon, pb.AdminRequest(agent_id="abc"))
            await second.publish_status(state=4)  # OFFLINE, as a clean stop says
            await eventually(lambda: _ready_count(client, 1), within=5.0, what="one ready agent")
            with pytest.raises(AgentNotAccepting, match="abc000000002: is offline"):
                await client.call(client.admin.Cordon, pb.AdminRequest(agent_id="abc000000002"))

    run(body())


def test_jobs_are_listed_with_their_placements(
    system_broker_url: str, topic_prefix: str, start_coordinator: StartCoordinator
):
    coordinator = start_coordinator(system_broker_url, topic_prefix)
    topics = Topics(topic_prefix)

    async def body() -> None:
        async with (
            CoordinatorClient.of(coordinator) as client,
            SimulatedAgent(system_broker_url, topics, "aaaa00000001"),
        ):
            await eventually(lambda: _ready_count(client, 1), within=5.0, what="the agent")
            first = await client.connect("ann@laptop")
            second = await client.connect("bob@desk")
            await client.place(first, "float32", (256, 4))
            await client.place(first, "int32", (10,))
            await client.call(client.coordinator.Disconnect, pb.DisconnectRequest(session=second))
            reply = await client.call(client.coordinator.ListJobs, pb.ListJobsRequest())
            jobs = {job.job_id: job for job in reply.jobs}
            assert set(jobs) == {first, second}
            assert (jobs[first].client, jobs[first].state) == ("ann@laptop", "running")
            assert (jobs[first].arrays_placed, jobs[first].bytes_placed) == (2, 256 * 16 + 40)
            assert (jobs[second].client, jobs[second].state, jobs[second].arrays_placed) == (
                "bob@desk",
                "ended",
                0,
            )
            assert jobs[first].started.seconds > 0
            with pytest.raises(PlacementError, match="has ended"):
                await client.place(second, "float32", (1,))
            with pytest.raises(PlacementError, match="unknown session"):
                await client.call(client.coordinator.Disconnect, pb.DisconnectRequest(session="job-nope"))
            connect = await client.call(client.coordinator.Connect, pb.ConnectRequest(client="c"))
            assert connect.ready_agents == 1
            assert connect.coordinator_version

    run(body())
