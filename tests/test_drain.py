"""Drain and take-back with real processes: ``gpupool drain`` and ``gpupool-agent pause`` move an agent's
buffers to the other agents, agent to agent; the agent then answers the old ids with buffer-moved naming the
new home, where the same session finds the same bytes under the same id. A secure pool of two enrolled agents
on the system broker, raw gRPC as a client would send it (the client's following is tested with the client).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from gpupool._errors import BufferMoved, BufferNotFound
from gpupool._proto.v1 import agent_pb2, control_pb2, coordinator_pb2
from gpupool.cli.admin import evacuation_lines
from gpupool.local import LocalPool
from gpupool.protocol.errors import MOVED_KEY, translate_rpc_error
from gpupool.security.capability import COORDINATOR_SESSION, issue_capability

from .security.attackers import AgentCalls, CoordinatorCalls, capability_key, refused, run, wait_for

BIG = np.arange(3 << 18, dtype=np.float32).reshape(-1, 256)  # 3 MiB: over the bulk path's threshold
SMALL = np.arange(12, dtype=np.int64).reshape(4, 3)
SCALAR = np.array(2.5)


@dataclass
class Pool:
    local: LocalPool
    ca: bytes
    client: CoordinatorCalls
    admin: CoordinatorCalls

    def agent(self, index: int) -> tuple[str, str]:
        ready = self.local.agents[index].ready
        return str(ready["agent_id"]), str(ready["endpoint"])

    def calls(self, index: int, session: str) -> AgentCalls:
        agent_id, endpoint = self.agent(index)
        capability = self.client.grant(session, [agent_id])[agent_id]
        return AgentCalls(endpoint, agent_id, self.ca, capability)

    def state(self, index: int) -> int:
        agent_id, _ = self.agent(index)
        records = {r.status.agent_id: r.status for r in self.local.list_agents(include_offline=True)}
        return records[agent_id].state

    def make_ready(self, index: int) -> None:
        agent_id, _ = self.agent(index)
        self.admin.call("Uncordon", coordinator_pb2.AdminRequest(agent_id=agent_id))


@pytest.fixture(scope="module")
def pool(system_broker_url: str) -> Iterator[Pool]:
    with (
        LocalPool(
            agents=2,
            broker_url=system_broker_url,
            port=0,
            topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
            backend="numpy",
            memory_limit=str(64 << 20),
        ) as local,
        CoordinatorCalls(local.coordinator_address, local.client_token) as client,
        CoordinatorCalls(local.coordinator_address, local.admin_token) as admin,
    ):
        yield Pool(local, local.credentials.ca_path.read_bytes(), client, admin)


def moved_to(exc: grpc.aio.AioRpcError) -> str:
    return dict(exc.trailing_metadata() or ()).get(MOVED_KEY, "")


async def refusal_of(call: object) -> grpc.aio.AioRpcError:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded; a refusal was expected")


def test_drain_moves_every_session_s_buffers_and_forwards_only_within_each_session(pool: Pool) -> None:
    source_id, source_endpoint = pool.agent(0)
    target_id, target_endpoint = pool.agent(1)
    mine = pool.client.connect("drain-test@here").session
    theirs = pool.client.connect("other-test@here").session

    async def upload() -> None:
        async with pool.calls(0, mine) as a, pool.calls(0, theirs) as other:
            await a.upload_raw("big", BIG, session=mine)
            await a.upload_raw("small", SMALL, session=mine)
            await a.upload("scalar", SCALAR, session=mine)
            await other.upload_raw("their-own", SMALL * 7, session=theirs)

    run(upload())
    reply = pool.admin.call(
        "Drain", coordinator_pb2.AdminRequest(agent_id=source_id, reason="test"), timeout=60
    )
    evacuation = reply.evacuation
    assert (evacuation.buffers_moved, evacuation.buffers_left) == (4, 0), evacuation
    assert evacuation.bytes_moved == BIG.nbytes + 2 * SMALL.nbytes + SCALAR.nbytes
    assert {(g.session, g.agent_id, g.buffers) for g in evacuation.moved} == {
        (mine, target_id, 3),
        (theirs, target_id, 1),
    }
    assert pool.state(0) == control_pb2.AGENT_STATE_DRAINING

    async def check() -> None:
        async with pool.calls(0, mine) as old, pool.calls(1, mine) as new, pool.calls(0, theirs) as other:
            for buffer_id in ("big", "small", "scalar"):
                exc = await refusal_of(old.download_raw(buffer_id))
                assert exc.code() == grpc.StatusCode.NOT_FOUND
                assert moved_to(exc) == f"{target_id}|{target_endpoint}|0"
                error = translate_rpc_error(exc, peer=source_endpoint, agent_id=source_id)
                assert isinstance(error, BufferMoved)
                assert (error.buffer_id, error.to_agent, error.to_endpoint, error.to_worker) == (
                    buffer_id,
                    target_id,
                    target_endpoint,
                    0,
                )
            np.testing.assert_array_equal(await new.download_raw("big"), BIG)
            np.testing.assert_array_equal(await new.download("small"), SMALL)
            scalar = await new.download("scalar")
            assert scalar.shape == ()
            assert scalar.dtype == SCALAR.dtype
            assert scalar == SCALAR
            # Every call naming a moved buffer is refused the same way: a program reading it, a free of it.
            program = agent_pb2.ExecuteRequest(
                ops=[
                    agent_pb2.Op(
                        op="negative",
                        inputs=[agent_pb2.Operand(buffer="small")],
                        output="neg",
                        expect=agent_pb2.ArrayMeta(dtype="int64", shape=[4, 3]),
                    )
                ],
                fetch=["neg"],
                session=mine,
            )
            assert moved_to(await refusal_of(old.execute(program))).startswith(target_id)
            free = agent_pb2.FreeRequest(buffer_ids=["small"], session=mine)
            assert moved_to(await refusal_of(old.free(free))).startswith(target_id)
            # A pull naming the old home is refused with the new one (the puller passes it on).
            pull = agent_pb2.PullRequest(
                worker=0,
                output="pulled",
                sources=[
                    agent_pb2.PullSource(
                        agent_id=source_id,
                        buffer_id="small",
                        start=0,
                        stop=4,
                        capability=pool.client.grant(mine, [source_id])[source_id],
                    )
                ],
                expect=agent_pb2.ArrayMeta(dtype="int64", shape=[4, 3]),
                session=mine,
            )
            exc = await refusal_of(new.stub.Pull(pull, timeout=30, metadata=new.metadata))
            assert moved_to(exc) == f"{target_id}|{target_endpoint}|0"
            # Another session asking for the id gets plain not-found: the forward is the session's own.
            exc = await refusal_of(other.download_raw("big"))
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            assert moved_to(exc) == ""
            assert isinstance(translate_rpc_error(exc, peer="", agent_id=source_id), BufferNotFound)
            assert moved_to(await refusal_of(other.download_raw("their-own"))).startswith(target_id)

    run(check())


def test_only_the_coordinator_may_list_or_forward_an_agent_s_buffers(pool: Pool) -> None:
    agent_id, endpoint = pool.agent(1)
    session = pool.client.connect("curious@here").session
    own, _ = issue_capability(
        capability_key(pool.local.credentials.coordinator_dir),
        session=COORDINATOR_SESSION,
        agent_id=agent_id,
        ttl=60,
        now=time.time(),
        endpoint=endpoint,
    )

    async def probe() -> None:
        async with (
            pool.calls(1, session) as client,
            AgentCalls(endpoint, agent_id, pool.ca, own) as coordinator,
        ):
            inventory = client.channel.unary_unary(
                "/gpupool.v1.Agent/Inventory",
                request_serializer=agent_pb2.InventoryRequest.SerializeToString,
                response_deserializer=agent_pb2.InventoryReply.FromString,
            )
            forward = client.channel.unary_unary(
                "/gpupool.v1.Agent/Forward",
                request_serializer=agent_pb2.ForwardRequest.SerializeToString,
                response_deserializer=agent_pb2.ForwardReply.FromString,
            )
            denied = await refused(
                inventory(agent_pb2.InventoryRequest(), metadata=client.metadata, timeout=10)
            )
            assert (denied.code, denied.kind) == (grpc.StatusCode.PERMISSION_DENIED, "permission-denied")
            home = agent_pb2.BufferHome(session=session, buffer_id="x", agent_id="elsewhere", endpoint="a:1")
            denied = await refused(
                forward(agent_pb2.ForwardRequest(moves=[home]), metadata=client.metadata, timeout=10)
            )
            assert denied.kind == "permission-denied"
            assert (
                await refused(inventory(agent_pb2.InventoryRequest(), timeout=10))
            ).kind == "unauthenticated"
            # The coordinator's own capability is good for those calls only, not for a session's.
            listed = await inventory(agent_pb2.InventoryRequest(), metadata=coordinator.metadata, timeout=10)
            assert isinstance(listed, agent_pb2.InventoryReply)
            assert (await refused(coordinator.download_raw("big"))).kind == "permission-denied"

    run(probe())


def test_pause_on_the_rig_moves_its_buffers_and_says_where(pool: Pool) -> None:
    pool.make_ready(0)
    wait_for(lambda: pool.state(0) == control_pb2.AGENT_STATE_READY, within=10, what="agent-0 ready")
    source_id, _ = pool.agent(1)
    target_id, target_endpoint = pool.agent(0)
    session = pool.client.connect("pause-test@here").session
    data = np.linspace(0, 1, 1000, dtype=np.float64)

    async def upload() -> None:
        async with pool.calls(1, session) as agent:
            await agent.upload_raw("p", data, session=session)

    run(upload())
    name = str(pool.local.agents[1].ready["name"])
    socket_path = pool.local.credentials.agent_dir(name) / "control.sock"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpupool.agent",
            "pause",
            "--control-socket",
            str(socket_path),
            "--wait",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "draining"
    # agent-1 also holds what the drain moved there: every buffer goes back to agent-0
    assert any(f"of session {session} to agent {target_id}" in line for line in lines[1:]), lines
    assert not any("still here" in line or "stay here" in line for line in lines), lines

    async def check() -> None:
        async with pool.calls(1, session) as old, pool.calls(0, session) as new:
            exc = await refusal_of(old.download_raw("p"))
            assert moved_to(exc) == f"{target_id}|{target_endpoint}|0"
            np.testing.assert_array_equal(await new.download_raw("p"), data)
            status = await old.health()
            assert status.state == control_pb2.AGENT_STATE_DRAINING
            assert sum(w.buffers for w in status.workers) == 0

    run(check())
    done = subprocess.run(
        [sys.executable, "-m", "gpupool.agent", "resume", "--control-socket", str(socket_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.stdout.strip() == "ready", done.stderr
    del source_id


def test_gpupool_drain_in_an_open_pool_moves_buffers_and_prints_where(system_broker_url: str) -> None:
    """The same with ``--insecure`` agents (no capabilities: sessions and ids as the client names them),
    through the real ``gpupool drain``."""
    with LocalPool(
        agents=2,
        broker_url=system_broker_url,
        port=0,
        topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
        backend="numpy",
        memory_limit=str(64 << 20),
        secure=False,
    ) as local:
        (source_id, source), (target_id, target) = (
            (str(child.ready["agent_id"]), str(child.ready["endpoint"])) for child in local.agents
        )

        async def upload() -> None:
            async with AgentCalls(source, source_id, None) as agent:
                await agent.upload_raw("open-big", BIG, session="s1")

        run(upload())
        environment = {**os.environ, "GPUPOOL_TOKEN": local.admin_token}
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "gpupool.cli.main",
                "--coordinator",
                local.coordinator_address,
                "drain",
                source_id,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=environment,
        )
        assert done.returncode == 0, done.stderr
        assert f"({source_id}) is now draining" in done.stdout
        assert f"moved 1 buffer(s), 3 MiB, of session s1 to agent {target_id} worker 0" in done.stdout

        async def check() -> None:
            async with AgentCalls(source, source_id, None) as old, AgentCalls(target, target_id, None) as new:
                assert moved_to(await refusal_of(old.download_raw("open-big"))) == f"{target_id}|{target}|0"
                np.testing.assert_array_equal(await new.download_raw("open-big"), BIG)

        run(check())


def test_what_gpupool_drain_prints_of_the_moves() -> None:
    evacuation = coordinator_pb2.Evacuation(agent_id="a", seconds=1.25)
    assert evacuation_lines(evacuation) == ["it held no buffers: nothing to move"]
    evacuation.moved.add(session="job-1", agent_id="b", worker=0, buffers=2, bytes=3 << 20)
    evacuation.buffers_moved, evacuation.bytes_moved = 2, 3 << 20
    evacuation.buffers_left, evacuation.bytes_left = 1, 1 << 30
    evacuation.problems.append("no ready agent has room for a buffer of 1073741824 bytes")
    assert evacuation_lines(evacuation) == [
        "  moved 2 buffer(s), 3 MiB, of session job-1 to agent b worker 0",
        "moved 2 buffer(s), 3 MiB, to 1 agent(s) in 1.2 s",
        "1 buffer(s), 1 GiB, stay on the agent (it serves them until they are freed)",
        "  no ready agent has room for a buffer of 1073741824 bytes",
    ]
