"""The coordinator's gRPC servicers: ``gpupool.v1.Coordinator`` for clients and ``gpupool.v1.Admin``.

Handlers refuse a call by raising :class:`RpcRefusal`; :func:`_refusing` turns it into a status code
with the ``gpupool-error`` kind the client translates back (see :mod:`gpupool.protocol.errors`).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from gpupool._errors import (
    AgentNotAccepting,
    ConnectError,
    DeadlineExceeded,
    NoCapacity,
    PlacementError,
    UsageError,
)
from gpupool._proto.v1 import control_pb2, coordinator_pb2_grpc
from gpupool._proto.v1.control_pb2 import CommandKind
from gpupool._proto.v1.coordinator_pb2 import (
    AdminReply,
    AdminRequest,
    ConnectReply,
    ConnectRequest,
    DisconnectReply,
    DisconnectRequest,
    JobInfo,
    ListAgentsReply,
    ListAgentsRequest,
    ListJobsReply,
    ListJobsRequest,
    PlaceReply,
    PlaceRequest,
)
from gpupool._version import __version__
from gpupool.coordinator.commands import AgentCommander
from gpupool.coordinator.jobs import Jobs
from gpupool.coordinator.registry import Registry, state_name
from gpupool.placement import MIN_SHARD_BYTES, split_rows
from gpupool.protocol.codec import check_dtype, shape_of
from gpupool.protocol.errors import RpcRefusal, abort

__all__ = ["AdminService", "CoordinatorService", "add_services"]

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
S = TypeVar("S")
Req = TypeVar("Req")
Rep = TypeVar("Rep")


def _refusing(
    handler: Callable[[S, Req, Context], Awaitable[Rep]],
) -> Callable[[S, Req, Context], Awaitable[Rep]]:
    """End the call with the refusal's status when the handler raises :class:`RpcRefusal`."""

    @functools.wraps(handler)
    async def wrapper(self: S, request: Req, context: Context) -> Rep:
        try:
            return await handler(self, request, context)
        except RpcRefusal as refusal:
            log.info("refused %s: %s (%s)", handler.__name__, refusal.message, refusal.kind)
            await abort(context, refusal)

    return wrapper


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    """The client API: sessions, the agent list, placement and the job list.

    Args:
        registry: the agents the coordinator knows.
        jobs: the client sessions.
        min_shard_bytes: the smallest shard worth a worker of its own (see :func:`split_rows`).
    """

    def __init__(self, *, registry: Registry, jobs: Jobs, min_shard_bytes: int = MIN_SHARD_BYTES) -> None:
        self._registry = registry
        self._jobs = jobs
        self._min_shard_bytes = min_shard_bytes

    @_refusing
    async def Connect(self, request: ConnectRequest, context: Context) -> ConnectReply:
        """Start a session (a job) for a client."""
        job = self._jobs.connect(request.client, request.client_version, now=time.time())
        ready = self._registry.count_by_state().get("ready", 0)
        log.info("job %s started by %s (gpupool %s)", job.job_id, job.client, request.client_version or "?")
        return ConnectReply(session=job.job_id, coordinator_version=__version__, ready_agents=ready)

    @_refusing
    async def Disconnect(self, request: DisconnectRequest, context: Context) -> DisconnectReply:
        """End a session; ending it twice is not an error."""
        try:
            job = self._jobs.disconnect(request.session, now=time.time())
        except PlacementError as exc:
            raise RpcRefusal("unknown-session", str(exc)) from exc
        log.info("job %s ended: %d arrays, %d bytes placed", job.job_id, job.arrays_placed, job.bytes_placed)
        return DisconnectReply()

    @_refusing
    async def ListAgents(self, request: ListAgentsRequest, context: Context) -> ListAgentsReply:
        """The known agents, offline ones only if asked for."""
        now = time.monotonic()
        reply = ListAgentsReply()
        # add() and CopyFrom: a third of the time of building AgentRecords and copying them in.
        add = reply.agents.add
        for entry in self._registry.agents():
            if request.include_offline or entry.state != control_pb2.AGENT_STATE_OFFLINE:
                record = add(seconds_since_seen=now - entry.last_seen)
                record.status.CopyFrom(entry.status)
                if entry.telemetry is not None:
                    record.telemetry.CopyFrom(entry.telemetry)
        return reply

    @_refusing
    async def Place(self, request: PlaceRequest, context: Context) -> PlaceReply:
        """Row shards for a new array over the ready agents' workers, by free memory."""
        try:
            self._jobs.running(request.session)
        except PlacementError as exc:
            raise RpcRefusal("unknown-session", str(exc)) from exc
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
        ready = self._registry.ready(exclude=request.exclude_agents)
        if not ready:
            raise RpcRefusal("no-agents", self._why_no_agents(len(request.exclude_agents)))
        try:
            split = split_rows(rows, row_bytes, ready.free, min_shard_bytes=self._min_shard_bytes)
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
        self._jobs.record_placement(request.session, rows * row_bytes)
        reply = PlaceReply()
        add = reply.shards.add
        agent_ids, endpoints, workers = ready.agent_ids, ready.endpoints, ready.workers
        for position, start, stop in split:
            shard = add()  # then plain assignments: the quickest way to fill a repeated field here
            shard.agent_id = agent_ids[position]
            shard.endpoint = endpoints[position]
            shard.worker = workers[position]
            shard.start = start
            shard.stop = stop
        return reply

    @_refusing
    async def ListJobs(self, request: ListJobsRequest, context: Context) -> ListJobsReply:
        """Running and recently ended jobs, oldest first."""
        return ListJobsReply(
            jobs=[
                JobInfo(
                    job_id=job.job_id,
                    client=job.client,
                    started=_timestamp(job.started),
                    state=job.state,
                    arrays_placed=job.arrays_placed,
                    bytes_placed=job.bytes_placed,
                )
                for job in self._jobs.list()
            ]
        )

    def _why_no_agents(self, excluded: int) -> str:
        counts = self._registry.count_by_state()
        if not counts:
            return "no ready agents: no agent has registered with the coordinator"
        known = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        detail = f"; {excluded} excluded by the request" if excluded else ""
        return f"no ready agents: {sum(counts.values())} known ({known}){detail}"


class AdminService(coordinator_pb2_grpc.AdminServicer):
    """The operator API: drain, cordon and uncordon an agent, each confirmed by the agent's status.

    Args:
        registry: the agents the coordinator knows, to resolve the agent named.
        commander: sends the command and waits for its confirmation.
    """

    def __init__(self, *, registry: Registry, commander: AgentCommander) -> None:
        self._registry = registry
        self._commander = commander

    @_refusing
    async def Drain(self, request: AdminRequest, context: Context) -> AdminReply:
        """Take no new shards or uploads; serve what the agent holds."""
        return await self._command(request, control_pb2.COMMAND_KIND_DRAIN)

    @_refusing
    async def Cordon(self, request: AdminRequest, context: Context) -> AdminReply:
        """Take no new shards; keep serving."""
        return await self._command(request, control_pb2.COMMAND_KIND_CORDON)

    @_refusing
    async def Uncordon(self, request: AdminRequest, context: Context) -> AdminReply:
        """Back to READY."""
        return await self._command(request, control_pb2.COMMAND_KIND_UNCORDON)

    async def _command(self, request: AdminRequest, kind: CommandKind) -> AdminReply:
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
            status, command_id = await self._commander.send(entry.agent_id, kind, request.reason)
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
