"""The coordinator as one long-lived component: an MQTT session feeding the registry, and a gRPC server.

Usage::

    async with Coordinator(broker=parse_broker_url(url), listen="0.0.0.0:50051", state_dir=path) as c:
        print(c.address)
        await c.run()        # until close(), a signal handler's doing, or cancellation

The registry starts empty and fills from the agents' retained statuses as soon as the session subscribes,
which is how a restarted coordinator learns the pool again; tokens, enrolled agents and sessions live in
the state store (``<state-dir>/state.sqlite3``) with the pool CA beside it. Statuses pass
:class:`~gpupool.coordinator.admission.Admission` first. Background loops show silent agents offline
(the liveness window) and end sessions whose lease ran out.

A broker outage does not stop the pool, since the data plane is gRPC: an OFFLINE status of an agent the
registry shows alive (a last will, which a broker that stops cleanly publishes for every agent, live ones
too) is confirmed by asking the agent itself (:class:`~gpupool.coordinator.probe.OfflineProbes`) before
the registry takes it, and silence counts only while the coordinator's own MQTT session is up.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import grpc

from gpupool._config import BrokerAddress, Timeouts, parse_endpoint
from gpupool._errors import GpupoolError
from gpupool._proto.v1 import control_pb2
from gpupool._proto.v1.control_pb2 import AgentCommand
from gpupool._proto.v1.coordinator_pb2 import Evacuation
from gpupool.coordinator.admission import Admission, DropLog, Dropped
from gpupool.coordinator.auth import Authenticator
from gpupool.coordinator.commands import AgentCommander
from gpupool.coordinator.evacuator import Evacuator
from gpupool.coordinator.eventlog import EventLog
from gpupool.coordinator.jobs import DEFAULT_LEASE, Jobs
from gpupool.coordinator.mqttusers import MqttUsers
from gpupool.coordinator.netspeed import NetworkSpeeds
from gpupool.coordinator.probe import OfflineProbes
from gpupool.coordinator.registry import Registry, RegistryEvent
from gpupool.coordinator.service import AdminService, CoordinatorService, add_services
from gpupool.coordinator.trust import DEFAULT_QUARANTINE_AFTER, TrustBook
from gpupool.placement import MIN_SHARD_BYTES
from gpupool.protocol.topics import DYNSEC_RESPONSE_TOPIC, Topics
from gpupool.security.pki import PoolAuthority
from gpupool.security.signing import sign_message
from gpupool.security.store import SessionRecord, StateStore
from gpupool.transport.mqtt import MqttSession
from gpupool.transport.rpc import ServerTLS, is_loopback, start_server

__all__ = ["DEFAULT_LIVENESS", "Coordinator"]

log = logging.getLogger(__name__)

#: Seconds of silence (no status, no telemetry) after which an agent is shown offline.
DEFAULT_LIVENESS: Final = 15.0
#: The state store's key for the agents' verification records (quarantines survive a restart).
TRUST_KEY: Final = "agent-trust"


class Coordinator:
    """The coordinator: agent registry over MQTT, placement, sessions and admin over gRPC.

    Args:
        broker: the MQTT broker the agents report to.
        state_dir: where the state store and the pool CA live (made on first start).
        listen: where the gRPC server listens, ``host:port``; port 0 picks a free one. Beyond loopback
            it serves TLS with a certificate from the pool CA.
        topics: the pool's topic names.
        timeouts: deadlines for the broker connection and admin commands.
        min_shard_bytes: see :func:`gpupool.placement.split_rows`.
        by_speed: share rows by the workers' measured speed (``--placement speed``), not free memory alone.
        lease: seconds a client session lives without a call or heartbeat.
        liveness: seconds of silence after which an agent is shown offline.
        insecure: serve plaintext even beyond loopback.
        allow_unenrolled: believe unsigned statuses of agents that never enrolled (``--insecure`` agents).
        manage_mqtt_users: create an MQTT user per enrolled agent through Mosquitto's dynamic-security
            plugin (the broker URL's user must be its admin).
        tls_hosts: names and addresses to put in the server certificate (the listen host is added).
        quarantine_after: mismatches clients' verification reports before an agent is quarantined.

    Attributes:
        registry: the agents, as their statuses and telemetry describe them.
        trust: clients' verification reports about the agents, and the quarantined ones.
        speeds: the network throughput clients observed to and from each agent.
        jobs: the client sessions.
        store: tokens, enrolled agents, sessions.
        authority: the pool CA and capability key.
        address: where the gRPC server listens, ``host:port`` with the real port, once entered.
    """

    def __init__(
        self,
        *,
        broker: BrokerAddress,
        state_dir: Path,
        listen: str = "127.0.0.1:50051",
        topics: Topics = Topics(),
        timeouts: Timeouts = Timeouts(),
        min_shard_bytes: int = MIN_SHARD_BYTES,
        by_speed: bool = True,
        lease: float = DEFAULT_LEASE,
        liveness: float = DEFAULT_LIVENESS,
        insecure: bool = False,
        allow_unenrolled: bool = False,
        manage_mqtt_users: bool = False,
        tls_hosts: tuple[str, ...] = (),
        quarantine_after: int = DEFAULT_QUARANTINE_AFTER,
    ) -> None:
        self._min_shard_bytes = min_shard_bytes
        self._by_speed = by_speed
        self._broker = broker
        self._listen = listen
        self._topics = topics
        self._timeouts = timeouts
        self._liveness = liveness
        self._insecure = insecure
        self._tls_hosts = tls_hosts
        self.store = StateStore.open(state_dir)
        self.authority = PoolAuthority.load_or_create(state_dir)
        self.registry = Registry()
        self.jobs = Jobs(self.store, lease=lease)
        self.trust = TrustBook(
            quarantine_after=quarantine_after, save=lambda text: self.store.set_meta(TRUST_KEY, text)
        )
        saved = self.store.get_meta(TRUST_KEY)
        for agent_id in self.trust.load(saved) if saved else ():
            self.registry.set_quarantined(agent_id, True)
        self.speeds = NetworkSpeeds()
        self._auth = Authenticator(self.store)
        self._admission = Admission(self.store, allow_unenrolled=allow_unenrolled)
        self._drops = DropLog(log.warning)
        self._events = EventLog(describe=self._describe_registry)
        subscriptions = [topics.all_of("status"), topics.all_of("telemetry")]
        self._users: MqttUsers | None = None
        if manage_mqtt_users:
            self._users = MqttUsers(publish=self._publish, topics=topics)
            subscriptions.append(DYNSEC_RESPONSE_TOPIC)
        self._session = MqttSession(
            broker=broker,
            client_id=f"gpupool-coordinator-{secrets.token_hex(4)}",
            subscriptions=subscriptions,
            on_message=self._on_message,
            on_connect=self._on_connect,
            timeouts=timeouts,
        )
        self._commander = AgentCommander(
            registry=self.registry,
            topics=topics,
            publish=self._publish,
            timeout=timeouts.command,
            sign=self._sign_command,
        )
        self._evacuator = Evacuator(
            registry=self.registry, jobs=self.jobs, authority=self.authority, timeouts=timeouts
        )
        self._service: CoordinatorService | None = None
        self._server: grpc.aio.Server | None = None
        self._group: asyncio.TaskGroup | None = None
        self._expiries: set[asyncio.Task[None]] = set()
        self._probes = OfflineProbes(
            registry=self.registry, ca_pem=self.authority.ca_pem, applied=self._record_applied
        )
        self._connected_at = 0.0  # monotonic time of the MQTT session's latest connect
        self._stop = asyncio.Event()
        self.address = ""

    async def __aenter__(self) -> Self:
        """Start the gRPC server (the MQTT session starts with :meth:`run`).

        Raises:
            UsageError: ``listen`` is not ``host:port``, or plaintext beyond loopback without ``insecure``.
            ConnectError: the address cannot be bound.
        """
        host, _ = parse_endpoint(self._listen)
        tls = None
        if not is_loopback(host) and not self._insecure:
            names = {host, socket.gethostname(), *self._tls_hosts} - {"0.0.0.0", "::", ""}
            certificate, key = self.authority.server_certificate(sorted(names))
            tls = ServerTLS(certificate_pem=certificate, key_pem=key)
        self._service = CoordinatorService(
            registry=self.registry,
            jobs=self.jobs,
            auth=self._auth,
            authority=self.authority,
            store=self.store,
            control=self,
            min_shard_bytes=self._min_shard_bytes,
            by_speed=self._by_speed,
            topic_prefix=self._topics.prefix,
            trust=self.trust,
            speeds=self.speeds,
        )
        admin = AdminService(
            registry=self.registry,
            commander=self._commander,
            auth=self._auth,
            control=self,
            store=self.store,
            trust=self.trust,
        )
        service = self._service

        def register(server: grpc.aio.Server) -> None:
            add_services(server, service, admin)

        self._server, self.address = await start_server(
            self._listen, register, tls=tls, insecure=self._insecure, what="coordinator"
        )
        log.info(
            "coordinator serving on %s (%s); broker %s, topics %s; state in %s",
            self.address,
            "TLS" if tls is not None else "plaintext",
            self._broker.url(),
            self._topics.root,
            self.store.path,
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
                loops = [
                    group.create_task(self._session.run(), name="gpupool[coordinator].mqtt"),
                    group.create_task(self._liveness_loop(), name="gpupool[coordinator].liveness"),
                    group.create_task(self._lease_loop(), name="gpupool[coordinator].leases"),
                ]
                await self._stop.wait()
                self._probes.cancel_all()
                for task in (*loops, *self._expiries):
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
        await self._evacuator.close()
        await self._session.close()
        self._events.flush()
        server, self._server = self._server, None
        if server is not None:
            try:
                async with asyncio.timeout(5.0):
                    await server.stop(grace=1.0)
            except TimeoutError:
                log.warning("gRPC server did not stop within 5 s")
        self.store.close()

    # -- what the servicers ask of the running coordinator (PoolControl) ---------------------------

    def broker_state(self) -> tuple[bool, str]:
        """Whether the MQTT session is up now, and if not, the last error."""
        if self._session.connected.is_set():
            return True, ""
        return (
            False,
            f"the coordinator cannot reach its MQTT broker at {self._broker.url()}: "
            f"{self._session.last_error}",
        )

    async def end_session(self, session: str, *, reason: str) -> SessionRecord:
        """End a session, and tell every agent it touched to free its buffers (best effort).

        Raises:
            PlacementError: no such session.
        """
        record = self.jobs.end(session, reason=reason, now=time.time())
        if self._service is not None:
            self._service.forget_capabilities(session)
        for agent_id in record.agents:
            try:
                await self._commander.end_session(agent_id, session)
            except GpupoolError as exc:
                log.warning("could not tell agent %s that session %s ended: %s", agent_id, session, exc)
        log.info("session %s ended (%s); told %d agent(s)", session, reason, len(record.agents))
        return record

    async def forget_agent(self, agent_id: str) -> None:
        """Drop an agent from the registry, clear its retained topics, revoke its enrolment and MQTT user.

        Raises:
            ConnectError: the broker is unreachable (the retained topics could not be cleared).
        """
        if self.store.get_agent(agent_id) is not None:
            self.store.revoke_agent(agent_id, now=time.time())
        self._admission.forget(agent_id)
        for event in self.registry.forget(agent_id):
            self._events.record(event)
        self.trust.forget(agent_id, now=time.monotonic())
        self.registry.set_quarantined(agent_id, False)
        self.speeds.forget(agent_id)
        await self._session.publish(self._topics.status(agent_id), b"", retain=True)
        await self._session.publish(self._topics.telemetry(agent_id), b"", retain=True)
        if self._users is not None:
            await self._users.delete_agent(agent_id)

    async def create_mqtt_user(self, agent_id: str) -> tuple[str, str]:
        """An MQTT user for a newly enrolled agent, or ("", "") when the broker's users are not managed."""
        if self._users is None:
            return "", ""
        password = secrets.token_urlsafe(24)
        await self._users.ensure_agent(agent_id, password)
        return agent_id, password

    async def evacuate(self, agent_id: str) -> Evacuation:
        """Move a draining agent's buffers to other ready agents (:mod:`gpupool.coordinator.evacuator`)."""
        return await self._evacuator.evacuate(agent_id)

    def _sign_command(self, command: AgentCommand) -> None:
        sign_message(command, self.authority.capability_private_key)

    # -- background loops ---------------------------------------------------------------------------

    async def _liveness_loop(self) -> None:
        """Show offline every agent silent for longer than the liveness window, whatever its status says.

        Only silence while the coordinator's own MQTT session was up counts: during a broker outage no
        agent can be heard, and after a reconnect the grace of :meth:`_expire_unseen` judges first.
        """
        note = f"coordinator: silent for more than {self._liveness:g} s"
        while True:
            await asyncio.sleep(min(1.0, self._liveness / 4))
            if not self._session.connected.is_set() or self._expiries:
                continue  # the silence is ours: the reconnect grace (_expire_unseen) covers it
            if time.monotonic() - self._connected_at < self._liveness:
                continue  # not connected for a whole window yet: an agent's silence may be the outage's
            for event in self.registry.expire_unseen(time.monotonic() - self._liveness, note=note):
                self._events.record(event)
                self._commander.status_applied()

    async def _lease_loop(self) -> None:
        """End the sessions whose lease ran out."""
        while True:
            await asyncio.sleep(min(5.0, max(0.2, self.jobs.lease / 4)))
            for record in self.jobs.expired(now=time.time()):
                try:
                    await self.end_session(record.session_id, reason="lease expired")
                except GpupoolError as exc:
                    log.warning("ending expired session %s: %s", record.session_id, exc)

    async def _on_connect(self) -> None:
        """After a reconnect, give the agents a grace period to be heard from again."""
        self._connected_at = time.monotonic()
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

    def _record_applied(self, events: list[RegistryEvent]) -> None:
        """Log the events of a status applied outside :meth:`_on_message` (a confirmed OFFLINE)."""
        for event in events:
            self._events.record(event)
        self._commander.status_applied()

    def _describe_registry(self) -> str:
        counts = self.registry.count_by_state()
        states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        return f"{len(self.registry)} agents known" + (f": {states}" if states else "")

    async def _publish(self, topic: str, payload: bytes) -> None:
        await self._session.publish(topic, payload, qos=1, retain=False)

    async def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """Apply one MQTT message to the registry; a payload not believed is dropped with a log line."""
        if topic == DYNSEC_RESPONSE_TOPIC:
            if self._users is not None:
                self._users.handle_response(payload)
            return
        parsed = self._topics.parse(topic)
        if parsed is None:
            return  # another pool's topic, delivered by a broker that ignores subscriptions
        agent_id, channel = parsed
        try:
            events = self._apply(agent_id, channel, payload)
        except Dropped as dropped:
            self._drops.record(dropped)
            return
        except Exception:
            # A payload that decodes but trips the registry must not take the coordinator down.
            log.exception("skipped a message on %s that could not be applied", topic)
            return
        for event in events:
            self._events.record(event)
        if channel == "status":
            self._commander.status_applied()
            self._evacuator.status_applied(agent_id)  # a drained or paused agent may ask for moves

    def _apply(self, agent_id: str, channel: str, payload: bytes) -> list[RegistryEvent]:
        now = time.monotonic()
        if channel == "status":
            if not payload:
                self._admission.check_forgettable(agent_id)  # only `gpupool forget` removes an enrolled agent
                self._admission.forget(agent_id)
                self._probes.cancel(agent_id)
                return self.registry.forget(agent_id)
            status = self._admission.status(agent_id, payload)
            self._probes.cancel(agent_id)  # the agent's newer word settles what a probe was asking
            offline = status.state == control_pb2.AGENT_STATE_OFFLINE
            if offline and self._group is not None and self._probes.start(self._group, status):
                return []  # applied once the agent does not answer (OfflineProbes)
            return self.registry.apply_status(status, now=now)
        if channel == "telemetry" and payload:
            return self.registry.apply_telemetry(self._admission.telemetry(agent_id, payload), now=now)
        return []  # commands: ours, echoed by a broker that ignores subscriptions
