"""Drain and take-back, the coordinator's part: move a draining agent's buffers to other ready agents.

An agent drained with ``gpupool drain`` (unless ``--no-move``), or paused by its owner (``gpupool-agent
pause``, its pause schedule), shows a new ``move_request`` in its DRAINING status. :class:`Evacuator` then,
once per request (and at once for an admin's drain, :meth:`Evacuator.evacuate`):

1. asks the agent for its resident buffers (``Inventory``: the agent first lets the calls in flight end);
2. finds each buffer a new home among the other READY agents' workers (:func:`gpupool.homes.plan_homes`:
   by free memory, the same backend where it can, never a draining, cordoned, hot or quarantined agent) and
   counts it against their memory as placement does;
3. has each new home ``Pull`` its buffer from the agent, whole, under the buffer's own session and id, showing
   the session's capabilities on both agents (signed here, as ``Grant`` signs them): the bytes go agent to
   agent, never through this process;
4. tells the agent (``Forward``) where each buffer went: it frees them and refuses later calls naming one with
   ``buffer-moved`` and the new home, which is how clients follow.

Programs that ran meanwhile may have made new buffers there: the rounds repeat (at most :data:`MAX_ROUNDS`)
until none is left or nothing more can move. The last ``Forward`` is marked final, with what stays; the
report (:class:`~gpupool._proto.v1.coordinator_pb2.Evacuation`) says what moved where. The coordinator calls
the agents with a capability of its own session (:data:`~gpupool.security.capability.COORDINATOR_SESSION`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import grpc

from gpupool._config import Timeouts
from gpupool._errors import GpupoolError, PlacementError
from gpupool._proto.v1 import agent_pb2, control_pb2, coordinator_pb2
from gpupool.coordinator.jobs import Jobs
from gpupool.coordinator.registry import AgentEntry, Registry
from gpupool.homes import Room, plan_homes
from gpupool.protocol.errors import translate_rpc_error
from gpupool.protocol.rawstream import SERVICE
from gpupool.security.capability import COORDINATOR_SESSION, issue_capability
from gpupool.security.pki import PoolAuthority, agent_dns_name
from gpupool.transport.rpc import CAPABILITY_KEY, aio_channel

__all__ = ["MAX_PULLS", "MAX_ROUNDS", "SETTLE_SECONDS", "Evacuator"]

log = logging.getLogger(__name__)

#: Rounds of inventory, pulls and forwards at most (a program running during a round may leave new buffers).
MAX_ROUNDS: Final = 3
#: Seconds an inventory lets the source's calls in flight end before it lists the buffers.
SETTLE_SECONDS: Final = 5.0
#: Pulls in flight at once.
MAX_PULLS: Final = 4
#: Tries per buffer (a refused pull is tried once more on another worker).
MAX_TRIES: Final = 2
#: Lifetime of the capabilities signed for one evacuation's calls.
CAPABILITY_SECONDS: Final = 600.0
#: Problems a report names at most.
MAX_PROBLEMS: Final = 20

DRAINING: Final = control_pb2.AGENT_STATE_DRAINING


@dataclass(slots=True)
class _Report:
    """An evacuation's outcome as it builds up."""

    agent_id: str
    started: float = field(default_factory=time.monotonic)
    groups: dict[tuple[str, str, str, int], list[int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    #: (session, buffer id) -> the (agent, worker) slots that refused to pull it
    refused: dict[tuple[str, str], set[tuple[str, int]]] = field(default_factory=dict)
    #: (session, source worker) -> the (agent, worker) its buffers went to (later rounds send theirs there)
    group_homes: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)

    def moved(self, home: agent_pb2.BufferHome, nbytes: int) -> None:
        counts = self.groups.setdefault((home.session, home.agent_id, home.endpoint, home.worker), [0, 0])
        counts[0] += 1
        counts[1] += nbytes

    def problem(self, text: str) -> None:
        if text not in self.problems and len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)

    def finish(self, left: Sequence[agent_pb2.ResidentBuffer]) -> coordinator_pb2.Evacuation:
        report = coordinator_pb2.Evacuation(
            agent_id=self.agent_id,
            buffers_left=len(left),
            bytes_left=sum(buffer.nbytes for buffer in left),
            problems=self.problems,
            seconds=time.monotonic() - self.started,
        )
        for (session, agent_id, endpoint, worker), (buffers, nbytes) in sorted(self.groups.items()):
            report.moved.add(
                session=session,
                agent_id=agent_id,
                endpoint=endpoint,
                worker=worker,
                buffers=buffers,
                bytes=nbytes,
            )
        report.buffers_moved = sum(group.buffers for group in report.moved)
        report.bytes_moved = sum(group.bytes for group in report.moved)
        return report


class _Link:
    """Calls to one agent, dialled as clients dial it (TLS checked for its id where it is enrolled)."""

    def __init__(self, entry: AgentEntry, ca_pem: bytes) -> None:
        self.agent_id = entry.agent_id
        self.endpoint = entry.status.endpoint
        self.secure = bool(entry.status.certificate_fingerprint)
        if self.secure:
            self.channel = aio_channel(
                self.endpoint, ca_pem=ca_pem, server_name=agent_dns_name(self.agent_id)
            )
        else:
            self.channel = aio_channel(self.endpoint)

    async def call(
        self, method: str, request: Any, reply_type: Any, *, capability: str, deadline: float
    ) -> Any:
        """A unary call of the Agent service, showing ``capability``.

        Raises:
            GpupoolError: the call failed (translated as a client's would be).
        """
        call = self.channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=reply_type.FromString,
        )
        metadata = ((CAPABILITY_KEY, capability),) if capability else ()
        try:
            return await call(request, timeout=deadline, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise translate_rpc_error(exc, peer=self.endpoint, agent_id=self.agent_id) from exc

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.channel.close(grace=None)


class Evacuator:
    """Moves draining agents' buffers to other ready agents. One event loop owns it.

    Args:
        registry: the agents (targets are its READY workers; placed bytes are counted there).
        jobs: the sessions (an ended one's buffers are not moved; a target is told when a session ends).
        authority: signs the capabilities, and is the CA the agents' certificates must chain to.
        timeouts: deadlines of the calls (a pull gets ``for_stream`` of its bytes).
        clock: seconds since the epoch (capabilities).
    """

    def __init__(
        self,
        *,
        registry: Registry,
        jobs: Jobs,
        authority: PoolAuthority,
        timeouts: Timeouts = Timeouts(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry = registry
        self._jobs = jobs
        self._authority = authority
        self._timeouts = timeouts
        self._clock = clock
        self._running: dict[str, asyncio.Task[coordinator_pb2.Evacuation]] = {}
        self._handled: dict[str, int] = {}  # agent id -> the move_request last acted on

    def status_applied(self, agent_id: str) -> None:
        """An agent's status was applied: start moving its buffers if it asks for it anew (see the module)."""
        entry = self._registry.get(agent_id)
        if entry is None or entry.state != DRAINING:
            return
        request = entry.status.move_request
        if not request or self._handled.get(agent_id) == request:
            return
        if agent_id in self._running:
            self._handled[agent_id] = request  # the evacuation under way takes what this asks for
            return
        if not any(worker.buffers for worker in entry.status.workers):
            return  # nothing to move (yet)
        self._handled[agent_id] = request
        self._start(agent_id)

    async def evacuate(self, agent_id: str) -> coordinator_pb2.Evacuation:
        """Move the agent's buffers away now (or wait for the evacuation under way); what moved where.

        Cancelling the caller does not stop the evacuation.
        """
        entry = self._registry.get(agent_id)
        if entry is not None and entry.status.move_request:
            self._handled[agent_id] = entry.status.move_request
        task = self._running.get(agent_id) or self._start(agent_id)
        return await asyncio.shield(task)

    async def close(self) -> None:
        """Stop the evacuations under way (their agents keep what was not moved yet)."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    def _start(self, agent_id: str) -> asyncio.Task[coordinator_pb2.Evacuation]:
        task = asyncio.create_task(self._evacuate(agent_id), name=f"gpupool[{agent_id}].evacuation")
        self._running[agent_id] = task
        task.add_done_callback(lambda done: self._finished(agent_id, done))
        return task

    def _finished(self, agent_id: str, task: asyncio.Task[coordinator_pb2.Evacuation]) -> None:
        if self._running.get(agent_id) is task:
            del self._running[agent_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("evacuation of agent %s failed", agent_id, exc_info=task.exception())

    async def _evacuate(self, agent_id: str) -> coordinator_pb2.Evacuation:
        report = _Report(agent_id)
        entry = self._registry.get(agent_id)
        if entry is None or entry.state != DRAINING or not entry.status.endpoint:
            state = "unknown" if entry is None else control_pb2.AgentState.Name(entry.state)
            report.problem(f"agent {agent_id} is not draining ({state}): nothing moved")
            return report.finish(())
        source = _Link(entry, self._authority.ca_pem)
        links: dict[str, _Link] = {}
        left: Sequence[agent_pb2.ResidentBuffer] = ()
        try:
            inventory = await self._inventory(source, SETTLE_SECONDS)
            tries: dict[tuple[str, str], int] = {}
            for _ in range(MAX_ROUNDS):
                todo = [
                    buffer for buffer in inventory.buffers if self._movable(buffer, source, tries, report)
                ]
                if not todo:
                    break
                moved = await self._round(source, todo, tries, links, report)
                inventory = await self._inventory(source, SETTLE_SECONDS if moved else 0.0)
                if not moved:
                    break
            left = inventory.buffers
            await self._final(source, left, report)
        except GpupoolError as exc:
            report.problem(f"agent {agent_id}: {exc}")
        finally:
            for link in (source, *links.values()):
                await link.close()
        evacuation = report.finish(left)
        for group in evacuation.moved:
            log.info(
                "agent %s: moved %d buffer(s), %d bytes, of session %s to agent %s worker %d",
                agent_id,
                group.buffers,
                group.bytes,
                group.session or "(none)",
                group.agent_id,
                group.worker,
            )
        log.info(
            "agent %s evacuated in %.1f s: %d buffer(s), %d bytes moved; %d buffer(s), %d bytes left%s",
            agent_id,
            evacuation.seconds,
            evacuation.buffers_moved,
            evacuation.bytes_moved,
            evacuation.buffers_left,
            evacuation.bytes_left,
            f" ({'; '.join(evacuation.problems)})" if evacuation.problems else "",
        )
        return evacuation

    # -- the calls ------------------------------------------------------------------------------------

    def _own_capability(self, link: _Link) -> str:
        return self._capability(COORDINATOR_SESSION, link) if link.secure else ""

    def _capability(self, session: str, link: _Link) -> str:
        if not link.secure:
            return ""
        token, _ = issue_capability(
            self._authority.capability_private_key,
            session=session,
            agent_id=link.agent_id,
            ttl=CAPABILITY_SECONDS,
            now=self._clock(),
            endpoint=link.endpoint,
        )
        return token

    async def _inventory(self, source: _Link, settle: float) -> agent_pb2.InventoryReply:
        reply: agent_pb2.InventoryReply = await source.call(
            "Inventory",
            agent_pb2.InventoryRequest(settle_seconds=settle),
            agent_pb2.InventoryReply,
            capability=self._own_capability(source),
            deadline=settle + self._timeouts.rpc,
        )
        return reply

    async def _final(
        self, source: _Link, left: Sequence[agent_pb2.ResidentBuffer], report: _Report
    ) -> agent_pb2.ForwardReply:
        note = "; ".join(report.problems[:3]) if left else ""
        reply: agent_pb2.ForwardReply = await source.call(
            "Forward",
            agent_pb2.ForwardRequest(
                final=True, left=len(left), left_bytes=sum(b.nbytes for b in left), note=note[:1000]
            ),
            agent_pb2.ForwardReply,
            capability=self._own_capability(source),
            deadline=self._timeouts.rpc,
        )
        return reply

    # -- one round ------------------------------------------------------------------------------------

    def _movable(
        self,
        buffer: agent_pb2.ResidentBuffer,
        source: _Link,
        tries: dict[tuple[str, str], int],
        report: _Report,
    ) -> bool:
        """Whether to try moving ``buffer`` (again) in this round."""
        if tries.get((buffer.session, buffer.buffer_id), 0) >= MAX_TRIES:
            return False
        if not source.secure:
            return True  # an open agent's sessions are the clients' word: the coordinator may not know them
        running = self._running_session(buffer.session)
        if not running:
            report.problem(f"session {buffer.session or '(none)'} has ended: its buffers are not moved")
            tries[(buffer.session, buffer.buffer_id)] = MAX_TRIES
        return running

    async def _round(
        self,
        source: _Link,
        todo: Sequence[agent_pb2.ResidentBuffer],
        tries: dict[tuple[str, str], int],
        links: dict[str, _Link],
        report: _Report,
    ) -> bool:
        """Move what can be moved of ``todo``; whether anything moved. A worker that refused a buffer is not
        given it again (``tries`` and the refusals are the evacuation's, over its rounds)."""
        entry = self._registry.get(source.agent_id)
        source_backends = (
            {w.index: w.backend for w in entry.status.workers} if entry is not None else dict[int, str]()
        )
        ready = self._registry.ready(exclude=[source.agent_id, *self._unlike(source)])
        rooms = [
            Room(free=free, backend=self._backend(agent_id, worker))
            for agent_id, worker, free in zip(ready.agent_ids, ready.workers, ready.free, strict=True)
        ]
        slots_of = {
            (agent_id, worker): position
            for position, (agent_id, worker) in enumerate(zip(ready.agent_ids, ready.workers, strict=True))
        }
        avoid = {
            index: {
                slots_of[slot]
                for slot in report.refused.get((b.session, b.buffer_id), ())
                if slot in slots_of
            }
            for index, b in enumerate(todo)
        }
        # A session's buffers on one worker move together (its programs read them together), and where
        # they went in an earlier round.
        groups = [(b.session, b.worker) for b in todo]
        prefer = {key: slots_of[slot] for key, slot in report.group_homes.items() if slot in slots_of}
        homes = plan_homes(
            [buffer.nbytes for buffer in todo],
            [source_backends.get(b.worker, "") for b in todo],
            rooms,
            avoid=avoid,
            groups=groups,
            prefer=prefer,
        )
        for key, position in zip(groups, homes, strict=True):
            if position is not None:
                report.group_homes[key] = (ready.agent_ids[position], ready.workers[position])
        self._registry.reserve_split(
            ready, ((home, 0, todo[i].nbytes) for i, home in enumerate(homes) if home is not None), 1
        )
        for buffer, home in zip(todo, homes, strict=True):
            tries[(buffer.session, buffer.buffer_id)] = tries.get((buffer.session, buffer.buffer_id), 0) + 1
            if home is None:
                tries[(buffer.session, buffer.buffer_id)] = MAX_TRIES
                report.problem(
                    f"no ready agent has room for a buffer of {buffer.nbytes} bytes"
                    if rooms
                    else "no other ready agent to move buffers to"
                )
        slots = asyncio.Semaphore(MAX_PULLS)
        pulled: list[tuple[agent_pb2.BufferHome, int]] = []

        async def move(buffer: agent_pb2.ResidentBuffer, position: int) -> None:
            target_id = ready.agent_ids[position]
            target = links.get(target_id)
            if target is None:
                target_entry = self._registry.get(target_id)
                if target_entry is None:
                    return
                target = links[target_id] = _Link(target_entry, self._authority.ca_pem)
            home = agent_pb2.BufferHome(
                session=buffer.session,
                buffer_id=buffer.buffer_id,
                agent_id=target_id,
                endpoint=target.endpoint,
                worker=ready.workers[position],
            )
            async with slots:
                try:
                    await self._pull(source, target, buffer, home)
                except GpupoolError as exc:
                    report.problem(f"agent {target_id} could not pull a buffer: {exc}")
                    report.refused.setdefault((buffer.session, buffer.buffer_id), set()).add(
                        (target_id, home.worker)
                    )
                    return
            pulled.append((home, buffer.nbytes))

        async with asyncio.TaskGroup() as group:
            for buffer, home in zip(todo, homes, strict=True):
                if home is not None:
                    group.create_task(move(buffer, home))
        if not pulled:
            return False
        return await self._forward(source, pulled, links, report)

    async def _pull(
        self, source: _Link, target: _Link, buffer: agent_pb2.ResidentBuffer, home: agent_pb2.BufferHome
    ) -> None:
        """Have ``target`` pull ``buffer`` whole from ``source``, under its session and id.

        Raises:
            GpupoolError: the pull failed (nothing was kept there).
        """
        source_piece = agent_pb2.PullSource(
            agent_id=source.agent_id,
            buffer_id=buffer.buffer_id,
            whole=True,
            capability=self._capability(buffer.session, source),
            endpoint="" if source.secure else source.endpoint,
        )
        request = agent_pb2.PullRequest(
            worker=home.worker,
            output=buffer.buffer_id,
            sources=[source_piece],
            expect=buffer.meta,
            session=buffer.session,
        )
        if self._running_session(buffer.session):
            self._jobs.add_agents(buffer.session, [target.agent_id])  # told when the session ends
        await target.call(
            "Pull",
            request,
            agent_pb2.PullReply,
            capability=self._capability(buffer.session, target),
            deadline=self._timeouts.connect + self._timeouts.for_stream(buffer.nbytes),
        )

    async def _forward(
        self,
        source: _Link,
        pulled: Sequence[tuple[agent_pb2.BufferHome, int]],
        links: dict[str, _Link],
        report: _Report,
    ) -> bool:
        """Tell the source where the pulled buffers went; free the copies of any it no longer held."""
        reply: agent_pb2.ForwardReply = await source.call(
            "Forward",
            agent_pb2.ForwardRequest(moves=[home for home, _ in pulled]),
            agent_pb2.ForwardReply,
            capability=self._own_capability(source),
            deadline=self._timeouts.rpc,
        )
        missing = {(home.session, home.buffer_id) for home in reply.missing}
        for home, nbytes in pulled:
            if (home.session, home.buffer_id) not in missing:
                report.moved(home, nbytes)
        for home in reply.missing:  # freed at the source while it moved: the copy goes too
            target = links.get(home.agent_id)
            if target is None:
                continue
            with contextlib.suppress(GpupoolError):
                await target.call(
                    "Free",
                    agent_pb2.FreeRequest(buffer_ids=[home.buffer_id], session=home.session),
                    agent_pb2.FreeReply,
                    capability=self._capability(home.session, target),
                    deadline=self._timeouts.rpc,
                )
        return reply.forwarded > 0

    def _running_session(self, session: str) -> bool:
        try:
            return self._jobs.get(session, None).state == "running"
        except (PlacementError, GpupoolError):
            return False

    # -- who may take buffers -------------------------------------------------------------------------

    def _unlike(self, source: _Link) -> list[str]:
        """Agents that cannot take the source's buffers: enrolled ones for an open source and the reverse
        (a pull between them fails its TLS or its capability)."""
        return [
            entry.agent_id
            for entry in self._registry.agents()
            if bool(entry.status.certificate_fingerprint) != source.secure
        ]

    def _backend(self, agent_id: str, worker: int) -> str:
        entry = self._registry.get(agent_id)
        if entry is None:
            return ""
        for status in entry.status.workers:
            if status.index == worker:
                return status.backend or entry.status.backend
        return entry.status.backend
