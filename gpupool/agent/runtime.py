"""The agent as one component: workers, the gRPC data plane, the MQTT session, telemetry.

Use as ``async with Agent(config) as agent: await agent.run()``; :meth:`Agent.stop` (from a signal
handler) or cancelling :meth:`Agent.run` stops it cleanly: the retained status turns OFFLINE, in-flight
calls get a short grace, then the workers stop.

Drained (unless with ``--no-move``) or paused by its owner (``gpupool-agent pause``, or the pause schedule),
the agent's status asks the coordinator to move its buffers away (``move_request``); the coordinator does it
through ``Inventory``, other agents' ``Pull`` and ``Forward`` (:mod:`gpupool.agent.evacuation`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, TypeVar

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from gpupool._config import parse_endpoint
from gpupool._errors import ConnectError, GpupoolError, ProtocolError, UsageError
from gpupool._proto.v1 import control_pb2
from gpupool._ratelog import RateLimitedLog
from gpupool._version import __version__
from gpupool.agent.buffers import BufferRegistry
from gpupool.agent.bulk import BulkServer
from gpupool.agent.config import AgentConfig
from gpupool.agent.control import ControlServer
from gpupool.agent.discovery import GpuTelemetry
from gpupool.agent.evacuation import CallsInFlight, Evacuation
from gpupool.agent.guard import Guard
from gpupool.agent.measure import measure
from gpupool.agent.peers import Peers
from gpupool.agent.procworker import AnyWorker, ProcessWorker
from gpupool.agent.pull import Puller
from gpupool.agent.schedule import parse_schedule, paused_at
from gpupool.agent.service import AgentService, add_to_server
from gpupool.agent.status import Counters, Identity, build_status, build_telemetry, now
from gpupool.agent.workerproc import FAULT_INJECTION_ENV
from gpupool.agent.workers import WorkerSetup, plan_workers
from gpupool.protocol.codec import decode_json, encode_json
from gpupool.protocol.errors import RpcRefusal
from gpupool.protocol.topics import Topics
from gpupool.security.capability import CapabilityVerifier
from gpupool.security.pki import fingerprint, load_private_key, load_public_key
from gpupool.security.signing import sign_message, verify_message
from gpupool.transport.mqtt import LastWill, MqttSession
from gpupool.transport.rpc import ServerTLS, format_endpoint, start_server
from gpupool.transport.tlssocket import server_context

__all__ = ["Agent", "advertised_host", "format_endpoint"]

log = logging.getLogger(__name__)

T = TypeVar("T")
SignedT = TypeVar("SignedT", control_pb2.AgentStatus, control_pb2.AgentTelemetry)

#: Seconds between measurements of each idle worker process's speed (the first is at its start).
REMEASURE_SECONDS: Final = 600.0
#: Seconds an ended session's capabilities stay refused (the coordinator's capability lifetime).
CAPABILITY_LIFETIME: Final = 600.0
#: Seconds a signed command may be old (by this agent's clock) and still obeyed: commands are never
#: retained, so an older one is a replay; ids seen are refused within this time too.
COMMAND_MAX_AGE: Final = 300.0
#: Seconds after buffers are committed or freed before memory is reported (a burst makes one report), and
#: at least this long after the previous report (an agent busy all the time reports 5 times a second).
FREED_REPORT_DELAY: Final = 0.02
MIN_FREED_REPORT_GAP: Final = 0.2
#: Seconds between looks at the owner's pause schedule (windows are whole minutes).
SCHEDULE_TICK: Final = 10.0

State = control_pb2.AgentState
READY: Final = control_pb2.AGENT_STATE_READY
CORDONED: Final = control_pb2.AGENT_STATE_CORDONED
DRAINING: Final = control_pb2.AGENT_STATE_DRAINING
OFFLINE: Final = control_pb2.AGENT_STATE_OFFLINE

_COMMANDS: Final[dict[int, State]] = {
    control_pb2.COMMAND_KIND_DRAIN: DRAINING,
    control_pb2.COMMAND_KIND_CORDON: CORDONED,
    control_pb2.COMMAND_KIND_UNCORDON: READY,
}

_ANY_INTERFACE: Final = frozenset({"", "0.0.0.0", "::", "[::]"})


def advertised_host(listen_host: str, advertise: str, broker_host: str) -> str:
    """The host clients should dial: ``advertise``, else the listen host, else this machine's address.

    Listening on every interface, the address that routes to the broker is the best guess of one the
    coordinator and clients can reach; the hostname is the last resort.
    """
    if advertise:
        return advertise
    if listen_host not in _ANY_INTERFACE:
        return listen_host
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((broker_host, 9))  # UDP: picks a route, sends nothing
            address = str(probe.getsockname()[0])
            if address and not address.startswith("0."):
                return address
    except OSError:
        pass
    return socket.gethostname()


class Agent:
    """One gpupool agent: discovers its GPUs, registers over MQTT, serves the data plane.

    Args:
        config: what to serve and where.
        setup: the workers, already made (tests, an embedding launcher); made from ``config`` when None.
    """

    def __init__(self, config: AgentConfig, *, setup: WorkerSetup | None = None) -> None:
        self.config = config
        self.agent_id = config.agent_id
        self._setup = setup
        self._topics = Topics(config.topic_prefix)
        self._state: State = READY
        self._counters = Counters()
        self._stop = asyncio.Event()
        self._registered = asyncio.Event()
        self._registry: BufferRegistry | None = None
        self._workers: tuple[AnyWorker, ...] = ()
        self._processes: list[ProcessWorker] = []
        self._measured_at = time.monotonic()  # when the workers' speed was last measured
        self._server: grpc.aio.Server | None = None
        self._bulk: BulkServer | None = None
        self._control: ControlServer | None = None
        self._session: MqttSession | None = None
        self._identity: Identity | None = None
        self._gpu_telemetry: dict[int, GpuTelemetry] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._memory_changed = asyncio.Event()
        self._reported = 0.0  # time.monotonic() of the last telemetry published
        self._status_dirty = False
        self._last_published: tuple[object, ...] = ()
        self._shut_down = False
        self._closed = False
        self._signing_key: ec.EllipticCurvePrivateKey | None = None
        self._fingerprint = ""
        self._coordinator_key: ec.EllipticCurvePublicKey | None = None
        self._verifier: CapabilityVerifier | None = None
        self._peers: Peers | None = None
        self._seen_commands: dict[str, None] = {}  # ids of signed commands applied, oldest first
        self._ignored = RateLimitedLog(log.warning)
        self._evacuation: Evacuation | None = None
        self._move_request = 0  # AgentStatus.move_request while DRAINING to have the buffers moved
        self._paused_by: Literal["owner", "schedule"] | None = None  # who paused it, if its owner's side did
        self._schedule = parse_schedule(config.pause_schedule)

    # lifecycle

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Make the workers and start the gRPC server (MQTT starts with :meth:`run`).

        Raises:
            UsageError: ``--backend cupy`` without CUDA, a bad memory limit, an address we cannot bind.
                Whatever was started by then is stopped again.
        """
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        config = self.config
        label = f"gpupool[{self.agent_id}]"
        if self._setup is None:
            self._setup = await asyncio.to_thread(
                plan_workers, config.backend, config.memory_limit, thread_label=label
            )
        setup = self._setup
        if setup.note:
            log.warning("%s", setup.note)
        for worker in setup.workers:
            model = f" ({worker.gpu.model})" if worker.gpu is not None else ""
            log.info(
                "worker %d: %s%s, memory limit %d bytes",
                worker.index,
                worker.backend.name,
                model,
                worker.memory_limit,
            )
        self._registry = BufferRegistry(
            [worker.memory_limit for worker in setup.workers],
            session_limits=[config.session_limit(worker.memory_limit) for worker in setup.workers],
            on_change=self._note_memory_change,
        )
        if config.worker_processes:
            processes = [
                ProcessWorker(
                    worker,
                    on_lost=self._worker_lost,
                    allow_kernels=config.allow_kernels,
                    fuse_kernels=config.fuse_kernels,
                    faults=os.environ.get(FAULT_INJECTION_ENV) == "1",
                )
                for worker in setup.workers
            ]
            self._processes = processes
            await asyncio.gather(*(process.start() for process in processes))
            self._workers = tuple(processes)
        else:
            self._workers = setup.workers
            for worker in setup.workers:
                worker.measured = await worker.call(measure, worker.backend)
        identity = config.identity
        if identity is not None:
            self._signing_key = load_private_key(identity.key_pem)
            self._fingerprint = fingerprint(identity.certificate_pem)
            self._coordinator_key = load_public_key(identity.capability_key_pem)
            self._verifier = CapabilityVerifier(self._coordinator_key, self.agent_id)
        elif not config.insecure:
            raise UsageError("an agent needs an identity (enrolment) unless it runs --insecure")
        accepting = lambda: self._state in (READY, CORDONED)  # noqa: E731 - given to two servicers
        calls = CallsInFlight()
        self._evacuation = Evacuation(registry=self._registry, calls=calls)
        self._peers = Peers(
            agent_id=self.agent_id,
            coordinator_key=self._coordinator_key,
            ca_pem=identity.ca_pem if identity is not None else None,
            timeouts=config.timeouts,
        )
        puller = Puller(
            workers=self._workers,
            registry=self._registry,
            peers=self._peers,
            counters=self._counters,
            accepting=accepting,
        )
        service = AgentService(
            workers=self._workers,
            registry=self._registry,
            counters=self._counters,
            accepting=accepting,
            status=self.status,
            timeouts=config.timeouts,
            puller=puller,
            allow_kernels=config.allow_kernels,
            allow_python=config.allow_python,
            fuse_kernels=config.fuse_kernels,
            evacuation=self._evacuation,
            calls=calls,
        )
        guard = Guard(self._verifier) if self._verifier is not None else None
        tls = None
        if identity is not None:
            tls = ServerTLS(certificate_pem=identity.certificate_pem, key_pem=identity.key_pem)
        address = format_endpoint(config.listen_host, config.listen_port)
        try:
            self._server, bound = await start_server(
                address,
                lambda server: add_to_server(service, server, guard),
                tls=tls,
                insecure=config.insecure,
                what=f"agent {self.agent_id}",
            )
        except ConnectError as exc:
            raise UsageError(f"cannot listen on {address} (in use, or not an address of this host)") from exc
        port = parse_endpoint(bound)[1]
        if config.control_socket:
            control = ControlServer(Path(config.control_socket), self._owner_command)
            try:
                await control.start()
                self._control = control
                log.info("the rig's owner pauses this agent with gpupool-agent pause (%s)", control.path)
            except OSError as exc:
                log.warning(
                    "no control socket at %s (%s): gpupool-agent pause will not reach this agent",
                    config.control_socket,
                    exc,
                )
        bulk_port = 0
        if config.bulk_port is not None:
            self._bulk = BulkServer(
                read_rows=service.host_rows,
                confine=guard.confine_read if guard is not None else None,
                counters=self._counters,
                timeouts=config.timeouts,
                tls=server_context(tls) if tls is not None else None,
            )
            try:
                bulk_port = await self._bulk.start(config.listen_host, config.bulk_port)
            except OSError as exc:
                raise UsageError(
                    f"cannot listen for the bulk path on port {config.bulk_port} of {config.listen_host}: "
                    f"{exc} (--bulk-port picks another, or off)"
                ) from exc
        host = advertised_host(config.listen_host, config.advertise, config.broker.host)
        self._identity = Identity(
            agent_id=self.agent_id,
            name=config.name,
            version=__version__,
            endpoint=format_endpoint(host, port),
            hostname=socket.gethostname(),
            backend=setup.backend,
            note=setup.note,
            started=now(),
            bulk_port=bulk_port,
            allow_python=config.allow_python,
            temperature_limit=config.max_temperature,
        )
        offline = self.status()
        offline.state = OFFLINE
        self._session = MqttSession(
            broker=config.broker,
            client_id=f"gpupool-agent-{self.agent_id}",
            subscriptions=[self._topics.commands(self.agent_id)],
            on_message=self._on_message,
            on_connect=self._on_connect,
            will=LastWill(self._topics.status(self.agent_id), encode_json(self._signed(offline))),
            timeouts=config.timeouts,
        )
        log.info(
            "agent %s (%s) serves %s with %d %s worker(s)",
            self.agent_id,
            config.name,
            self.endpoint,
            len(setup.workers),
            setup.backend,
        )

    async def run(self) -> None:
        """Register and serve until :meth:`stop` or cancellation; then stop cleanly.

        The MQTT session reconnects by itself after a broker restart and republishes the status.
        """
        session = self._require(self._session)
        label = f"gpupool[{self.agent_id}]"
        async with asyncio.TaskGroup() as group:
            loops = [
                group.create_task(session.run(), name=f"{label}.mqtt"),
                group.create_task(self._telemetry_loop(), name=f"{label}.telemetry"),
            ]
            if self._schedule:
                loops.append(group.create_task(self._schedule_loop(), name=f"{label}.schedule"))
            try:
                await self._stop.wait()
            finally:
                await self._shut_down_network()  # publishes OFFLINE while the session still runs
                for task in loops:
                    task.cancel()

    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from a signal handler)."""
        self._stop.set()

    async def close(self) -> None:
        """Stop serving: OFFLINE status, the gRPC server with a short grace, the workers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        try:
            await self._shut_down_network()
        finally:
            for process in self._processes:
                process.shutdown()
            if self._setup is not None:
                self._setup.close()

    async def _owner_command(self, command: str, wait: float) -> dict[str, object]:
        """``gpupool-agent pause|resume|state`` from the rig itself (:mod:`gpupool.agent.control`): a pause
        waits up to ``wait`` seconds for the coordinator to move the buffers away, and says what moved."""
        evacuation = self._require(self._evacuation)
        if command == "pause":
            await self.apply_command(control_pb2.COMMAND_KIND_DRAIN, "paused by the rig's owner")
            self._paused_by = "owner"
            registry = self._require(self._registry)
            summary = await evacuation.wait(wait) if len(registry) and wait > 0 else evacuation.summary()
            return {"state": self._state_name(), "held": len(registry), **summary.as_dict()}
        if command == "resume":
            await self.apply_command(control_pb2.COMMAND_KIND_UNCORDON, "resumed by the rig's owner")
            self._paused_by = None
        return {"state": self._state_name()}

    def _state_name(self) -> str:
        return str(State.Name(self._state)).removeprefix("AGENT_STATE_").lower()

    async def _schedule_loop(self) -> None:
        """Pause and resume at the edges of the owner's pause schedule (``--pause-schedule``), in local time.

        Only the edges act: the owner may resume inside a window or pause outside one by hand, and the end of
        a window resumes only a pause the schedule made (not an operator's drain, nor the owner's own pause).
        """
        previous: bool | None = None
        while True:
            paused = paused_at(self._schedule, datetime.now())
            if paused != previous:
                if paused and self._state in (READY, CORDONED):
                    await self.apply_command(control_pb2.COMMAND_KIND_DRAIN, "paused by the rig's schedule")
                    self._paused_by = "schedule"
                elif not paused and self._state == DRAINING and self._paused_by == "schedule":
                    await self.apply_command(
                        control_pb2.COMMAND_KIND_UNCORDON, "resumed by the rig's schedule"
                    )
                    self._paused_by = None
                previous = paused
            await asyncio.sleep(SCHEDULE_TICK)

    async def _shut_down_network(self) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        if self._control is not None:
            await self._control.close()
        self._state = OFFLINE
        if self._session is not None:
            final = encode_json(self._signed(self.status()))
            await self._session.close(final=(self._topics.status(self.agent_id), final))
        if self._server is not None:
            await self._server.stop(self.config.shutdown_grace)
        if self._bulk is not None:
            await self._bulk.close()
        if self._peers is not None:
            await self._peers.close()

    async def wait_registered(self) -> None:
        """Wait (without a deadline of its own: the caller bounds it) until the status was first published."""
        await self._registered.wait()

    # what the agent is

    @property
    def endpoint(self) -> str:
        """``host:port`` clients dial for the data plane."""
        return self._require(self._identity).endpoint

    @property
    def backend(self) -> str:
        """``"cupy"`` or ``"numpy"``."""
        return self._require(self._setup).backend

    @property
    def workers(self) -> int:
        """How many workers serve."""
        return len(self._require(self._setup).workers)

    @property
    def state(self) -> State:
        """READY, CORDONED, DRAINING or OFFLINE."""
        return self._state

    def status(self) -> control_pb2.AgentStatus:
        """The status as published now (unsigned; :meth:`_signed` signs a copy to publish)."""
        status = build_status(
            self._require(self._identity),
            self._state,
            self._workers,
            self._require(self._registry),
            self._gpu_telemetry,
        )
        if self._state == DRAINING:
            status.move_request = self._move_request
        return status

    def _signed(self, message: SignedT) -> SignedT:
        """``message`` with the certificate fingerprint (statuses) and this agent's signature, if enrolled."""
        if self._signing_key is None:
            return message
        if isinstance(message, control_pb2.AgentStatus):
            message.certificate_fingerprint = self._fingerprint
        sign_message(message, self._signing_key)
        return message

    async def apply_command(
        self, kind: control_pb2.CommandKind, reason: str = "", *, keep_buffers: bool = False
    ) -> None:
        """Apply DRAIN, CORDON or UNCORDON, then republish the status. A DRAIN asks the coordinator to move
        the buffers away (a new ``move_request`` in the status) unless ``keep_buffers``.

        Raises:
            UsageError: an unknown command kind.
        """
        new = _COMMANDS.get(kind)
        if new is None:
            raise UsageError(f"unknown command kind {kind}")
        if self._state == OFFLINE:
            return
        log.info(
            "command %s%s: %s -> %s",
            control_pb2.CommandKind.Name(kind),
            f" ({reason})" if reason else "",
            State.Name(self._state),
            State.Name(new),
        )
        self._state = new
        if kind == control_pb2.COMMAND_KIND_DRAIN and not keep_buffers:
            self._require(self._evacuation).begin()
            self._move_request = max(self._move_request + 1, int(time.time() * 1000))
        else:
            self._move_request = 0
        await self._publish_status()

    # MQTT

    async def _on_connect(self) -> None:
        await self._publish_status()

    async def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if self._topics.parse(topic) != (self.agent_id, "commands"):
            return  # one pure-Python broker sends retained messages nobody subscribed to
        if retained:
            log.warning("ignoring a retained command on %s (commands are never retained; clear it)", topic)
            return
        try:
            command = decode_json(payload, control_pb2.AgentCommand, what=topic)
            if self._coordinator_key is not None:
                if not verify_message(command, self._coordinator_key):
                    raise ProtocolError("it is not signed by this pool's coordinator")
                if command.agent_id != self.agent_id:
                    raise ProtocolError(f"it is for agent {command.agent_id[:64]!r}")
                self._check_fresh(command)
            if command.kind == control_pb2.COMMAND_KIND_END_SESSION:
                self.end_session(command.session)
            else:
                await self.apply_command(command.kind, command.reason, keep_buffers=command.keep_buffers)
                self._paused_by = None  # the operator's word now
        except (ProtocolError, UsageError) as exc:
            # Anyone on an open broker can send these: one line per kind of refusal a minute.
            self._ignored.emit(type(exc).__name__ + str(exc)[:40], f"ignoring a command on {topic}: {exc}")

    def _check_fresh(self, command: control_pb2.AgentCommand) -> None:
        """Refuse a signed command seen before, or issued too long ago (a replay).

        Raises:
            ProtocolError: a repeated command id, or an issue time more than :data:`COMMAND_MAX_AGE`
                from this agent's clock.
        """
        if command.command_id in self._seen_commands:
            raise ProtocolError(f"command {command.command_id[:32]!r} was applied already (a replay?)")
        age = time.time() - command.issued.ToNanoseconds() / 1e9
        if abs(age) > COMMAND_MAX_AGE:
            raise ProtocolError(f"it was issued {age:.0f} s ago (a replay, or a skewed clock?)")
        self._seen_commands[command.command_id] = None
        while len(self._seen_commands) > 4096:
            del self._seen_commands[next(iter(self._seen_commands))]

    def _worker_lost(self, worker: int, reason: str) -> None:
        """A worker's process died (any thread): its buffers are gone with it."""
        lost = self._require(self._registry).lose_worker(worker, reason)
        self._status_dirty = True
        log.error(
            "%s: %d buffer(s) lost: %s",
            reason,
            len(lost),
            ", ".join(lost[:20]) + (" ..." if len(lost) > 20 else ""),
        )

    def end_session(self, session: str) -> None:
        """Free every buffer of an ended session and refuse its capabilities from now on."""
        if not session:
            raise UsageError("an END_SESSION command names no session")
        registry = self._require(self._registry)
        freed, nbytes = registry.free_session(session)
        registry.drop_forwards(session)
        if self._verifier is not None:
            self._verifier.end_session(session, until=time.time() + CAPABILITY_LIFETIME)
        self._status_dirty = True
        log.info("session %s ended: freed %d buffer(s), %d bytes", session, freed, nbytes)

    async def _publish_status(self) -> None:
        """Publish the retained status; on failure, the telemetry loop retries at its next beat."""
        session = self._require(self._session)
        status = self.status()
        fingerprint = (status.state, *((w.memory_used, w.buffers) for w in status.workers))
        try:
            payload = encode_json(self._signed(status))
            await session.publish(self._topics.status(self.agent_id), payload, retain=True)
        except GpupoolError as exc:
            self._status_dirty = True
            log.warning("status not published (%s); retrying at the next heartbeat", exc)
            return
        self._status_dirty = False
        self._last_published = fingerprint
        self._registered.set()

    def _note_memory_change(self) -> None:
        """Buffers were committed or freed (any thread): report memory soon, not at the next heartbeat,
        so that the coordinator places new arrays by what is really free."""
        loop = self._loop
        # Every program commits and frees: wake the loop only when no report is due yet (reading the flag
        # from another thread is safe; at worst one wake-up too many).
        if loop is not None and not self._memory_changed.is_set():
            loop.call_soon_threadsafe(self._memory_changed.set)

    async def _next_report(self) -> bool:
        """Wait for the next heartbeat, or for memory to change (then a moment more, so that a burst of
        changes makes one report); returns whether it is a heartbeat."""
        try:
            async with asyncio.timeout(self.config.heartbeat):
                await self._memory_changed.wait()
        except TimeoutError:
            return True
        gap = self._reported + MIN_FREED_REPORT_GAP - time.monotonic()
        await asyncio.sleep(max(FREED_REPORT_DELAY, gap))
        self._memory_changed.clear()
        return False

    async def _telemetry_loop(self) -> None:
        """Every heartbeat, and soon after memory changes: publish telemetry (reading the GPUs on
        heartbeats), and the status if it changed."""
        session = self._require(self._session)
        setup = self._require(self._setup)
        self._loop = asyncio.get_running_loop()
        while True:
            heartbeat = await self._next_report()
            if heartbeat and setup.nvml is not None:
                try:
                    async with asyncio.timeout(self.config.heartbeat):
                        self._gpu_telemetry = await asyncio.to_thread(self._read_gpus, setup)
                except TimeoutError:
                    log.warning("NVML did not answer within %.1f s", self.config.heartbeat)
            if not session.connected.is_set() or self._state == OFFLINE:
                continue
            for process in self._processes:
                hits, compiles = await process.kernel_counts()
                self._counters.worker_kernels[process.index] = (hits, compiles)
            if heartbeat and time.monotonic() - self._measured_at > REMEASURE_SECONDS:
                await self._remeasure()
            report = build_telemetry(
                self.agent_id,
                self._workers,
                self._require(self._registry),
                self._gpu_telemetry,
                self._counters,
            )
            try:
                await session.publish(
                    self._topics.telemetry(self.agent_id), encode_json(self._signed(report)), qos=0
                )
                self._reported = time.monotonic()
            except GpupoolError as exc:
                log.debug("telemetry not published: %s", exc)
                continue
            status = self.status()
            fingerprint = (status.state, *((w.memory_used, w.buffers) for w in status.workers))
            if self._status_dirty or fingerprint != self._last_published:
                await self._publish_status()

    async def _remeasure(self) -> None:
        """Measure idle worker processes' speed again (a card slowed by heat, or by its owner's other work,
        gets fewer rows); a busy one waits for the next round."""
        self._measured_at = time.monotonic()
        for process in self._processes:
            if not process.idle():
                continue
            before = process.measured
            try:
                after = await process.remeasure()
            except RpcRefusal as exc:
                log.debug("worker %d not measured again: %s", process.index, exc)
                continue
            if after != before:
                self._status_dirty = True

    @staticmethod
    def _read_gpus(setup: WorkerSetup) -> dict[int, GpuTelemetry]:
        nvml = setup.nvml
        if nvml is None:
            return {}
        return {w.index: nvml.telemetry(w.nvml_index) for w in setup.workers if w.nvml_index is not None}

    @staticmethod
    def _require(value: T | None) -> T:
        if value is None:
            raise RuntimeError("the agent is not started: use `async with Agent(...)` or await start()")
        return value
