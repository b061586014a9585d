"""TLS beyond loopback, forgetting an agent, a blind coordinator, and a malformed reply from an agent."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

import gpupool as gp
from gpupool._config import Timeouts
from gpupool._errors import ConnectError, FrameDecodeError, UsageError
from gpupool._process import Child, spawn
from gpupool._proto.v1 import agent_pb2, coordinator_pb2
from gpupool.broker import free_port
from gpupool.client.channels import AgentChannel
from gpupool.local import LocalPool
from gpupool.security.store import StateStore
from gpupool.transport.coordinator import CoordinatorClient, PoolCredentials
from gpupool.transport.rpc import start_server


def _admin_token(state_dir: Path) -> str:
    with StateStore.open(state_dir) as store:
        return store.create_token(role="admin", name="t", ttl=None, now=time.time())[0]


@contextlib.contextmanager
def _coordinator(state_dir: Path, broker_url: str, *extra: str) -> Iterator[Child]:
    """A coordinator process logging to ``<state_dir>/coordinator.log``."""
    argv = [
        sys.executable,
        "-m",
        "gpupool.coordinator",
        "--broker",
        broker_url,
        "--state-dir",
        str(state_dir),
    ]
    argv += ["--topic-prefix", f"gpupool-test-{uuid.uuid4().hex[:10]}", *extra]
    with (state_dir / "coordinator.log").open("wb") as log:
        child = spawn("coordinator", argv, timeout=30, stderr=log)
        try:
            yield child
        finally:
            child.stop(timeout=10)


def test_beyond_loopback_the_coordinator_serves_tls_or_refuses_plaintext(
    tmp_path: Path, system_broker_url: str
) -> None:
    token = _admin_token(tmp_path)
    # Every interface: beyond loopback, so TLS with a certificate from the pool CA (dialled here on loopback).
    with _coordinator(tmp_path, system_broker_url, "--listen", "0.0.0.0:0") as coordinator:
        port = str(coordinator.ready["listen"]).rsplit(":", 1)[1]
        address = f"127.0.0.1:{port}"
        ca = (tmp_path / "ca.pem").read_bytes()
        request = coordinator_pb2.ListAgentsRequest()
        with CoordinatorClient(PoolCredentials(address=address, token=token, ca_pem=ca)) as client:
            client.call("ListAgents", request)
        with (
            CoordinatorClient(PoolCredentials(address=address, token=token), timeout=3) as plaintext,
            pytest.raises(ConnectError),  # a plaintext client gets nothing from a TLS server
        ):
            plaintext.call("ListAgents", request)
        # The client library takes the CA from $GPUPOOL_CA or ca=... (a path or the PEM bytes).
        with gp.connect(address, token=_client_token(tmp_path), ca=str(tmp_path / "ca.pem")) as pool:
            assert pool.agents() == []


def _client_token(state_dir: Path) -> str:
    with StateStore.open(state_dir) as store:
        return store.create_token(role="client", name="t", ttl=None, now=time.time())[0]


def test_plaintext_beyond_loopback_needs_insecure(tmp_path: Path, system_broker_url: str) -> None:
    async def body() -> None:
        with pytest.raises(UsageError, match="pass --insecure"):
            await start_server("0.0.0.0:0", lambda server: None, tls=None, what="test server")
        server, address = await start_server(
            "0.0.0.0:0", lambda server: None, tls=None, insecure=True, what="test server"
        )
        await server.stop(None)
        assert address.startswith("0.0.0.0:")

    asyncio.run(body())
    token = _admin_token(tmp_path)
    with _coordinator(tmp_path, system_broker_url, "--listen", "0.0.0.0:0", "--insecure") as coordinator:
        port = str(coordinator.ready["listen"]).rsplit(":", 1)[1]
        with CoordinatorClient(PoolCredentials(address=f"127.0.0.1:{port}", token=token)) as client:
            client.call("ListAgents", coordinator_pb2.ListAgentsRequest())
    log = (tmp_path / "coordinator.log").read_text()
    assert "PLAINTEXT" in log
    assert "--insecure" in log


def test_status_and_agents_exit_non_zero_when_the_coordinator_cannot_reach_its_broker(tmp_path: Path) -> None:
    token = _admin_token(tmp_path)
    with _coordinator(tmp_path, f"mqtt://127.0.0.1:{free_port()}", "--listen", "127.0.0.1:0") as coordinator:
        address = str(coordinator.ready["listen"])
        for command in (["status"], ["agents"]):
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "gpupool.cli.main",
                    "--coordinator",
                    address,
                    "--token",
                    token,
                    *command,
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 1, done
            assert "cannot reach its MQTT broker" in done.stderr
            assert len(done.stderr.strip().splitlines()) == 1
            assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def pool_of_two() -> Iterator[LocalPool]:
    with LocalPool(
        agents=2,
        port=0,
        backend="numpy",
        memory_limit="64MiB",
        topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
        coordinator_args=["--min-shard-bytes", "0"],
    ) as local:
        yield local


def test_forget_removes_an_agent_and_its_enrolment(pool_of_two: LocalPool) -> None:
    victim = pool_of_two.agents[1]
    agent_id = str(victim.ready["agent_id"])
    pool_of_two.stop_agent(1)
    admin = pool_of_two.coordinator_client()
    reply = admin.call("Forget", coordinator_pb2.AdminRequest(agent_id=agent_id, reason="rig sold"))
    assert reply.agent.agent_id == agent_id
    listed = admin.call("ListAgents", coordinator_pb2.ListAgentsRequest(include_offline=True))
    assert agent_id not in {r.status.agent_id for r in listed.agents}
    with StateStore.open(pool_of_two.credentials.coordinator_dir) as store:  # type: ignore[union-attr]
        assert store.get_agent(agent_id).revoked is not None  # type: ignore[union-attr]
    # Its state dir still holds the identity, but the pool no longer believes it: restarted, it is not listed.
    back = pool_of_two.add_agent(name=str(victim.ready["name"]), wait=False)
    time.sleep(1.5)  # bounded: a status of the revoked agent would have been applied by now
    listed = admin.call("ListAgents", coordinator_pb2.ListAgentsRequest(include_offline=True))
    assert agent_id not in {r.status.agent_id for r in listed.agents}
    assert back.alive()
    with pool_of_two.connect() as pool:
        x = pool.asarray(np.arange(20.0).reshape(10, 2))
        assert {s.agent_id for s in x.shards} == {pool_of_two.agents[0].ready["agent_id"]}


def test_a_malformed_reply_from_an_agent_is_a_gpupool_error() -> None:
    class Liar:
        async def execute(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            reply = agent_pb2.ExecuteReply()
            reply.fetched.add(buffer_id="b", data=b"\x00" * 3).meta.dtype = "float32"  # 3 bytes for 0-d
            return reply.SerializeToString()

    async def body() -> None:
        liar = Liar()
        handler = grpc.method_handlers_generic_handler(
            "gpupool.v1.Agent", {"Execute": grpc.unary_unary_rpc_method_handler(liar.execute)}
        )
        server, address = await start_server(
            "127.0.0.1:0", lambda s: s.add_generic_rpc_handlers((handler,)), tls=None
        )
        channel = AgentChannel("liar", address, Timeouts())
        try:
            with pytest.raises(FrameDecodeError, match="an Execute reply"):
                await channel.execute(0, [], session="s", fetch=["b"])
        finally:
            await channel.close()
            await server.stop(None)

    asyncio.run(body())
