"""Attacks on a pool with its defences on, done for real: each one is refused, and the victim is unharmed.

Three pools, each started once and shared by the tests of its kind:

- ``secure``: what ``gpupool up`` runs: an embedded Mosquitto with dynamic security (an MQTT user per
  enrolled agent), a coordinator with its state dir, two enrolled NumPy agents serving TLS and checking
  capabilities. A victim session holds an array on both agents; an attacker has a client token of its
  own, a session of its own and genuine capabilities for that session on both agents.
- ``open_broker``: the same agents and coordinator on the system Mosquitto, which admits anyone:
  forged and replayed MQTT payloads reach the coordinator, and only its admission stands in the way.
- a pool with a 2-second lease (one test), for a client killed with SIGKILL.

Attacks that worked when these tests were written (replayed statuses, telemetry and commands; an empty
status clearing an enrolled agent) were fixed with them; their tests now pass like the rest.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import grpc
import numpy as np
import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import gpupool as gp
from gpupool._config import Timeouts, parse_broker_url
from gpupool._proto.v1 import agent_pb2, control_pb2, coordinator_pb2
from gpupool.broker import mosquitto_secure_available
from gpupool.client.array import RemoteArray
from gpupool.client.channels import AgentChannel
from gpupool.local import LocalPool
from gpupool.protocol.codec import meta_of
from gpupool.protocol.topics import Topics
from gpupool.security.pki import agent_dns_name, fingerprint, load_certificate
from gpupool.security.signing import sign_message, verify_message
from gpupool.security.tokens import new_token

from .attackers import (
    AgentCalls,
    CoordinatorCalls,
    MiB,
    PoolLog,
    Tarpit,
    await_for,
    capture,
    create_token,
    every_data_call,
    expired_capability,
    fake_agent,
    foreign_capability,
    forged_status,
    mqtt,
    next_message,
    own_ca_certificate,
    payload,
    pool_certificate,
    pool_log,
    publish_then_sync,
    refused,
    revoke_token,
    run,
    timestamp,
    wait_for,
)

#: Each agent of the shared pools may hold this much.
AGENT_MEMORY = 64 * MiB

OK = grpc.StatusCode.OK
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
READY = control_pb2.AGENT_STATE_READY
DRAINING = control_pb2.AGENT_STATE_DRAINING
OFFLINE = control_pb2.AGENT_STATE_OFFLINE


def new_prefix() -> str:
    return f"gpupool-test-{uuid.uuid4().hex[:10]}"


def agent_ids(local: LocalPool) -> list[str]:
    return [str(child.ready["agent_id"]) for child in local.agents]


def registry(local: LocalPool) -> dict[str, coordinator_pb2.AgentRecord]:
    """The coordinator's registry, offline agents included, by agent id."""
    return {record.status.agent_id: record for record in local.list_agents(include_offline=True)}


def state_of(local: LocalPool, agent_id: str) -> int:
    record = registry(local).get(agent_id)
    return record.status.state if record is not None else 0


def pool_ca(local: LocalPool) -> bytes:
    assert local.credentials is not None
    return local.credentials.ca_path.read_bytes()


def coordinator_dir(local: LocalPool) -> Path:
    assert local.credentials is not None
    return local.credentials.coordinator_dir


# -- the secure pool, its victim and an attacker -------------------------------------------------------------


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalPool, PoolLog]]:
    """``gpupool up``'s pool: secure embedded Mosquitto, coordinator, two enrolled agents (stall 1 s)."""
    if not mosquitto_secure_available():  # scripts/test installs Mosquitto where it can
        pytest.skip("needs Mosquitto with its dynamic-security plugin (the secure embedded broker)")
    with (
        pool_log(tmp_path_factory.mktemp("secure") / "pool.log") as log,
        LocalPool(
            agents=2,
            port=0,
            backend="numpy",
            topic_prefix=new_prefix(),
            memory_limit=str(AGENT_MEMORY),
            coordinator_args=["--min-shard-bytes", "0"],  # every array over both agents
            agent_args=["--stall-timeout", "1"],
            stderr=log.stream,
        ) as local,
    ):
        assert local.secure_broker, "these tests need Mosquitto with its dynamic-security plugin"
        yield local, log


@dataclass
class Victim:
    """A session of the pool's own client token, holding ``x`` (``data``) over both agents."""

    pool: gp.Pool
    data: np.ndarray
    x: RemoteArray

    def piece_on(self, agent_id: str) -> Any:
        return next(piece for piece in self.x.layout if piece.agent_id == agent_id)

    def footprint(self, agent_id: str) -> tuple[int, int]:
        """What the victim holds on the agent: (bytes, buffers)."""
        piece = self.piece_on(agent_id)
        return (piece.stop - piece.start) * self.data.shape[1] * self.data.itemsize, 1

    async def settled(self, agent: AgentCalls) -> tuple[int, int]:
        """Wait until the agent holds the victim's array and nothing else (other tests' sessions end over
        MQTT, a moment after they disconnect); the agent's (bytes, buffers) then."""
        expected = self.footprint(agent.agent_id)

        async def only_the_victims() -> bool:
            return await agent.memory() == expected

        await await_for(only_the_victims, within=10, what=f"agent {agent.agent_id} to hold the victim's only")
        return expected

    def check(self) -> None:
        """The victim's array is intact and its session computes (keeping nothing more on the agents)."""
        np.testing.assert_array_equal(self.x.get(), self.data)
        assert float(self.x.sum()) == float(self.data.sum())
        doubled = self.x * 2
        np.testing.assert_array_equal(doubled.get(), self.data * 2)
        doubled.free()


@pytest.fixture(scope="module")
def victim(secure: tuple[LocalPool, PoolLog]) -> Iterator[Victim]:
    local, _ = secure
    with local.connect() as pool:
        data = np.arange(64 * 32, dtype=np.float64).reshape(64, 32)
        x = pool.asarray(data)
        assert {piece.agent_id for piece in x.layout} == set(agent_ids(local))
        yield Victim(pool, data, x)


@pytest.fixture(scope="module")
def attacker_token(secure: tuple[LocalPool, PoolLog]) -> str:
    """A client token of the attacker's own (a colleague's leaked token, a second user of the pool)."""
    local, _ = secure
    token, _ = create_token(coordinator_dir(local), role="client", name="mallory")
    return token


@dataclass
class Attacker:
    """A session of the attacker's token, with genuine capabilities for it on every agent."""

    calls: CoordinatorCalls
    session: str
    capabilities: dict[str, str]


@pytest.fixture
def attacker(secure: tuple[LocalPool, PoolLog], attacker_token: str) -> Iterator[Attacker]:
    local, _ = secure
    with CoordinatorCalls(local.coordinator_address, attacker_token) as calls:
        session = calls.connect().session
        yield Attacker(calls, session, calls.grant(session, agent_ids(local)))
        calls.call("Disconnect", coordinator_pb2.DisconnectRequest(session=session))


def agent_calls(local: LocalPool, index: int, capability: str = "") -> AgentCalls:
    child = local.agents[index]
    return AgentCalls(str(child.ready["endpoint"]), str(child.ready["agent_id"]), pool_ca(local), capability)


# -- 1. another session's buffers ----------------------------------------------------------------------------


def read_program(buffer_id: str, output: str, rows: int) -> agent_pb2.ExecuteRequest:
    return agent_pb2.ExecuteRequest(
        ops=[
            agent_pb2.Op(
                op="negative",
                inputs=[agent_pb2.Operand(buffer=buffer_id)],
                output=output,
                expect=agent_pb2.ArrayMeta(dtype="float64", shape=[rows, 32]),
            )
        ],
        fetch=[output],
    )


def loop_program(buffer_id: str, rows: int, *, as_init: bool) -> agent_pb2.ExecuteRequest:
    """A fori_loop that reads ``buffer_id``: as its initial carry, or from inside its body."""
    meta = agent_pb2.ArrayMeta(dtype="float64", shape=[rows, 32])
    zeros = agent_pb2.Operand(constant=agent_pb2.Constant(meta=meta, data=np.zeros((rows, 32)).tobytes()))
    init = agent_pb2.Operand(buffer=buffer_id) if as_init else zeros
    read = agent_pb2.Operand(buffer="carried" if as_init else buffer_id)
    body = agent_pb2.Op(
        op="add", inputs=[agent_pb2.Operand(buffer="carried"), read], output="next", expect=meta
    )
    loop = agent_pb2.Loop(trips=1, carry=["carried"], body=[body], next=["next"])
    return agent_pb2.ExecuteRequest(
        ops=[agent_pb2.Op(op="fori_loop", inputs=[init], outputs=["stolen"], expects=[meta], loop=loop)],
        fetch=["stolen"],
    )


def reads_of(agent: AgentCalls, buffer_id: str, rows: int) -> list[Callable[[], Awaitable[Any]]]:
    """Every way to read a buffer: both downloads, a program over it, a fetch of it, a loop's initial
    value and a loop's body."""
    return [
        lambda: agent.download(buffer_id),
        lambda: agent.download_raw(buffer_id),
        lambda: agent.execute(read_program(buffer_id, "stolen", rows)),
        lambda: agent.execute(agent_pb2.ExecuteRequest(fetch=[buffer_id])),
        lambda: agent.execute(loop_program(buffer_id, rows, as_init=True)),
        lambda: agent.execute(loop_program(buffer_id, rows, as_init=False)),
    ]


def naming_a_session(
    agent: AgentCalls, session: str, buffer_id: str
) -> dict[str, Callable[[], Awaitable[Any]]]:
    """Every request that names a session of its own choosing."""
    row = np.ones(4, np.float32)
    return {
        "Execute": lambda: agent.execute(agent_pb2.ExecuteRequest(session=session, fetch=[buffer_id])),
        "Free": lambda: agent.free(agent_pb2.FreeRequest(session=session)),
        "FreeIds": lambda: agent.free(agent_pb2.FreeRequest(session=session, buffer_ids=[buffer_id])),
        "Upload": lambda: agent.upload("mine", row, session=session),
        "UploadRaw": lambda: agent.upload_raw("mine", row, session=session),
    }


def test_another_session_cannot_read_overwrite_or_free_the_victims_buffers(
    secure: tuple[LocalPool, PoolLog], victim: Victim, attacker: Attacker
) -> None:
    local, _ = secure

    async def body() -> None:
        for index, agent_id in enumerate(agent_ids(local)):
            piece = victim.piece_on(agent_id)
            rows = piece.stop - piece.start
            async with agent_calls(local, index, attacker.capabilities[agent_id]) as agent:
                before = await victim.settled(agent)
                # The victim's id as the client knows it, as the agent files it, and a path-like escape.
                for name in (
                    piece.buffer_id,
                    f"{victim.pool.session}/{piece.buffer_id}",
                    f"../{victim.pool.session}/{piece.buffer_id}",
                ):
                    for attempt in reads_of(agent, name, rows):
                        refusal = await refused(attempt())
                        assert (refusal.code, refusal.kind) == (NOT_FOUND, "buffer-not-found"), refusal
                        assert f"{attacker.session}/" in refusal.details, refusal  # looked up among its own
                    freed = await agent.free(agent_pb2.FreeRequest(buffer_ids=[name]))
                    assert (freed.freed, freed.bytes_freed) == (0, 0)
                    await agent.execute(agent_pb2.ExecuteRequest(free=[name]))  # frees nothing either
                # Uploading under the victim's id makes a buffer of the attacker's own session.
                mine = np.full((rows, 32), -1.0)
                reply = await agent.upload_raw(piece.buffer_id, mine)
                assert reply.buffer_id == piece.buffer_id
                np.testing.assert_array_equal(await agent.download_raw(piece.buffer_id), mine)
                reply = await agent.upload(piece.buffer_id + ".pb", mine)
                assert reply.buffer_id == piece.buffer_id + ".pb"
                # Freeing "everything" frees the attacker's session only.
                everything = await agent.free(agent_pb2.FreeRequest())
                assert (everything.freed, everything.bytes_freed) == (2, 2 * mine.nbytes)
                assert await agent.memory() == before

    run(body())
    victim.check()


def test_naming_the_victims_session_is_permission_denied(
    secure: tuple[LocalPool, PoolLog], victim: Victim, attacker: Attacker
) -> None:
    local, _ = secure
    theirs = victim.pool.session

    async def body() -> None:
        for index, agent_id in enumerate(agent_ids(local)):
            piece = victim.piece_on(agent_id)
            async with agent_calls(local, index, attacker.capabilities[agent_id]) as agent:
                attempts = naming_a_session(agent, theirs, piece.buffer_id)
                for method, attempt in attempts.items():
                    refusal = await refused(attempt())
                    assert (refusal.code, refusal.kind) == (PERMISSION_DENIED, "permission-denied"), (
                        method,
                        refusal,
                    )

    run(body())
    # Nor does the coordinator do anything for the victim's session on the attacker's token: above all,
    # it grants no capability for it.
    meta = meta_of(np.dtype(np.float64), (8, 8))
    for method, request in {
        "Grant": coordinator_pb2.GrantRequest(session=theirs, agent_ids=agent_ids(local)),
        "Renew": coordinator_pb2.RenewRequest(session=theirs),
        "Place": coordinator_pb2.PlaceRequest(session=theirs, meta=meta),
        "Disconnect": coordinator_pb2.DisconnectRequest(session=theirs),
    }.items():
        refusal = attacker.calls.refusal(method, request)
        assert (refusal.code, refusal.kind) == (PERMISSION_DENIED, "permission-denied"), (method, refusal)
    with CoordinatorCalls(local.coordinator_address, local.admin_token) as admin:
        jobs = admin.call("ListJobs", coordinator_pb2.ListJobsRequest(all=True)).jobs
    assert next(job for job in jobs if job.job_id == theirs).state == "running"
    victim.check()


# -- 2. capabilities that are missing, forged, misdirected, expired or of an ended session -------------------


def tampered(capability: str, agent_id: str) -> str:
    """A genuine capability whose payload is rewritten for ``agent_id`` (its signature kept)."""
    encoded, _, signature = capability.partition(".")
    claims = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    claims["a"] = agent_id
    text = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(text).rstrip(b"=").decode() + "." + signature


@pytest.mark.parametrize(
    "case", ["none", "garbage", "foreign-key", "another-agents", "rewritten-for-this-agent", "expired"]
)
def test_a_call_without_a_good_capability_is_unauthenticated(
    secure: tuple[LocalPool, PoolLog], victim: Victim, attacker: Attacker, case: str
) -> None:
    local, _ = secure
    other, target = agent_ids(local)
    capability = {
        "none": "",
        "garbage": "eyJhIjoiYWdlbnQifQ.c2lnbmF0dXJl!",
        "foreign-key": foreign_capability(session=attacker.session, agent_id=target),
        "another-agents": attacker.capabilities[other],
        "rewritten-for-this-agent": tampered(attacker.capabilities[other], target),
        "expired": expired_capability(coordinator_dir(local), session=attacker.session, agent_id=target),
    }[case]
    piece = victim.piece_on(target)

    async def body() -> None:
        async with agent_calls(local, 1, capability) as agent:
            before = await victim.settled(agent)
            for method, attempt in every_data_call(agent, piece.buffer_id).items():
                refusal = await refused(attempt())
                assert (refusal.code, refusal.kind) == (UNAUTHENTICATED, "unauthenticated"), (method, refusal)
                print(f"{case} {method}: {refusal.details}")
            assert (await agent.health()).agent_id == target  # Health alone stays open
            assert await agent.memory() == before

    run(body())
    victim.check()


@pytest.mark.parametrize("ending", ["Disconnect", "EndJob"])
def test_the_capability_of_an_ended_session_is_unauthenticated(
    secure: tuple[LocalPool, PoolLog], victim: Victim, attacker_token: str, ending: str
) -> None:
    local, _ = secure
    target = agent_ids(local)[1]
    kept = np.ones(MiB // 8)
    with (
        CoordinatorCalls(local.coordinator_address, attacker_token) as calls,
        CoordinatorCalls(local.coordinator_address, local.admin_token) as admin,
    ):
        session = calls.connect().session
        capability = calls.grant(session, [target])[target]

        async def body() -> None:
            async with agent_calls(local, 1, capability) as agent:
                before = await victim.settled(agent)
                await agent.upload_raw("kept", kept)
                assert await agent.memory() == (before[0] + kept.nbytes, before[1] + 1)
                if ending == "Disconnect":
                    await asyncio.to_thread(
                        calls.call, ending, coordinator_pb2.DisconnectRequest(session=session)
                    )
                else:
                    await asyncio.to_thread(admin.call, ending, coordinator_pb2.EndJobRequest(job_id=session))

                async def still_served() -> bool:  # the END_SESSION command is on its way over MQTT
                    try:
                        await agent.download_raw("kept")
                    except grpc.aio.AioRpcError as exc:
                        return exc.code() == UNAUTHENTICATED
                    return False

                deadline = time.monotonic() + 10
                while not await still_served():
                    assert time.monotonic() < deadline, "the agent still serves an ended session after 10 s"
                    await asyncio.sleep(0.05)
                for method, attempt in every_data_call(agent, "kept").items():
                    refusal = await refused(attempt())
                    assert (refusal.code, refusal.kind) == (UNAUTHENTICATED, "unauthenticated"), (
                        method,
                        refusal,
                    )
                    assert "ended" in refusal.details, refusal
                assert await agent.memory() == before  # its buffers went with it

        run(body())
        refusal = calls.refusal("Grant", coordinator_pb2.GrantRequest(session=session, agent_ids=[target]))
        assert (refusal.code, refusal.kind) == (NOT_FOUND, "unknown-session"), refusal
        assert "ended" in refusal.details
    victim.check()


# -- 3. the admin API without an admin token -----------------------------------------------------------------


def admin_requests(agent_id: str, job_id: str) -> dict[str, Any]:
    return {
        "Drain": coordinator_pb2.AdminRequest(agent_id=agent_id, reason="attack"),
        "Cordon": coordinator_pb2.AdminRequest(agent_id=agent_id, reason="attack"),
        "Forget": coordinator_pb2.AdminRequest(agent_id=agent_id, reason="attack"),
        "EndJob": coordinator_pb2.EndJobRequest(job_id=job_id),
        "ListJobs": coordinator_pb2.ListJobsRequest(all=True),
    }


def pool_view(local: LocalPool) -> dict[str, tuple[int, str]]:
    return {agent_id: (r.status.state, r.status.endpoint) for agent_id, r in registry(local).items()}


@pytest.mark.parametrize("token", ["client", "agent-join", "none", "unknown", "revoked-admin"])
def test_admin_calls_are_refused_without_a_live_admin_token(
    secure: tuple[LocalPool, PoolLog], victim: Victim, attacker_token: str, token: str
) -> None:
    local, _ = secure
    before = pool_view(local)
    assert {state for state, _ in before.values()} == {READY}
    expected = PERMISSION_DENIED if token in ("client", "agent-join") else UNAUTHENTICATED
    assert local.credentials is not None
    if token == "revoked-admin":
        bearer, token_id = create_token(coordinator_dir(local), role="admin", name="ex-operator")
        with CoordinatorCalls(local.coordinator_address, bearer) as former:
            former.call("ListJobs", coordinator_pb2.ListJobsRequest(all=True))  # good, and now cached
            revoke_token(coordinator_dir(local), token_id)

            def revoked() -> bool:  # within the coordinator's 2-second token cache
                try:
                    former.call("ListJobs", coordinator_pb2.ListJobsRequest(all=True))
                except grpc.RpcError as exc:
                    return exc.code() == UNAUTHENTICATED  # type: ignore[attr-defined,no-any-return]
                return False

            wait_for(revoked, within=10, what="the revoked admin token refused")
    else:
        bearer = {
            "client": attacker_token,
            "agent-join": local.credentials.join_token,
            "none": "",
            "unknown": new_token()[0],
        }[token]
    with CoordinatorCalls(local.coordinator_address, bearer) as calls:
        for method, request in admin_requests(agent_ids(local)[0], victim.pool.session).items():
            refusal = calls.refusal(method, request)
            assert refusal.code == expected, (method, refusal)
            print(f"{token} {method}: {refusal.details}")
    assert pool_view(local) == before
    with CoordinatorCalls(local.coordinator_address, local.admin_token) as admin:
        jobs = admin.call("ListJobs", coordinator_pb2.ListJobsRequest(all=True)).jobs
    assert next(job for job in jobs if job.job_id == victim.pool.session).state == "running"
    victim.check()


def test_gpupool_drain_with_a_client_token_fails_in_one_line(
    secure: tuple[LocalPool, PoolLog], victim: Victim, attacker_token: str
) -> None:
    local, _ = secure
    before = pool_view(local)
    env = {**os.environ, "GPUPOOL_TOKEN": attacker_token}
    argv = [sys.executable, "-m", "gpupool.cli.main", "--coordinator", local.coordinator_address]
    result = subprocess.run(
        [*argv, "drain", agent_ids(local)[0]],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    print(result.stderr)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "admin" in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert pool_view(local) == before
    victim.check()


# -- 4. forged statuses: the secure broker -------------------------------------------------------------------


def rig_identity(local: LocalPool, index: int) -> dict[str, str]:
    """What a stolen rig gives away: its identity.json (MQTT user and password among it)."""
    assert local.credentials is not None
    name = str(local.agents[index].ready["name"])
    return dict(json.loads((local.credentials.agent_dir(name) / "identity.json").read_text()))


def test_the_secure_broker_refuses_strangers_and_keeps_each_rig_to_its_own_topics(
    secure: tuple[LocalPool, PoolLog], victim: Victim
) -> None:
    local, log = secure
    assert local.broker is not None
    admin_user = str(local.broker.ready["admin_username"])
    admin_password = str(local.broker.ready["admin_password"])
    topics = Topics(local.topic_prefix)
    mine, theirs = agent_ids(local)
    rig = rig_identity(local, 0)
    assert rig["mqtt_username"] == mine
    assert local.credentials is not None
    their_certificate = (local.credentials.agent_dir("agent-1") / "agent.pem").read_bytes()

    async def body(tarpit: Tarpit) -> None:
        for username, password in ((None, None), (mine, "guessed"), ("gpupool-coordinator", "guessed")):
            with pytest.raises(aiomqtt.MqttError, match=r"[Nn]ot authori[sz]ed"):
                async with mqtt(local.broker_url, username=username, password=password):
                    pass
        _, real = await capture(
            local.broker_url,
            topics.status(theirs),
            control_pb2.AgentStatus,
            username=admin_user,
            password=admin_password,
        )
        forged = copy.deepcopy(real)
        forged.endpoint = tarpit.endpoint
        forged.updated.CopyFrom(timestamp())
        drain = control_pb2.AgentCommand(
            schema_version=1, command_id="x", kind=control_pb2.COMMAND_KIND_DRAIN, agent_id=theirs
        )
        telemetry = control_pb2.AgentTelemetry(schema_version=1, agent_id=theirs, time=timestamp())
        async with mqtt(local.broker_url, username=mine, password=rig["mqtt_password"]) as rig_client:
            granted = await rig_client.subscribe(topics.commands(theirs), qos=1)
            assert [int(getattr(code, "value", code)) for code in granted] == [0x80], granted  # refused
            await publish_then_sync(
                rig_client,
                topics.root,
                log,
                [
                    (topics.status(theirs), payload(forged), True),
                    (topics.telemetry(theirs), payload(telemetry), False),
                    (topics.commands(theirs), payload(drain), False),
                ],
                as_agent=mine,
            )
        _, now = await capture(
            local.broker_url,
            topics.status(theirs),
            control_pb2.AgentStatus,
            username=admin_user,
            password=admin_password,
        )
        assert now.endpoint == real.endpoint
        assert verify_message(now, load_certificate(their_certificate).public_key())

    with Tarpit() as tarpit:
        run(body(tarpit))
        assert not log.matching(" coordinator ", f"dropped a payload for agent {theirs}")  # never got there
        assert pool_view(local)[theirs] == (READY, local.agents[1].ready["endpoint"])
        victim.check()
        assert (tarpit.connections, tarpit.bytes_received) == (0, 0)


# -- 5. a hijacked endpoint presenting someone else's certificate --------------------------------------------


def test_a_client_gets_a_tls_failure_not_data_from_an_endpoint_with_the_wrong_certificate(
    secure: tuple[LocalPool, PoolLog],
) -> None:
    local, _ = secure
    ca = pool_ca(local)
    expected = agent_ids(local)[0]
    impostor = f"impostor{uuid.uuid4().hex[:6]}"
    _, own_certificate, own_key = own_ca_certificate(agent_dns_name(expected))
    pool_signed, pool_key = pool_certificate(coordinator_dir(local), impostor)
    timeouts = Timeouts(connect=5.0, rpc=5.0)

    async def call(agent_id: str, endpoint: str) -> dict[str, np.ndarray]:
        channel = AgentChannel(agent_id, endpoint, timeouts, ca_pem=ca)
        try:
            return await channel.execute(0, [], session="s", fetch=["x"])
        finally:
            await channel.close()

    async def body() -> None:
        for label, certificate, key in (
            ("the agent's name, signed by another CA", own_certificate, own_key),
            ("a pool certificate of another agent", pool_signed, pool_key),
        ):
            async with fake_agent(certificate, key) as (endpoint, fake):
                with pytest.raises(gp.ConnectError) as caught:
                    await call(expected, endpoint)
                print(f"{label}: {caught.value}")
                assert fake.calls == 0, label
        # The control: the same fake serves its made-up data to a client expecting the impostor's name.
        async with fake_agent(pool_signed, pool_key) as (endpoint, fake):
            fetched = await call(impostor, endpoint)
            assert fake.calls == 1
            assert float(fetched["x"][0]) == 666.0
        # A real agent answering at another agent's endpoint is refused the same way.
        with pytest.raises(gp.ConnectError):
            await call(expected, str(local.agents[1].ready["endpoint"]))

    run(body())


# -- 7. a header-only upload on a secure agent ---------------------------------------------------------------


def test_a_header_only_upload_with_a_capability_loses_its_reservation(
    secure: tuple[LocalPool, PoolLog], victim: Victim, attacker: Attacker
) -> None:
    local, _ = secure
    target = agent_ids(local)[1]

    async def body() -> None:
        async with agent_calls(local, 1, attacker.capabilities[target]) as agent:
            before = await victim.settled(agent)
            size = AGENT_MEMORY - before[0] - MiB
            quiet = asyncio.Event()
            header = agent_pb2.UploadHeader(buffer_id="stalled", meta=meta_of(np.dtype(np.bool_), (size,)))

            async def header_only() -> AsyncIterator[bytes]:
                yield header.SerializeToString()
                await quiet.wait()  # the stream stays open and sends nothing more

            stalled = agent.upload_raw_call(header_only(), timeout=60, metadata=agent.metadata)
            try:
                await asyncio.wait_for(stalled.initial_metadata(), 10)  # the go-ahead: reserved
                refusal = await refused(agent.upload_raw("squeezed", np.ones(2 * MiB, np.bool_)))
                assert (refusal.code, refusal.kind) == (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "out-of-memory",
                ), refusal
                refusal = await refused(stalled)  # the agent ends the quiet stream itself (--stall-timeout 1)
                assert refusal.code == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "stalled" in refusal.details
                await agent.upload_raw("after", np.ones(size, np.bool_))  # the reservation is gone
                await agent.free(agent_pb2.FreeRequest())
                assert await agent.memory() == before
            finally:
                quiet.set()

    run(body())
    victim.check()


# -- 8. repeated failing programs on a secure agent ----------------------------------------------------------


def test_failing_programs_with_a_capability_keep_no_memory(
    secure: tuple[LocalPool, PoolLog], victim: Victim, attacker: Attacker
) -> None:
    local, _ = secure
    target = agent_ids(local)[1]
    n = 2 * MiB  # x: 8 MiB of float32; each float64 intermediate 16 MiB: the fifth cannot fit
    process = psutil.Process(local.agents[1].pid)

    def oom(tag: str) -> agent_pb2.ExecuteRequest:
        ops = [
            agent_pb2.Op(
                op="astype" if i == 0 else "negative",
                inputs=[agent_pb2.Operand(buffer="x" if i == 0 else f"{tag}{i - 1}")],
                output=f"{tag}{i}",
                expect=agent_pb2.ArrayMeta(dtype="float64", shape=[n]),
            )
            for i in range(8)
        ]
        return agent_pb2.ExecuteRequest(ops=ops)

    async def body() -> None:
        async with agent_calls(local, 1, attacker.capabilities[target]) as agent:
            before = await victim.settled(agent)
            await agent.upload_raw("x", np.ones(n, np.float32))
            loaded = await agent.memory()
            rss = process.memory_info().rss
            for i in range(6):
                refusal = await refused(agent.execute(oom(f"p{i}.")))
                assert refusal.kind == "out-of-memory", refusal
            bad = agent_pb2.Op(
                op="no_such_op",
                inputs=[agent_pb2.Operand(buffer="x")],
                output="bad",
                expect=agent_pb2.ArrayMeta(dtype="float32", shape=[n]),
            )
            for _ in range(3):
                refusal = await refused(agent.execute(agent_pb2.ExecuteRequest(ops=[bad])))
                assert refusal.code == grpc.StatusCode.INVALID_ARGUMENT, refusal
            assert await agent.memory() == loaded
            grown = process.memory_info().rss - rss
            print(f"agent RSS grew {grown / MiB:.0f} MiB over 9 failed programs")
            assert grown < AGENT_MEMORY
            await agent.free(agent_pb2.FreeRequest())
            assert await agent.memory() == before

    run(body())
    victim.check()


# -- 4, 9. forged and replayed payloads on a broker that admits anyone ---------------------------------------


@pytest.fixture(scope="module")
def open_broker(
    system_broker_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalPool, PoolLog]]:
    """Enrolled agents and a coordinator on the system Mosquitto (anonymous): anyone may publish there.

    Agents report every 0.5 s and the coordinator shows an agent offline after 3 s of silence.
    """
    with (
        pool_log(tmp_path_factory.mktemp("open") / "pool.log") as log,
        LocalPool(
            agents=2,
            broker_url=system_broker_url,
            port=0,
            backend="numpy",
            topic_prefix=new_prefix(),
            memory_limit=str(AGENT_MEMORY),
            coordinator_args=["--min-shard-bytes", "0", "--liveness", "3"],
            agent_args=["--heartbeat", "0.5"],
            stderr=log.stream,
        ) as local,
    ):
        assert not local.secure_broker
        try:
            yield local, log
        finally:  # leave no forged retained status on the shared broker

            async def clear() -> None:
                root = Topics(local.topic_prefix).root
                async with mqtt(system_broker_url) as client:
                    await client.subscribe(f"{root}/+/status", qos=1)
                    await client.subscribe(f"{root}/+/telemetry", qos=1)
                    seen: set[str] = set()
                    try:
                        async with asyncio.timeout(1.0):
                            async for message in client.messages:
                                if message.retain:
                                    seen.add(message.topic.value)
                    except TimeoutError:
                        pass
                    live = {
                        Topics(local.topic_prefix).status(a.ready["agent_id"]) for a in local.live_agents()
                    }
                    for topic in seen - live:
                        await client.publish(topic, b"", qos=1, retain=True)

            run(clear(), timeout=30)


def sum_on_pool(local: LocalPool) -> set[str]:
    """Upload an array, check its sum, and return the endpoints its shards went to."""
    data = np.arange(40 * 16, dtype=np.float64).reshape(40, 16)
    with local.connect() as pool:
        x = pool.asarray(data)
        assert float(x.sum()) == float(data.sum())
        np.testing.assert_array_equal(x.get(), data)
        return {piece.endpoint for piece in x.layout}


def test_forged_statuses_on_an_open_broker_are_dropped_and_get_no_traffic(
    open_broker: tuple[LocalPool, PoolLog],
) -> None:
    local, log = open_broker
    topics = Topics(local.topic_prefix)
    rewritten, starved = agent_ids(local)
    stranger = uuid.uuid4().hex[:12]
    attacker_key = ec.generate_private_key(ec.SECP256R1())
    _, own_certificate, _ = own_ca_certificate(agent_dns_name(rewritten))

    async def body(tarpit: Tarpit) -> None:
        _, real = await capture(local.broker_url, topics.status(rewritten), control_pb2.AgentStatus)

        def rewrite(signed: bool, certificate: bytes | None = None) -> bytes:
            status = copy.deepcopy(real)
            status.endpoint = tarpit.endpoint
            status.updated.CopyFrom(timestamp())
            status.signature = b""
            if certificate is not None:
                status.certificate_fingerprint = fingerprint(certificate)
            if signed:
                sign_message(status, attacker_key)
            return payload(status)

        telemetry = control_pb2.AgentTelemetry(
            schema_version=1,
            agent_id=starved,
            time=timestamp(),
            workers=[control_pb2.WorkerTelemetry(index=0, memory_used=0, memory_limit=1 << 40)],
        )
        messages = [
            (topics.status(stranger), payload(forged_status(stranger, tarpit.endpoint)), True),
            (topics.status(rewritten), rewrite(signed=False), True),
            (topics.status(rewritten), rewrite(signed=True), True),
            (topics.status(rewritten), rewrite(signed=True, certificate=own_certificate), True),
            (topics.telemetry(starved), payload(telemetry), False),
        ]
        async with mqtt(local.broker_url) as client:
            await publish_then_sync(client, topics.root, log, messages * 3)

    with Tarpit() as tarpit:
        run(body(tarpit))
        expected = {
            (stranger, "not an enrolled agent of this pool"),
            (rewritten, "bad or missing signature"),
            (rewritten, "names a certificate other than the enrolled one"),
            (starved, "bad or missing signature"),
        }
        for agent_id, reason in sorted(expected):
            lines = log.dropped(agent_id, reason)
            assert len(lines) == 1, (agent_id, reason, lines)  # one line however many came
            print(lines[0])
        records = registry(local)
        assert stranger not in records
        assert {agent_id: r.status.endpoint for agent_id, r in records.items()} == {
            str(child.ready["agent_id"]): str(child.ready["endpoint"]) for child in local.agents
        }
        assert sum_on_pool(local) == {str(child.ready["endpoint"]) for child in local.agents}
        assert (tarpit.connections, tarpit.bytes_received) == (0, 0)


def revived(log: PoolLog, agent_id: str) -> list[str]:
    """The coordinator's lines showing the agent back from offline (``agent ID (NAME) offline -> X``)."""
    return log.matching(" coordinator ", f"agent {agent_id} (", " offline -> ")


@pytest.mark.parametrize("ending", ["stopped", "killed"])
def test_a_replayed_ready_status_of_a_gone_agent_does_not_revive_it(
    open_broker: tuple[LocalPool, PoolLog], ending: str
) -> None:
    local, log = open_broker
    topics = Topics(local.topic_prefix)
    child = local.add_agent(name=f"replayed-{ending}")
    agent_id = str(child.ready["agent_id"])
    captured, status = run(
        capture(
            local.broker_url, topics.status(agent_id), control_pb2.AgentStatus, lambda s: s.state == READY
        )
    )
    assert status.signature  # a genuine, signed status
    if ending == "stopped":
        local.stop_agent(local.agents.index(child))  # its last status: OFFLINE
    else:
        local.kill_agent(local.agents.index(child))  # the broker publishes its last will
    wait_for(lambda: state_of(local, agent_id) == OFFLINE, within=15, what=f"the {ending} agent offline")

    async def replay() -> None:
        async with mqtt(local.broker_url) as client:
            replays = [(topics.status(agent_id), captured, True), (topics.status(agent_id), captured, False)]
            await publish_then_sync(client, topics.root, log, replays)

    run(replay())
    # The event line, not the state alone: that would turn OFFLINE again after the 3-second liveness window.
    assert not revived(log, agent_id)
    assert state_of(local, agent_id) == OFFLINE
    assert str(child.ready["endpoint"]) not in sum_on_pool(local)


def test_a_forced_or_replayed_last_will_does_not_take_a_live_agent_offline(
    open_broker: tuple[LocalPool, PoolLog],
) -> None:
    """On an open broker anyone may connect with a live agent's client id: the broker drops the agent's
    session and publishes its last will, genuine and signed, which the eavesdropper keeps to replay. The
    coordinator believes an OFFLINE status of an agent it shows alive only once the agent does not answer
    a gRPC Health call (TLS, its enrolled certificate): this one answers, so it stays ready and keeps
    getting work, through the forced will and through replays of it (retained or not)."""
    local, log = open_broker
    topics = Topics(local.topic_prefix)
    child = local.add_agent(name="will-forced")
    agent_id = str(child.ready["agent_id"])
    topic = topics.status(agent_id)
    broker = parse_broker_url(local.broker_url)
    try:

        async def force_will() -> bytes:
            async with mqtt(local.broker_url) as watcher:
                await watcher.subscribe(topic, qos=1)
                await next_message(watcher, topic, control_pb2.AgentStatus, lambda s: s.state == READY)
                try:  # the agent's own client id: the broker hands over the session, and sends the will
                    async with aiomqtt.Client(
                        broker.host, broker.port, identifier=f"gpupool-agent-{agent_id}"
                    ):
                        will, _ = await next_message(
                            watcher, topic, control_pb2.AgentStatus, lambda s: s.state == OFFLINE
                        )
                except aiomqtt.MqttError:
                    pass  # the agent took its session back first
                # The agent reconnects and publishes its status again.
                await next_message(watcher, topic, control_pb2.AgentStatus, lambda s: s.state == READY)
            return will

        will = run(force_will())
        assert log.wait_for(" coordinator ", f"agent {agent_id} (", "but it answers on", "kept ready")

        async def replay() -> None:
            async with mqtt(local.broker_url) as client:
                await publish_then_sync(client, topics.root, log, [(topic, will, False), (topic, will, True)])

        run(replay())
        assert str(child.ready["endpoint"]) in sum_on_pool(local)  # placement still counts on it
        assert state_of(local, agent_id) == READY
        assert not log.matching(" coordinator ", f"agent {agent_id} (", "went offline")
    finally:
        local.stop_agent(local.agents.index(child))


def test_an_empty_status_does_not_make_the_coordinator_forget_an_agent(
    open_broker: tuple[LocalPool, PoolLog],
) -> None:
    local, log = open_broker
    topics = Topics(local.topic_prefix)
    child = local.add_agent(name="erased")
    agent_id = str(child.ready["agent_id"])
    try:

        async def erase() -> None:
            async with mqtt(local.broker_url) as client:
                await publish_then_sync(client, topics.root, log, [(topics.status(agent_id), b"", False)])

        run(erase())
        assert state_of(local, agent_id) == READY  # forgotten, it would be 0: unknown
    finally:
        local.stop_agent(local.agents.index(child))


def test_replayed_telemetry_does_not_revive_a_silent_agent(open_broker: tuple[LocalPool, PoolLog]) -> None:
    local, log = open_broker
    topics = Topics(local.topic_prefix)
    child = local.add_agent(name="silent")
    agent_id = str(child.ready["agent_id"])
    captured, _ = run(capture(local.broker_url, topics.telemetry(agent_id), control_pb2.AgentTelemetry))
    os.kill(child.pid, signal.SIGSTOP)  # hung: its connections stay open, so no last will
    try:
        wait_for(lambda: state_of(local, agent_id) == OFFLINE, within=15, what="the silent agent offline")

        async def replay() -> None:
            async with mqtt(local.broker_url) as client:
                await publish_then_sync(
                    client, topics.root, log, [(topics.telemetry(agent_id), captured, False)]
                )

        run(replay())
        assert not revived(log, agent_id)
        assert state_of(local, agent_id) == OFFLINE
    finally:
        os.kill(child.pid, signal.SIGCONT)
        local.stop_agent(local.agents.index(child))


def test_a_replayed_drain_command_is_ignored(open_broker: tuple[LocalPool, PoolLog]) -> None:
    local, log = open_broker
    topics = Topics(local.topic_prefix)
    child = local.add_agent(name="commanded")
    agent_id = str(child.ready["agent_id"])
    admin = local.coordinator_client()
    try:

        async def eavesdrop() -> bytes:
            async with mqtt(local.broker_url) as client:
                await client.subscribe(topics.commands(agent_id), qos=1)
                await asyncio.to_thread(admin.call, "Drain", coordinator_pb2.AdminRequest(agent_id=agent_id))
                captured, command = await next_message(
                    client, topics.commands(agent_id), control_pb2.AgentCommand
                )
                assert command.kind == control_pb2.COMMAND_KIND_DRAIN
                assert command.signature
                await asyncio.to_thread(
                    admin.call, "Uncordon", coordinator_pb2.AdminRequest(agent_id=agent_id)
                )
                return captured

        captured = run(eavesdrop())
        assert state_of(local, agent_id) == READY

        async def replay() -> None:
            async with mqtt(local.broker_url) as client:
                await client.publish(topics.commands(agent_id), captured, qos=1)

        run(replay())
        wait_for(
            lambda: (
                state_of(local, agent_id) == DRAINING
                or log.matching("gpupool-agent", "ignoring a command on", topics.commands(agent_id))
            ),
            within=10,
            what="the agent to act on the replayed command",
        )
        assert state_of(local, agent_id) == READY
    finally:
        local.stop_agent(local.agents.index(child))


# -- 6. a client killed with SIGKILL: its lease expires ------------------------------------------------------

LEASE_MEMORY = 32 * MiB

KILLED_CLIENT = r"""
import json, sys
import numpy as np
import gpupool as gp

pool = gp.connect(sys.argv[1], token=sys.argv[2])
x = pool.asarray(np.ones((int(sys.argv[3]), 1024), np.float64))
pieces = [[p.agent_id, p.endpoint, p.buffer_id] for p in x.layout]
capabilities = {p[0]: pool._session.capability_metadata(p[0])[0][1] for p in pieces}
print(json.dumps({"session": pool.session, "pieces": pieces, "capabilities": capabilities}), flush=True)
sys.stdin.read()  # until killed
"""


def memory_used(local: LocalPool) -> dict[str, int]:
    """Each agent's bytes in use as the coordinator sees them (its telemetry, else its status)."""
    used = {}
    for agent_id, record in registry(local).items():
        workers = record.telemetry.workers if record.HasField("telemetry") else record.status.workers
        used[agent_id] = sum(w.memory_used for w in workers)
    return used


def read_line(process: subprocess.Popen[str], within: float) -> str:
    assert process.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(within)
    assert lines, f"the client printed nothing within {within:g} s"
    assert lines[0], f"the client printed nothing within {within:g} s (exit code {process.poll()})"
    return lines[0]


def test_a_killed_clients_lease_expires_and_frees_its_memory(tmp_path: Path) -> None:
    with (
        pool_log(tmp_path / "pool.log") as log,
        LocalPool(
            agents=2,
            port=0,
            backend="numpy",
            topic_prefix=new_prefix(),
            memory_limit=str(LEASE_MEMORY),
            coordinator_args=["--lease", "2", "--min-shard-bytes", "0"],
            agent_args=["--heartbeat", "0.5"],
            stderr=log.stream,
        ) as local,
        CoordinatorCalls(local.coordinator_address, local.admin_token) as admin,
    ):
        baseline = memory_used(local)
        rows = int(2 * LEASE_MEMORY * 0.6) // (8 * 1024)  # 60% of the pool
        client = subprocess.Popen(
            [sys.executable, "-c", KILLED_CLIENT, local.coordinator_address, local.client_token, str(rows)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.stream,
            text=True,
        )
        try:
            held = json.loads(read_line(client, 60))
            wait_for(
                lambda: sum(memory_used(local).values()) >= sum(baseline.values()) + rows * 1024 * 8,
                within=10,
                what="the agents to report the client's array",
            )
        finally:
            client.kill()
            client.wait(10)
            assert client.stdin is not None
            assert client.stdout is not None
            client.stdin.close()
            client.stdout.close()
        session = held["session"]

        def ended() -> coordinator_pb2.JobInfo | None:
            jobs = admin.call("ListJobs", coordinator_pb2.ListJobsRequest(all=True)).jobs
            job = next(job for job in jobs if job.job_id == session)
            return job if job.state == "ended" else None

        job = wait_for(ended, within=20, what="the killed client's job to end")
        assert job.ended_reason == "lease expired"
        wait_for(
            lambda: memory_used(local) == baseline, within=15, what="the agents' memory back to its baseline"
        )

        async def dead_capabilities() -> None:
            for agent_id, endpoint, buffer_id in held["pieces"]:
                index = agent_ids(local).index(agent_id)
                async with agent_calls(local, index, held["capabilities"][agent_id]) as agent:
                    assert agent.endpoint == endpoint
                    refusal = await refused(agent.download_raw(buffer_id))
                    assert (refusal.code, refusal.kind) == (UNAUTHENTICATED, "unauthenticated"), refusal

        run(dead_capabilities())
        full = np.ones((int(2 * LEASE_MEMORY * 0.9) // (8 * 1024), 1024))  # 90% of the pool: fits again
        with local.connect() as pool:
            x = pool.asarray(full)
            assert float(x.sum()) == float(full.size)
