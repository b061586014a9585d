"""The coordinator as one long-lived component: an MQTT session feeding the registry, and a gRPC server.

Usage::

    async with Coordinator(broker=parse_broker_url(url), listen="0.0.0.0:50051") as coordinator:
        print(coordinator.address)
        await coordinator.run()        # until close(), a signal handler's doing, or cancellation

The registry starts empty and fills from the agents' retained statuses as soon as the session subscribes,
which is how a restarted coordinator learns the pool again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from types import TracebackType
from typing import Self

import grpc

from gpupool._config import MAX_MESSAGE_BYTES, BrokerAddress, Timeouts, parse_endpoint
from gpupool._errors import ConnectError, ProtocolError
from gpupool._proto.v1.control_pb2 import AgentStatus, AgentTelemetry
from gpupool.coordinator.commands import AgentCommander
from gpupool.coordinator.eventlog import EventLog
from gpupool.coordinator.jobs import Jobs
from gpupool.coordinator.registry import Registry, RegistryEvent
from gpupool.coordinator.service import AdminService, CoordinatorService, add_services
from gpupool.placement import MIN_SHARD_BYTES
from gpupool.protocol.codec import decode_json
from gpupool.protocol.topics import Topics
from gpupool.transport.mqtt import MqttSession

__all__ = ["Coordinator"]

log = logging.getLogger(__name__)


class Coordinator:
    """The coordinator: agent registry over MQTT, placement and admin over gRPC.

    Args:
        broker: the MQTT broker the agents report to.
        listen: where the gRPC server listens, ``host:port``; port 0 picks a free one.
        topics: the pool's topic names.
        timeouts: deadlines for the broker connection and admin commands.

    Attributes:
        registry: the agents, as their statuses and telemetry describe them.
        jobs: the client sessions.
        address: where the gRPC server listens, ``host:port`` with the real port, once entered.
    """

    def __init__(
        self,
        *,
        broker: BrokerAddress,
        listen: str = "127.0.0.1:50051",
        topics: Topics = Topics(),
        timeouts: Timeouts = Timeouts(),
        min_shard_bytes: int = MIN_SHARD_BYTES,
    ) -> None:
        self._min_shard_bytes = min_shard_bytes
        self._broker = broker
        self._listen = listen
        self._topics = topics
        self._timeouts = timeouts
        self.registry = Registry()
        self.jobs = Jobs()
        self._events = EventLog(describe=self._describe_registry)
        self._session = MqttSession(
            broker=broker,
            client_id=f"gpupool-coordinator-{secrets.token_hex(4)}",
            subscriptions=(topics.all_of("status"), topics.all_of("telemetry")),
            on_message=self._on_message,
            on_connect=self._on_connect,
            timeouts=timeouts,
        )
        self._commander = AgentCommander(
            registry=self.registry, topics=topics, publish=self._publish, timeout=timeouts.command
        )
        self._server: grpc.aio.Server | None = None
        self._group: asyncio.TaskGroup | None = None
        self._expiries: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self.address = ""

    async def __aenter__(self) -> Self:
        """Start the gRPC server (the MQTT session starts with :meth:`run`).

        Raises:
            UsageError: ``listen`` is not ``host:port``.
            ConnectError: the address cannot be bound.
        """
        host, port = parse_endpoint(self._listen)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # gRPC shares ports by default: a second coordinator on this port would take half the calls.
                ("grpc.so_reuseport", 0),
            ]
        )
        add_services(
            server,
            CoordinatorService(registry=self.registry, jobs=self.jobs, min_shard_bytes=self._min_shard_bytes),
            AdminService(registry=self.registry, commander=self._commander),
        )
        shown_host = f"[{host}]" if ":" in host else host
        try:
            bound = server.add_insecure_port(f"{shown_host}:{port}")
        except RuntimeError as exc:
            raise ConnectError(self._listen, f"cannot listen: {exc}") from exc
        await server.start()
        self._server = server
        self.address = f"{shown_host}:{bound}"
        log.info(
            "coordinator serving on %s; broker %s, topics %s",
            self.address,
            self._broker.url(),
            self._topics.root,
        )
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def run(self) -> None:
        """Serve until :meth:`close` or cancellation; the MQTT session reconnects on its own."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                mqtt = group.create_task(self._session.run(), name="gpupool[coordinator].mqtt")
                await self._stop.wait()
                for task in (mqtt, *self._expiries):
                    task.cancel()
        finally:
            self._group = None

    async def wait_connected(self) -> None:
        """Wait until the MQTT session is subscribed.

        Raises:
            ConnectError: not within the connect deadline.
        """
        await self._session.wait_connected()

    async def close(self) -> None:
        """Stop serving: end :meth:`run`, and stop the gRPC server within a short grace period."""
        self._stop.set()
        await self._session.close()
        self._events.flush()
        server, self._server = self._server, None
        if server is not None:
            try:
                async with asyncio.timeout(5.0):
                    await server.stop(grace=1.0)
            except TimeoutError:
                log.warning("gRPC server did not stop within 5 s")

    async def _on_connect(self) -> None:
        """After a reconnect, give the agents a grace period to be heard from again."""
        if self._session.connects > 1 and self._group is not None:
            task = self._group.create_task(
                self._expire_unseen(time.monotonic()), name="gpupool[coordinator].expire-unseen"
            )
            self._expiries.add(task)
            task.add_done_callback(self._expiries.discard)

    async def _expire_unseen(self, since: float) -> None:
        """Mark offline the agents not heard from since the reconnect at ``since``.

        A restarted broker may have lost both their retained status and their last will: live agents
        republish their status when they reconnect, dead ones say nothing.
        """
        grace = self._timeouts.connect + self._timeouts.heartbeat
        await asyncio.sleep(grace)
        note = f"coordinator: not heard from within {grace:g} s of reconnecting to the broker"
        for event in self.registry.expire_unseen(since, note=note):
            self._events.record(event)
        self._commander.status_applied()

    def _describe_registry(self) -> str:
        counts = self.registry.count_by_state()
        states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        return f"{len(self.registry)} agents known" + (f": {states}" if states else "")

    async def _publish(self, topic: str, payload: bytes) -> None:
        await self._session.publish(topic, payload, qos=1, retain=False)

    async def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """Apply one MQTT message to the registry; a bad payload is logged and skipped."""
        parsed = self._topics.parse(topic)
        if parsed is None:
            return  # another pool's topic, delivered by a broker that ignores subscriptions
        agent_id, channel = parsed
        try:
            events = self._apply(agent_id, channel, payload)
        except ProtocolError as exc:
            log.warning("skipped a message on %s: %s", topic, exc)
            return
        except Exception:
            # A payload that decodes but trips the registry must not take the coordinator down.
            log.exception("skipped a message on %s that could not be applied", topic)
            return
        for event in events:
            self._events.record(event)
        if channel == "status":
            self._commander.status_applied()

    def _apply(self, agent_id: str, channel: str, payload: bytes) -> list[RegistryEvent]:
        now = time.monotonic()
        if channel == "status":
            if not payload:
                return self.registry.forget(agent_id)
            status = decode_json(payload, AgentStatus, what=f"status of agent {agent_id}")
            if not status.agent_id:
                status.agent_id = agent_id
            elif status.agent_id != agent_id:
                raise ProtocolError(f"status on the topic of agent {agent_id} names agent {status.agent_id}")
            return self.registry.apply_status(status, now=now)
        if channel == "telemetry" and payload:
            telemetry = decode_json(payload, AgentTelemetry, what=f"telemetry of agent {agent_id}")
            if not telemetry.agent_id:
                telemetry.agent_id = agent_id
            elif telemetry.agent_id != agent_id:
                raise ProtocolError(
                    f"telemetry names agent {telemetry.agent_id!r} on agent {agent_id!r}'s topic"
                )
            return self.registry.apply_telemetry(telemetry, now=now)
        return []  # commands: ours, echoed by a broker that ignores subscriptions
