"""The coordinator's gRPC servicers: ``gpupool.v1.Coordinator`` for clients and agents, ``gpupool.v1.Admin``.

Every handler needs a bearer token of the right role (:func:`gpupool.coordinator.auth.requires`).
Handlers refuse a call by raising :class:`RpcRefusal`, which becomes a status code with the
``gpupool-error`` kind the client translates back (see :mod:`gpupool.protocol.errors`). What needs the
network (telling agents a session ended, forgetting an agent) is done by the runtime, through
:class:`PoolControl`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from typing import Any, Protocol

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from gpupool._errors import (
    AgentNotAccepting,
    AuthError,
    ConnectError,
    DeadlineExceeded,
    GpupoolError,
    NoCapacity,
    PlacementError,
    UsageError,
)
from gpupool._ids import new_agent_id
from gpupool._proto.v1 import control_pb2, coordinator_pb2_grpc
from gpupool._proto.v1.control_pb2 import CommandKind
from gpupool._proto.v1.coordinator_pb2 import (
    AdminReply,
    AdminRequest,
    AgentTrust,
    Capability,
    ConnectReply,
    ConnectRequest,
    DisconnectReply,
    DisconnectRequest,
    EndJobReply,
    EndJobRequest,
    EnrolReply,
    EnrolRequest,
    Evacuation,
    GrantReply,
    GrantRequest,
    JobInfo,
    ListAgentsReply,
    ListAgentsRequest,
    ListJobsReply,
    ListJobsRequest,
    PlaceReply,
    PlaceRequest,
    PlanMovesReply,
    PlanMovesRequest,
    RenewReply,
    RenewRequest,
    ReportVerificationReply,
    ReportVerificationRequest,
)
from gpupool._version import __version__
from gpupool.coordinator.auth import Authenticator, requires
from gpupool.coordinator.commands import AgentCommander
from gpupool.coordinator.jobs import Jobs
from gpupool.coordinator.netspeed import NetworkSpeeds
from gpupool.coordinator.registry import Registry, state_name
from gpupool.coordinator.trust import TrustBook, TrustRecord
from gpupool.moves import Span, plan_moves
from gpupool.placement import MIN_SHARD_BYTES, agents_without_backend, split_rows
from gpupool.protocol.codec import check_dtype, shape_of
from gpupool.protocol.errors import RpcRefusal
from gpupool.security.capability import issue_capability
from gpupool.security.pki import PoolAuthority, fingerprint
from gpupool.security.store import SessionRecord, StateStore, TokenRecord

__all__ = ["CAPABILITY_TTL", "AdminService", "CoordinatorService", "PoolControl", "add_services"]

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

#: Seconds a capability is valid; clients refresh theirs (Grant) when less than half is left.
CAPABILITY_TTL = 600.0

#: Most source shards one PlanMoves call may name (the plan's work grows with them).
MAX_MOVE_SOURCES = 65536

#: Most per-agent throughput figures one Renew may carry (more are ignored).
MAX_OBSERVED = 1024

#: Longest a placement that found no room waits for reports of memory placed but not yet reported (agents
#: report within a heartbeat, and at once after they free buffers), and how often it looks.
CAPACITY_WAIT = 3.0
CAPACITY_POLL = 0.01


class PoolControl(Protocol):
    """What the servicers need from the running coordinator beyond pure state."""

    def broker_state(self) -> tuple[bool, str]:
        """Whether the MQTT session is up, and why not."""
        ...

    async def end_session(self, session: str, *, reason: str) -> SessionRecord:
        """End a session and tell its agents to free its buffers."""
        ...

    async def forget_agent(self, agent_id: str) -> None:
        """Drop an agent from the registry, clear its retained topics, revoke its enrolment."""
        ...

    async def create_mqtt_user(self, agent_id: str) -> tuple[str, str]:
        """MQTT username and password for a newly enrolled agent ("", "" when none are managed)."""
        ...

    async def evacuate(self, agent_id: str) -> Evacuation:
        """Move a draining agent's buffers to other ready agents, agent to agent; what moved where."""
        ...


def _job_info(record: SessionRecord) -> JobInfo:
    info = JobInfo(
        job_id=record.session_id,
        client=record.client,
        started=_timestamp(record.started),
        state=record.state,
        arrays_placed=record.arrays_placed,
        bytes_placed=record.bytes_placed,
        ended_reason=record.ended_reason,
        renewed=_timestamp(record.renewed),
        token_name=record.token_name,
    )
    return info


def _trust(record: TrustRecord) -> AgentTrust:
    return AgentTrust(
        checks=record.checks,
        mismatches=record.mismatches,
        score=record.score,
        quarantined=record.quarantined,
        reason=record.reason,
    )


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    """The client API (sessions, the agent list, placement, jobs, capabilities) and agents' enrolment.

    Args:
        registry: the agents the coordinator knows.
        jobs: the client sessions.
        auth: checks callers' tokens.
        authority: the pool CA and the capability key.
        store: enrolled agents.
        control: the running coordinator.
        min_shard_bytes: the smallest shard worth a worker of its own (see :func:`split_rows`).
        by_speed: share rows by the workers' measured speed within their free memory (else by free memory).
        topic_prefix: told to enrolling agents.
        trust: clients' verification reports and the quarantined agents (kept in step with the registry).
        speeds: the network throughput clients observed per agent.
    """

    def __init__(
        self,
        *,
        registry: Registry,
        jobs: Jobs,
        auth: Authenticator,
        authority: PoolAuthority,
        store: StateStore,
        control: PoolControl,
        min_shard_bytes: int = MIN_SHARD_BYTES,
        by_speed: bool = True,
        topic_prefix: str = "gpupool",
        trust: TrustBook | None = None,
        speeds: NetworkSpeeds | None = None,
    ) -> None:
        self._registry = registry
        self._trust = trust if trust is not None else TrustBook()
        self._speeds = speeds if speeds is not None else NetworkSpeeds()
        self._jobs = jobs
        self._auth = auth
        self._authority = authority
        self._store = store
        self._control = control
        self._min_shard_bytes = min_shard_bytes
        self._by_speed = by_speed
        self._topic_prefix = topic_prefix
        self._capabilities: dict[tuple[str, str], tuple[str, float, str]] = {}

    def _session(self, session: str, caller: TokenRecord) -> SessionRecord:
        try:
            return self._jobs.running(session, caller, now=time.time())
        except AuthError as exc:
            raise RpcRefusal("permission-denied", str(exc)) from exc
        except PlacementError as exc:
            raise RpcRefusal("unknown-session", str(exc)) from exc

    def _capability(self, session: str, agent_id: str, *, now: float) -> Capability | None:
        """A capability for the session on the agent; None for an agent that takes none (not enrolled).

        It carries the agent's endpoint as the registry has it now: an agent pulling rows for the session
        from this one dials that address and no other (see ``Pull`` in ``protos/gpupool/v1/agent.proto``).
        """
        entry = self._registry.get(agent_id)
        if entry is None or not entry.status.certificate_fingerprint:
            return None
        endpoint = entry.status.endpoint
        cached = self._capabilities.get((session, agent_id))
        if cached is None or cached[1] - now < CAPABILITY_TTL / 2 or cached[2] != endpoint:
            token, expires = issue_capability(
                self._authority.capability_private_key,
                session=session,
                agent_id=agent_id,
                ttl=CAPABILITY_TTL,
                now=now,
                endpoint=endpoint,
            )
            cached = (token, expires, endpoint)
            if len(self._capabilities) > 100_000:
                self._capabilities.clear()
            self._capabilities[(session, agent_id)] = cached
        return Capability(agent_id=agent_id, token=cached[0], expires=cached[1])

    def forget_capabilities(self, session: str) -> None:
        """Drop cached capabilities of an ended session, and what it was placed on."""
        for key in [key for key in self._capabilities if key[0] == session]:
            del self._capabilities[key]
        self._trust.session_ended(session)

    @requires("client")
    async def Connect(self, request: ConnectRequest, context: Context, caller: TokenRecord) -> ConnectReply:
        """Start a session (a job) for a client."""
        job = self._jobs.connect(caller, request.client, request.client_version, now=time.time())
        ready = self._registry.count_by_state().get("ready", 0)
        log.info(
            "job %s started by %r with token %s (gpupool %r)",  # %r: a client's words cannot forge log lines
            job.session_id,
            job.client[:128],
            caller.token_id,
            request.client_version[:32] or "?",
        )
        return ConnectReply(
            session=job.session_id,
            coordinator_version=__version__,
            ready_agents=ready,
            ca_certificate=self._authority.ca_pem.decode(),
            lease_seconds=self._jobs.lease,
        )

    @requires("client")
    async def Disconnect(
        self, request: DisconnectRequest, context: Context, caller: TokenRecord
    ) -> DisconnectReply:
        """End a session; ending it twice is not an error."""
        try:
            self._jobs.get(request.session, caller)
        except AuthError as exc:
            raise RpcRefusal("permission-denied", str(exc)) from exc
        except PlacementError as exc:
            raise RpcRefusal("unknown-session", str(exc)) from exc
        job = await self._control.end_session(
            request.session, reason="disconnected"
        )  # drops its capabilities
        log.info(
            "job %s ended: %d arrays, %d bytes placed", job.session_id, job.arrays_placed, job.bytes_placed
        )
        return DisconnectReply()

    @requires("client")
    async def Renew(self, request: RenewRequest, context: Context, caller: TokenRecord) -> RenewReply:
        """Renew the session's lease and take in the throughput it observed; the reply names the agents
        now offline."""
        record = self._session(request.session, caller)
        if request.observed:
            # Only figures for agents the session was placed on or granted: a client's word about others
            # would be hearsay.
            used = set(record.agents)
            for observed in request.observed[:MAX_OBSERVED]:
                if observed.agent_id in used:
                    self._speeds.observe(observed.agent_id, observed.bytes, observed.seconds)
        offline = [
            entry.agent_id
            for entry in self._registry.agents()
            if entry.state == control_pb2.AGENT_STATE_OFFLINE
        ]
        return RenewReply(lease_seconds=self._jobs.lease, offline_agents=offline)

    @requires("client")
    async def Grant(self, request: GrantRequest, context: Context, caller: TokenRecord) -> GrantReply:
        """Capabilities for the session on the agents named."""
        self._session(request.session, caller)
        now = time.time()
        reply = GrantReply()
        granted = []
        for agent_id in request.agent_ids:
            capability = self._capability(request.session, agent_id, now=now)
            if capability is None:
                raise RpcRefusal("unknown-agent", f"agent {agent_id} is not an enrolled agent of this pool")
            reply.capabilities.append(capability)
            granted.append(agent_id)
        self._jobs.add_agents(request.session, granted)
        return reply

    @requires("client")
    async def ListAgents(
        self, request: ListAgentsRequest, context: Context, caller: TokenRecord
    ) -> ListAgentsReply:
        """The known agents, offline ones only if asked for, and whether the broker is reachable."""
        now = time.monotonic()
        connected, detail = self._control.broker_state()
        reply = ListAgentsReply(broker_connected=connected, broker_detail=detail)
        # add() and CopyFrom: a third of the time of building AgentRecords and copying them in.
        add = reply.agents.add
        for entry in self._registry.agents():
            if request.include_offline or entry.state != control_pb2.AGENT_STATE_OFFLINE:
                record = add(
                    seconds_since_seen=now - entry.last_seen,
                    network_bytes_per_second=self._speeds.get(entry.agent_id),
                )
                record.status.CopyFrom(entry.status)
                if entry.telemetry is not None:
                    record.telemetry.CopyFrom(entry.telemetry)
                trust = self._trust.get(entry.agent_id)
                if trust.checks or trust.quarantined:
                    record.trust.CopyFrom(_trust(trust))
        return reply

    @requires("client")
    async def ReportVerification(
        self, request: ReportVerificationRequest, context: Context, caller: TokenRecord
    ) -> ReportVerificationReply:
        """Count a client's verdict on an agent's result; quarantine the agent at the mismatch limit."""
        self._session(request.session, caller)
        try:
            verdict = self._trust.report(
                request.session,
                request.agent_id,
                request.reference_agent_id,
                agreed=request.agreed,
                detail=request.detail,
                now=time.monotonic(),
            )
        except UsageError as exc:
            raise RpcRefusal("bad-request", str(exc)) from exc
        except AuthError as exc:
            raise RpcRefusal("permission-denied", str(exc)) from exc
        if not request.agreed:
            log.warning(
                "session %s: agent %s disagreed with agent %s%s: %r",
                request.session,
                request.agent_id,
                request.reference_agent_id,
                "" if verdict.counted else " (over the session's limit, not counted)",
                request.detail[:256],
            )
        if verdict.quarantined is not None:
            self._registry.set_quarantined(request.agent_id, True)
            log.warning(
                "agent %s quarantined: %s (`gpupool uncordon %s` takes it back)",
                request.agent_id,
                verdict.quarantined.reason,
                request.agent_id,
            )
        return ReportVerificationReply(
            trust=_trust(verdict.trust), counted=verdict.counted, note=verdict.note
        )

    @requires("client")
    async def Place(self, request: PlaceRequest, context: Context, caller: TokenRecord) -> PlaceReply:
        """Row shards for a new array over the ready agents' workers, by free memory, with capabilities."""
        self._session(request.session, caller)
        exclude = list(request.exclude_agents)
        if request.backend:
            exclude += self._without_backend(request.backend, exclude)
        return await self._place_waiting(request.session, request, exclude)

    def _without_backend(self, backend: str, excluded: list[str]) -> list[str]:
        """The agents that do not run ``backend`` (for Place's ``backend``).

        Raises:
            RpcRefusal: bad-request for an unknown backend; no-agents when no ready agent runs it.
        """
        agents = self._registry.agents()
        try:
            without = agents_without_backend(
                ((e.agent_id, e.status.backend, [w.backend for w in e.status.workers]) for e in agents),
                backend,
            )
        except PlacementError as exc:
            raise RpcRefusal("bad-request", str(exc)) from exc
        if not self._registry.ready(exclude=[*excluded, *without]):
            ready = self._registry.ready(exclude=excluded)
            kinds = {e.agent_id: e.status.backend or "unknown" for e in agents}
            listed = sorted({kinds[a] for a in ready.agent_ids})
            others = f" (the ready agents run {', '.join(listed)})" if listed else ""
            need = "; user kernels run only on agents whose workers run CuPy (a GPU with CUDA)"
            raise RpcRefusal(
                "no-agents",
                f"no ready agent runs the {backend} backend{others}" + (need if backend == "cupy" else ""),
            )
        return without

    async def _place_waiting(
        self, session: str, request: PlaceRequest | PlanMovesRequest, exclude: list[str]
    ) -> PlaceReply:
        """:meth:`_place`; where there is no room but some of the room is taken by recent placements the
        agents have not reported yet (an array uploaded and freed a moment ago), wait for their next
        reports, up to :data:`CAPACITY_WAIT` seconds, and try again each time one arrives."""
        deadline = time.monotonic() + CAPACITY_WAIT
        while True:
            try:
                return self._place(session, request, exclude)
            except RpcRefusal as refusal:
                ready = self._registry.ready(exclude=exclude)
                if refusal.kind != "no-capacity" or not ready or not self._registry.unreported(ready):
                    raise
                reports = self._registry.reports
                while self._registry.reports == reports:
                    if time.monotonic() >= deadline:
                        raise
                    await asyncio.sleep(CAPACITY_POLL)

    @requires("client")
    async def PlanMoves(
        self, request: PlanMovesRequest, context: Context, caller: TokenRecord
    ) -> PlanMovesReply:
        """A new placement for a resident array's rows, and where each target row comes from.

        The targets are placed as :meth:`Place` places a new array (by free memory, reserved, with
        capabilities); :func:`gpupool.moves.plan_moves` says which source fills which target rows, so
        rows whose agent stays the same are copied where they are and only the others move.
        """
        self._session(request.session, caller)
        if len(request.sources) > MAX_MOVE_SOURCES:
            raise RpcRefusal("bad-request", f"PlanMoves takes at most {MAX_MOVE_SOURCES} sources")
        reply = PlanMovesReply()
        placed = await self._place_waiting(request.session, request, list(request.exclude_agents))
        reply.targets.extend(placed.shards)
        source = [
            Span(agent_id=s.agent_id, worker=s.worker, start=s.start, stop=s.stop) for s in request.sources
        ]
        target = [
            Span(agent_id=t.agent_id, worker=t.worker, start=t.start, stop=t.stop) for t in placed.shards
        ]
        try:
            segments = plan_moves(source, target)
        except PlacementError as exc:
            raise RpcRefusal("bad-request", f"the sources do not cover the array's rows: {exc}") from exc
        add = reply.segments.add
        for segment in segments:
            add(
                target=segment.target,
                source=segment.source,
                start=segment.start,
                stop=segment.stop,
                moved=segment.moved,
            )
        return reply

    def _place(
        self, session: str, request: PlaceRequest | PlanMovesRequest, exclude: list[str]
    ) -> PlaceReply:
        """Place the rows of the array ``request.meta`` describes (for :meth:`Place` and :meth:`PlanMoves`).

        Raises:
            RpcRefusal: bad-request (no or a malformed meta), no-agents, no-capacity.
        """
        if not request.HasField("meta"):
            raise RpcRefusal("bad-request", "Place needs the array's meta (dtype and shape)")
        try:
            dtype = check_dtype(request.meta.dtype)
        except UsageError as exc:
            raise RpcRefusal("bad-request", str(exc)) from exc
        shape = shape_of(request.meta)
        if any(n < 0 for n in shape):
            raise RpcRefusal("bad-request", f"negative dimension in shape {list(shape)}")
        rows = shape[0] if shape else 1  # a 0-d array is one row of one element
        row_bytes = dtype.itemsize * math.prod(shape[1:])
        # Over every ready worker of the pool on each call: the work per worker is kept to a few list
        # operations (split_rows on the registry's ready list, kept between calls).
        ready = self._registry.ready(exclude=exclude)
        if not ready:
            raise RpcRefusal("no-agents", self._why_no_agents(len(exclude)))
        try:
            split = split_rows(
                rows,
                row_bytes,
                ready.free,
                min_shard_bytes=self._min_shard_bytes,
                speed=ready.speed_for(dtype.name) if self._by_speed else None,
            )
        except NoCapacity as exc:
            extra = {
                "needed": str(exc.needed),
                "available": str(exc.available),
                "workers": str(exc.ready_workers),
            }
            raise RpcRefusal("no-capacity", str(exc), extra=extra) from exc
        except PlacementError as exc:
            raise RpcRefusal("bad-request", str(exc)) from exc
        self._registry.reserve_split(ready, split, row_bytes)
        reply = PlaceReply()
        add = reply.shards.add
        agent_ids, endpoints, workers = ready.agent_ids, ready.endpoints, ready.workers
        now = time.time()
        capabilities: dict[str, Capability | None] = {}
        for position, start, stop in split:
            shard = add()  # then plain assignments: the quickest way to fill a repeated field here
            agent_id = agent_ids[position]
            shard.agent_id = agent_id
            shard.endpoint = endpoints[position]
            shard.worker = workers[position]
            shard.start = start
            shard.stop = stop
            if agent_id not in capabilities:
                capabilities[agent_id] = self._capability(session, agent_id, now=now)
            capability = capabilities[agent_id]
            if capability is not None:
                shard.capability.CopyFrom(capability)
        self._jobs.record_placement(session, rows * row_bytes, capabilities)
        self._trust.placed(session, capabilities)
        return reply

    @requires("client")
    async def ListJobs(
        self, request: ListJobsRequest, context: Context, caller: TokenRecord
    ) -> ListJobsReply:
        """Sessions oldest first: the caller's own, or every one for an admin asking for all."""
        if request.all and caller.role != "admin":
            raise RpcRefusal("permission-denied", "listing every session needs an admin token")
        return ListJobsReply(
            jobs=[_job_info(job) for job in self._jobs.list(caller, all_sessions=request.all)]
        )

    @requires("agent")
    async def Enrol(self, request: EnrolRequest, context: Context, caller: TokenRecord) -> EnrolReply:
        """Sign an agent's certificate request: its id from now on, and how it reaches the broker."""
        agent_id = new_agent_id()
        try:
            certificate = self._authority.sign_agent_csr(request.csr_pem, agent_id=agent_id)
        except (AuthError, UsageError, ValueError) as exc:
            raise RpcRefusal("bad-request", f"certificate request refused: {exc}") from exc
        name = request.name[:128] or agent_id
        try:
            username, password = await self._control.create_mqtt_user(agent_id)
        except GpupoolError as exc:
            raise RpcRefusal("broker-unavailable", f"cannot create the agent's MQTT user: {exc}") from exc
        self._store.enrol_agent(
            agent_id=agent_id,
            name=name,
            certificate_pem=certificate,
            fingerprint=fingerprint(certificate),
            token_id=caller.token_id,
            now=time.time(),
        )
        log.info("enrolled agent %s (%s) with token %s", agent_id, name, caller.token_id)
        return EnrolReply(
            agent_id=agent_id,
            certificate_pem=certificate,
            ca_certificate_pem=self._authority.ca_pem,
            capability_key_pem=self._authority.capability_public_pem,
            mqtt_username=username,
            mqtt_password=password,
            topic_prefix=self._topic_prefix,
        )

    def _why_no_agents(self, excluded: int) -> str:
        counts = self._registry.count_by_state()
        if not counts:
            return "no ready agents: no agent has registered with the coordinator"
        known = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        detail = f"; {excluded} excluded by the request" if excluded else ""
        quarantined = self._registry.quarantined_ready()
        if quarantined:
            detail += f"; {quarantined} quarantined for wrong answers (`gpupool uncordon` takes one back)"
        hot = self._registry.hot_workers()
        if hot:
            detail += f"; {hot} worker(s) of ready agents over their temperature limit, cooling"
        return f"no ready agents: {sum(counts.values())} known ({known}){detail}"


class AdminService(coordinator_pb2_grpc.AdminServicer):
    """The operator API: drain, cordon, uncordon and forget an agent; end a job. Admin tokens only.

    Args:
        registry: the agents the coordinator knows, to resolve the agent named.
        commander: sends the command and waits for its confirmation.
        auth: checks callers' tokens.
        control: the running coordinator.
        store: enrolled agents (to forget one the registry no longer knows).
        trust: clients' verification reports; uncordoning a quarantined agent takes it back.
    """

    def __init__(
        self,
        *,
        registry: Registry,
        commander: AgentCommander,
        auth: Authenticator,
        control: PoolControl,
        store: StateStore,
        trust: TrustBook | None = None,
    ) -> None:
        self._registry = registry
        self._commander = commander
        self._auth = auth
        self._control = control
        self._store = store
        self._trust = trust if trust is not None else TrustBook()

    @requires("admin")
    async def Drain(self, request: AdminRequest, context: Context, caller: TokenRecord) -> AdminReply:
        """Take no new shards or uploads; move what the agent holds to other ready agents (unless
        ``no_move``: then serve it there), and say what moved where (:mod:`gpupool.coordinator.evacuator`)."""
        reply = await self._command(request, control_pb2.COMMAND_KIND_DRAIN, keep_buffers=request.no_move)
        if not request.no_move:
            reply.evacuation.CopyFrom(await self._control.evacuate(reply.agent.agent_id))
        return reply

    @requires("admin")
    async def Cordon(self, request: AdminRequest, context: Context, caller: TokenRecord) -> AdminReply:
        """Take no new shards; keep serving."""
        return await self._command(request, control_pb2.COMMAND_KIND_CORDON)

    @requires("admin")
    async def Uncordon(self, request: AdminRequest, context: Context, caller: TokenRecord) -> AdminReply:
        """Back to READY; a quarantined agent is taken back too, with a clean verification record."""
        reply = await self._command(request, control_pb2.COMMAND_KIND_UNCORDON)
        agent_id = reply.agent.agent_id
        released = self._trust.release(agent_id, now=time.monotonic())
        if released is not None:
            self._registry.set_quarantined(agent_id, False)
            log.info(
                "agent %s taken back from quarantine (%d of %d checks had disagreed)",
                agent_id,
                released.mismatches,
                released.checks,
            )
        return reply

    @requires("admin")
    async def Forget(self, request: AdminRequest, context: Context, caller: TokenRecord) -> AdminReply:
        """Remove an agent: registry, retained topics, enrolment (it must enrol again to rejoin)."""
        try:
            entry = self._registry.resolve(request.agent_id)
            agent_id, status = entry.agent_id, entry.status
        except PlacementError as exc:
            enrolment = self._store.get_agent(request.agent_id)
            if enrolment is None:
                raise RpcRefusal("unknown-agent", str(exc)) from exc
            agent_id, status = enrolment.agent_id, control_pb2.AgentStatus(agent_id=enrolment.agent_id)
        copy = control_pb2.AgentStatus()
        copy.CopyFrom(status)
        try:
            await self._control.forget_agent(agent_id)
        except ConnectError as exc:
            raise RpcRefusal("broker-unavailable", f"cannot clear agent {agent_id}'s topics: {exc}") from exc
        log.info(
            "forgot agent %s (%s)%s", agent_id, copy.name, f": {request.reason}" if request.reason else ""
        )
        copy.state = control_pb2.AGENT_STATE_OFFLINE
        return AdminReply(agent=copy, command_id=secrets.token_hex(6))

    @requires("admin")
    async def EndJob(self, request: EndJobRequest, context: Context, caller: TokenRecord) -> EndJobReply:
        """End a session by hand: its agents free its buffers."""
        if self._store.get_session(request.job_id) is None:
            raise RpcRefusal("unknown-session", f"unknown job {request.job_id!r}")
        record = await self._control.end_session(request.job_id, reason="ended by an admin")
        return EndJobReply(job=_job_info(record))

    async def _command(
        self, request: AdminRequest, kind: CommandKind, *, keep_buffers: bool = False
    ) -> AdminReply:
        try:
            entry = self._registry.resolve(request.agent_id)
        except PlacementError as exc:
            raise RpcRefusal("unknown-agent", str(exc)) from exc
        verb = CommandKind.Name(kind).removeprefix("COMMAND_KIND_").lower()
        log.info(
            "%s agent %s (%s, now %s)%s",
            verb,
            entry.agent_id,
            entry.name,
            state_name(entry.state),
            f": {request.reason}" if request.reason else "",
        )
        try:
            status, command_id = await self._commander.send(
                entry.agent_id, kind, request.reason, keep_buffers=keep_buffers
            )
        except AgentNotAccepting as exc:
            raise RpcRefusal("not-accepting", exc.remote_message, extra={"agent": exc.agent_id}) from exc
        except DeadlineExceeded as exc:
            raise RpcRefusal("not-confirmed", str(exc)) from exc
        except ConnectError as exc:
            raise RpcRefusal("broker-unavailable", f"command to {entry.agent_id} not sent: {exc}") from exc
        return AdminReply(agent=status, command_id=command_id)


def add_services(server: grpc.aio.Server, coordinator: CoordinatorService, admin: AdminService) -> None:
    """Register both servicers on ``server``."""
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(coordinator, server)  # type: ignore[no-untyped-call]
    coordinator_pb2_grpc.add_AdminServicer_to_server(admin, server)  # type: ignore[no-untyped-call]
