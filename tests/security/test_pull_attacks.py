"""Attacks on agent-to-agent moves (``Pull`` on the agents, ``PlanMoves`` on the coordinator), by a second
client of the pool holding genuine credentials of its own: a real secure pool of two enrolled agents on the
system broker, raw gRPC as an attacker would send it.

What must hold: a pull reads only the caller's own session's buffers; an agent dials for a pull only the
address the coordinator signed into the source agent's capability, and only if the peer there proves with
a pool-CA certificate that it is the agent named; a capability works only for its own agent and session;
``PlanMoves`` needs a client token that owns the session.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import gpupool as gp
from gpupool._proto.v1 import agent_pb2, coordinator_pb2
from gpupool.client.array import RemoteArray
from gpupool.local import LocalPool
from gpupool.protocol import bulk
from gpupool.protocol.codec import meta_of
from gpupool.protocol.errors import RpcRefusal
from gpupool.protocol.rawstream import DOWNLOAD_RAW, SERVICE
from gpupool.security.capability import issue_capability
from gpupool.security.pki import agent_dns_name
from gpupool.transport.rpc import ServerTLS, start_server
from gpupool.transport.tlssocket import client_context

from .attackers import (
    AgentCalls,
    CoordinatorCalls,
    capability_key,
    create_token,
    foreign_capability,
    own_ca_certificate,
    pool_certificate,
    refused,
    run,
)

ROWS = 8


@pytest.fixture(scope="module")
def local(system_broker_url: str) -> Iterator[LocalPool]:
    with LocalPool(
        agents=2,
        broker_url=system_broker_url,
        port=0,
        topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
        backend="numpy",
        memory_limit=str(32 << 20),
        coordinator_args=["--min-shard-bytes", "0"],
    ) as pool:
        yield pool


@dataclass
class Victim:
    pool: gp.Pool
    data: np.ndarray
    x: RemoteArray

    def piece_on(self, agent_id: str) -> Any:
        return next(piece for piece in self.x.layout if piece.agent_id == agent_id)


@pytest.fixture(scope="module")
def victim(local: LocalPool) -> Iterator[Victim]:
    with local.connect() as pool:
        data = np.arange(2 * ROWS * 4, dtype=np.float64).reshape(2 * ROWS, 4)
        x = pool.asarray(data, rows=[ROWS, ROWS])
        assert len({piece.agent_id for piece in x.layout}) == 2
        yield Victim(pool, data, x)


@dataclass
class Attacker:
    calls: CoordinatorCalls
    session: str
    capabilities: dict[str, str]
    token: str


def agent_ids(local: LocalPool) -> list[str]:
    return [str(child.ready["agent_id"]) for child in local.agents]


def endpoints(local: LocalPool) -> list[str]:
    return [str(child.ready["endpoint"]) for child in local.agents]


def coordinator_dir(local: LocalPool) -> Any:
    assert local.credentials is not None
    return local.credentials.coordinator_dir


def pool_ca(local: LocalPool) -> bytes:
    assert local.credentials is not None
    return local.credentials.ca_path.read_bytes()


@pytest.fixture
def attacker(local: LocalPool) -> Iterator[Attacker]:
    token, _ = create_token(coordinator_dir(local), role="client", name=f"mallory-{uuid.uuid4().hex[:6]}")
    with CoordinatorCalls(local.coordinator_address, token) as calls:
        session = calls.connect().session
        yield Attacker(calls, session, calls.grant(session, agent_ids(local)), token)
        calls.call("Disconnect", coordinator_pb2.DisconnectRequest(session=session))


def pull_request(
    *sources: agent_pb2.PullSource, rows: int = ROWS, session: str = ""
) -> agent_pb2.PullRequest:
    return agent_pb2.PullRequest(
        output=f"loot-{uuid.uuid4().hex[:6]}",
        sources=list(sources),
        expect=meta_of(np.dtype(np.float64), (rows, 4)),
        session=session,
    )


async def pull(local: LocalPool, index: int, capability: str, request: agent_pb2.PullRequest) -> Any:
    """Ask agent ``index`` to pull, showing ``capability`` (the caller's own on that agent)."""
    async with AgentCalls(
        endpoints(local)[index], agent_ids(local)[index], pool_ca(local), capability
    ) as agent:
        return await agent.stub.Pull(request, timeout=30, metadata=agent.metadata)


class Listener:
    """A TCP listener on loopback that counts who connects (what an attacker wants the agent to dial)."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.address = f"127.0.0.1:{self.socket.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.socket.accept()
            except OSError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.socket.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    listening = Listener()
    yield listening
    listening.close()


# -- another session's buffers -------------------------------------------------------------------------------


def test_a_pull_cannot_read_another_sessions_buffer(
    local: LocalPool, victim: Victim, attacker: Attacker
) -> None:
    a, b = agent_ids(local)
    on_a, on_b = victim.piece_on(a), victim.piece_on(b)
    mine_on_a, mine_on_b = attacker.capabilities[a], attacker.capabilities[b]

    async def attempts() -> None:
        for buffer_id in (
            on_a.buffer_id,
            f"{victim.x.session.id}/{on_a.buffer_id}",
            f"../{on_a.buffer_id}",
        ):
            # from the other agent, with the attacker's own genuine capability on it
            source = agent_pb2.PullSource(agent_id=a, buffer_id=buffer_id, stop=ROWS, capability=mine_on_a)
            refusal = await refused(pull(local, 1, mine_on_b, pull_request(source)))
            assert refusal.code == grpc.StatusCode.NOT_FOUND, refusal
            assert refusal.kind == "buffer-not-found", refusal
        # from the pulling agent itself
        local_source = agent_pb2.PullSource(agent_id=b, buffer_id=on_b.buffer_id, stop=ROWS)
        refusal = await refused(pull(local, 1, mine_on_b, pull_request(local_source)))
        assert refusal.code == grpc.StatusCode.NOT_FOUND, refusal
        # naming the victim's session in the request
        source = agent_pb2.PullSource(agent_id=a, buffer_id=on_a.buffer_id, stop=ROWS, capability=mine_on_a)
        refusal = await refused(pull(local, 1, mine_on_b, pull_request(source, session=victim.x.session.id)))
        assert refusal.code == grpc.StatusCode.PERMISSION_DENIED, refusal

    run(attempts())
    np.testing.assert_array_equal(victim.x.get(), victim.data)


def test_a_capability_works_only_for_its_own_agent_and_session(
    local: LocalPool, victim: Victim, attacker: Attacker, listener: Listener
) -> None:
    a, b = agent_ids(local)
    mine_on_b = attacker.capabilities[b]
    with CoordinatorCalls(local.coordinator_address, attacker.token) as calls:
        second = calls.connect().session
        second_on_a = calls.grant(second, [a])[a]
    forged_with_address = issue_capability(
        ec.generate_private_key(ec.SECP256R1()),
        session=attacker.session,
        agent_id=a,
        ttl=600,
        now=time.time(),
        endpoint=listener.address,
    )[0]
    cases = {
        # another agent's capability (the attacker's own, on b) for a source on a
        "another agent's": (a, mine_on_b),
        # a capability of the attacker's other session
        "another session's": (a, second_on_a),
        # signed with a key of the attacker's own (pointing at the attacker's listener)
        "forged": (a, forged_with_address),
        "forged plain": (a, foreign_capability(session=attacker.session, agent_id=a)),
        # an agent id the pool does not have, with a genuine capability for another
        "unknown agent": ("0123456789ab", attacker.capabilities[a]),
    }

    async def attempts() -> None:
        for name, (agent_id, capability) in cases.items():
            source = agent_pb2.PullSource(agent_id=agent_id, buffer_id="x", stop=ROWS, capability=capability)
            refusal = await refused(pull(local, 1, mine_on_b, pull_request(source)))
            assert refusal.code == grpc.StatusCode.PERMISSION_DENIED, (name, refusal)

    run(attempts())
    assert listener.connections == 0


def test_a_pull_dials_no_address_but_the_one_the_coordinator_signed(
    local: LocalPool, victim: Victim, attacker: Attacker, listener: Listener
) -> None:
    a, b = agent_ids(local)
    mine_on_a, mine_on_b = attacker.capabilities[a], attacker.capabilities[b]

    async def attempts() -> None:
        # a genuine capability, and the attacker's address
        source = agent_pb2.PullSource(
            agent_id=a, buffer_id="x", stop=ROWS, capability=mine_on_a, endpoint=listener.address
        )
        refusal = await refused(pull(local, 1, mine_on_b, pull_request(source)))
        assert refusal.code == grpc.StatusCode.PERMISSION_DENIED, refusal
        assert "coordinator" in refusal.details
        # no capability at all, only an address (how an insecure pool names peers)
        source = agent_pb2.PullSource(agent_id=a, buffer_id="x", stop=ROWS, endpoint=listener.address)
        refusal = await refused(pull(local, 1, mine_on_b, pull_request(source)))
        assert refusal.code == grpc.StatusCode.UNAUTHENTICATED, refusal

    run(attempts())
    assert listener.connections == 0


def test_a_peer_that_cannot_prove_it_is_the_agent_gets_no_request(
    local: LocalPool, victim: Victim, attacker: Attacker
) -> None:
    """Even with the coordinator's own signature on a wrong address (a poisoned registry, a hijacked
    endpoint), the pulling agent reads nothing from a server that lacks the pool CA's certificate for the
    agent named: its own CA's certificate for that name, or the pool's for another agent."""
    a, b = agent_ids(local)
    own_ca, own_certificate, own_key = own_ca_certificate(agent_dns_name(a))
    other_certificate, other_key = pool_certificate(coordinator_dir(local), "fedcba987654")
    served: list[str] = []

    async def download_raw(request: bytes, context: Any) -> Any:
        served.append("download")
        yield agent_pb2.ArrayMeta(dtype="float64", shape=[ROWS, 4]).SerializeToString()
        yield np.full((ROWS, 4), 666.0).tobytes()

    def register(server: grpc.aio.Server) -> None:
        handler = grpc.unary_stream_rpc_method_handler(download_raw)
        name = DOWNLOAD_RAW.rsplit("/", 1)[1]
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {name: handler}),))

    async def attempts() -> None:
        for certificate, key in ((own_certificate, own_key), (other_certificate, other_key)):
            tls = ServerTLS(certificate_pem=certificate, key_pem=key)
            server, address = await start_server("127.0.0.1:0", register, tls=tls)
            try:
                signed, _ = issue_capability(
                    capability_key(coordinator_dir(local)),
                    session=attacker.session,
                    agent_id=a,
                    ttl=600,
                    now=time.time(),
                    endpoint=address,
                )
                source = agent_pb2.PullSource(agent_id=a, buffer_id="x", stop=ROWS, capability=signed)
                refusal = await refused(pull(local, 1, attacker.capabilities[b], pull_request(source)))
                assert refusal.code == grpc.StatusCode.UNAVAILABLE, refusal
                assert refusal.kind == "peer-unavailable", refusal
                assert a in refusal.details
            finally:
                await server.stop(None)

    run(attempts(), timeout=120)
    assert served == []
    assert own_ca  # the attacker's CA signed the first certificate, not the pool's


# -- the bulk byte path --------------------------------------------------------------------------------------


def bulk_port(local: LocalPool, index: int) -> int:
    """Agent ``index``'s bulk port, as its status gives it to anyone who asks."""

    async def ask() -> int:
        async with AgentCalls(endpoints(local)[index], agent_ids(local)[index], pool_ca(local)) as agent:
            reply = await agent.stub.Health(agent_pb2.HealthRequest(), timeout=10)
            return int(reply.status.bulk_port)

    port = run(ask())
    assert port > 0
    return port


def bulk_read(local: LocalPool, index: int, buffer_id: str, capability: str) -> np.ndarray | RpcRefusal:
    """Rows 0..ROWS of ``buffer_id`` read straight from agent ``index``'s bulk path over TLS, showing
    ``capability``, as a pulling agent (or an attacker) would."""
    context = client_context(pool_ca(local))
    with (
        socket.create_connection(("127.0.0.1", bulk_port(local, index)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=agent_dns_name(agent_ids(local)[index])) as sock,
    ):
        request = agent_pb2.DownloadRequest(buffer_id=buffer_id, has_rows=True, start=0, stop=ROWS)
        sock.sendall(bulk.encode_request(request, capability))
        reply = bulk.read_reply(sock)
        if isinstance(reply, RpcRefusal):
            return reply
        out = np.empty(tuple(reply.shape), np.dtype(reply.dtype))
        bulk.recv_into(sock, out.reshape(-1).view(np.uint8).data, deadline=time.monotonic() + 30)
        return out


def test_the_bulk_path_reads_only_the_capabilitys_session(
    local: LocalPool, victim: Victim, attacker: Attacker
) -> None:
    a, b = agent_ids(local)
    on_a = victim.piece_on(a)
    session = victim.x.session
    # the victim's own capability reads its rows: the path works, and what follows is refused for cause
    rows = bulk_read(local, 0, on_a.buffer_id, session.capability_token(a))
    assert isinstance(rows, np.ndarray)
    np.testing.assert_array_equal(rows, victim.data[on_a.start : on_a.start + ROWS])
    cases = {
        "the attacker's own capability": (on_a.buffer_id, attacker.capabilities[a], "buffer-not-found"),
        "the victim's session named": (
            f"{session.id}/{on_a.buffer_id}",
            attacker.capabilities[a],
            "buffer-not-found",
        ),
        "no capability": (on_a.buffer_id, "", "unauthenticated"),
        "the victim's capability on the other agent": (
            on_a.buffer_id,
            session.capability_token(b),
            "unauthenticated",
        ),
        "a forged capability": (
            on_a.buffer_id,
            foreign_capability(session=session.id, agent_id=a),
            "unauthenticated",
        ),
    }
    for name, (buffer_id, capability, kind) in cases.items():
        refusal = bulk_read(local, 0, buffer_id, capability)
        assert isinstance(refusal, RpcRefusal), name
        assert refusal.kind == kind, (name, refusal.message)
    np.testing.assert_array_equal(victim.x.get(), victim.data)


def test_the_bulk_path_speaks_only_tls(local: LocalPool, victim: Victim) -> None:
    a = agent_ids(local)[0]
    on_a = victim.piece_on(a)
    request = agent_pb2.DownloadRequest(buffer_id=on_a.buffer_id, has_rows=True, start=0, stop=ROWS)
    with socket.create_connection(("127.0.0.1", bulk_port(local, 0)), timeout=30) as sock:
        sock.sendall(bulk.encode_request(request, victim.x.session.capability_token(a)))
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 16):
                received += chunk
    assert victim.data.tobytes()[:64] not in received
    assert b"M" not in received[:1]  # no meta: the handshake failed and the agent hung up


def test_large_moves_in_a_secure_pool_take_the_bulk_path_intact(local: LocalPool) -> None:
    rows = 1024
    data = np.random.default_rng(7).standard_normal((rows, 512)).astype(np.float32)  # 2 MiB
    with local.connect() as pool:
        x = pool.asarray(data, rows=[rows // 2, rows // 2])
        assert len({piece.agent_id for piece in x.layout}) == 2
        # reshape across the sharded axis makes each agent pull the other's rows (1 MiB halves)
        np.testing.assert_array_equal(x.reshape(512, 1024).get(), data.reshape(512, 1024))
        np.testing.assert_allclose(np.asarray(x.T @ x), data.T @ data, rtol=1e-4, atol=1e-3)


# -- PlanMoves ---------------------------------------------------------------------------------------------


def plan_request(session: str, rows: int = 10) -> coordinator_pb2.PlanMovesRequest:
    return coordinator_pb2.PlanMovesRequest(
        session=session,
        meta=meta_of(np.dtype(np.float32), (rows, 3)),
        sources=[coordinator_pb2.MoveSource(agent_id="0123456789ab", start=0, stop=rows)],
    )


def test_plan_moves_needs_a_client_token_that_owns_the_session(
    local: LocalPool, victim: Victim, attacker: Attacker
) -> None:
    agent_token, _ = create_token(coordinator_dir(local), role="agent", name="rig")
    with CoordinatorCalls(local.coordinator_address, agent_token) as rig:
        refusal = rig.refusal("PlanMoves", plan_request(attacker.session))
        assert refusal.code == grpc.StatusCode.PERMISSION_DENIED, refusal
    with CoordinatorCalls(local.coordinator_address) as stranger:
        refusal = stranger.refusal("PlanMoves", plan_request(attacker.session))
        assert refusal.code == grpc.StatusCode.UNAUTHENTICATED, refusal
    refusal = attacker.calls.refusal("PlanMoves", plan_request(victim.x.session.id))
    assert refusal.code == grpc.StatusCode.PERMISSION_DENIED, refusal
    # sources that do not cover the rows
    short = plan_request(attacker.session, rows=11)
    short.sources[0].stop = 10
    refusal = attacker.calls.refusal("PlanMoves", short)
    assert refusal.code == grpc.StatusCode.INVALID_ARGUMENT, refusal
    # the owner gets a plan: every target row from exactly one source row, capabilities included
    reply = attacker.calls.call("PlanMoves", plan_request(attacker.session))
    assert sum(s.stop - s.start for s in reply.segments) == 10
    assert all(t.capability.token for t in reply.targets)
    assert {t.agent_id for t in reply.targets} <= set(agent_ids(local))
