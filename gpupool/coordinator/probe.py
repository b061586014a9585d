"""Asking an agent itself whether it is alive: a gRPC Health call to its data-plane endpoint.

An OFFLINE status on MQTT is usually an agent's last will, published by the broker when the agent's
connection to it ended without a goodbye. But a broker that stops cleanly (SIGTERM: a restart, a package
upgrade) publishes the wills of every agent connected to it, live ones included, and on an open broker
anyone who saw a will can publish it again. So before the registry believes an OFFLINE status of an agent
it shows alive, the coordinator asks the agent directly (:func:`probe_agent`): one that answers as itself,
from the same start, and not OFFLINE, is alive whatever MQTT says.

The call is dialled as clients dial agents: TLS verified against the pool CA for ``<agent-id>.agent.gpupool``
where the agent is enrolled (so an endpoint someone else answers cannot vouch for it), plaintext for an
open agent. Health needs no capability. :class:`OfflineProbes` is the coordinator's side: a probe per
agent, a bound on how many run at once, and the status applied only when the agent does not answer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import grpc

from gpupool._proto.v1 import agent_pb2, agent_pb2_grpc, control_pb2
from gpupool._proto.v1.control_pb2 import AgentStatus
from gpupool._ratelog import RateLimitedLog
from gpupool.coordinator.registry import Registry, RegistryEvent, state_name
from gpupool.security.pki import agent_dns_name
from gpupool.transport.backoff import Backoff
from gpupool.transport.rpc import aio_channel

__all__ = ["PROBE_BACKOFF", "PROBE_CONCURRENCY", "PROBE_DEADLINE", "OfflineProbes", "Probed", "probe_agent"]

log = logging.getLogger(__name__)

#: Seconds one Health call may take (a live agent answers in about a millisecond on a LAN, a few round
#: trips with a TLS handshake on a home link).
PROBE_DEADLINE: Final = 1.0
#: Waits between tries: two more tries after the first, within about a second (full jitter: a fleet's
#: probes after a broker stop do not retry in step).
PROBE_BACKOFF: Final = Backoff(base=0.25, cap=1.0, attempts=2)
#: Probes in flight at once: a broker stopped cleanly under a fleet of a thousand agents sends a thousand
#: wills within a second.
PROBE_CONCURRENCY: Final = 128

# Each try dials a connection of its own: a channel whose last connect failed waits out gRPC's reconnect
# backoff (a second or more) and fails calls at once meanwhile.
_connections = itertools.count(1 << 20)


@dataclass(frozen=True, slots=True)
class Probed:
    """What a probe found.

    Attributes:
        alive: the agent answered as itself, from the start the status names, in a state other than OFFLINE.
        status: its status as it answered (None when it did not answer).
        why: in a few words, why it counts as alive or not (for the log).
        tries: Health calls made.
    """

    alive: bool
    status: AgentStatus | None
    why: str
    tries: int


async def probe_agent(
    status: AgentStatus,
    *,
    endpoint: str,
    ca_pem: bytes | None,
    deadline: float = PROBE_DEADLINE,
    backoff: Backoff = PROBE_BACKOFF,
    rng: random.Random | None = None,
) -> Probed:
    """Ask the agent ``status`` names, at ``endpoint``, for its status now; retried with jittered backoff.

    Args:
        status: the OFFLINE status to confirm (its agent id and start time are what must answer).
        endpoint: the agent's data-plane address, as its last believed status gave it.
        ca_pem: the pool CA, for an enrolled agent (TLS); None for an open one (plaintext).
        deadline: seconds per call.
        backoff: the waits between calls (``backoff.attempts`` more calls after the first).
        rng: for the jitter (tests).

    A refused connection ends the tries at once (nothing listens there: the agent's process is gone); a
    call that times out or fails otherwise is tried again. Raises nothing but ``CancelledError``.
    """
    agent_id = status.agent_id
    why = "not asked"
    tries = 0
    delays = backoff.delays(rng)
    while True:
        tries += 1
        try:
            reply = await _health(endpoint, agent_id, ca_pem=ca_pem, deadline=deadline)
        except grpc.aio.AioRpcError as exc:
            details = (exc.details() or "").strip()
            why = f"no answer on {endpoint}: {exc.code().name}" + (f" ({details[:200]})" if details else "")
            if "connection refused" in details.lower():
                return Probed(False, None, why, tries)
        else:
            return _judge(status, reply.status, endpoint, tries)
        delay = next(delays, None)
        if delay is None:
            return Probed(False, None, why, tries)
        await asyncio.sleep(delay)


async def _health(
    endpoint: str, agent_id: str, *, ca_pem: bytes | None, deadline: float
) -> agent_pb2.HealthReply:
    channel = aio_channel(
        endpoint,
        ca_pem=ca_pem,
        server_name=agent_dns_name(agent_id) if ca_pem is not None else "",
        connection=next(_connections),
    )
    try:
        stub = agent_pb2_grpc.AgentStub(channel)  # type: ignore[no-untyped-call]
        reply: agent_pb2.HealthReply = await stub.Health(agent_pb2.HealthRequest(), timeout=deadline)
        return reply
    finally:
        await channel.close(None)


def _judge(status: AgentStatus, answered: AgentStatus, endpoint: str, tries: int) -> Probed:
    """Whether the answer shows the agent of ``status`` alive, in the same start."""
    state = control_pb2.AgentState.Name(answered.state).removeprefix("AGENT_STATE_").lower()
    if answered.agent_id != status.agent_id:
        return Probed(False, answered, f"{endpoint} answers as agent {answered.agent_id[:64]!r}", tries)
    if status.HasField("started") and answered.started != status.started:
        return Probed(False, answered, f"it answers on {endpoint} from another start (restarted)", tries)
    if answered.state in (control_pb2.AGENT_STATE_OFFLINE, control_pb2.AGENT_STATE_UNSPECIFIED):
        return Probed(False, answered, f"it answers on {endpoint} as {state} (stopping)", tries)
    return Probed(True, answered, f"it answers on {endpoint} as {state}", tries)


class OfflineProbes:
    """Confirms OFFLINE statuses of agents the registry shows alive, one probe per agent at a time.

    The owner hands each such status to :meth:`start` instead of the registry, and calls :meth:`cancel`
    whenever the agent's next status (or its removal) arrives: the newer word settles it. A probe whose
    agent does not answer applies the status and passes the registry's events to ``applied``; one whose
    agent answers, alive, leaves the registry as it is and logs why (once a minute per agent: replays
    are an attacker's to repeat). Call from the event loop that owns the registry.

    Args:
        registry: the agents.
        ca_pem: the pool CA, to dial enrolled agents with TLS.
        applied: called with the events of each status a probe applied.
        probe: how to ask (:func:`probe_agent`; tests pass their own).
        concurrency: probes in flight at once.
    """

    def __init__(
        self,
        *,
        registry: Registry,
        ca_pem: bytes,
        applied: Callable[[list[RegistryEvent]], None],
        probe: Callable[..., Awaitable[Probed]] = probe_agent,
        concurrency: int = PROBE_CONCURRENCY,
    ) -> None:
        self._registry = registry
        self._ca_pem = ca_pem
        self._applied = applied
        self._probe = probe
        self._slots = asyncio.Semaphore(concurrency)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._kept = RateLimitedLog(log.info, interval=60.0)
        #: How many OFFLINE statuses were confirmed and applied, and how many were not believed.
        self.confirmed = 0
        self.refuted = 0

    def __len__(self) -> int:
        return len(self._running)

    def start(self, group: asyncio.TaskGroup, status: AgentStatus) -> bool:
        """Start confirming an OFFLINE ``status`` in ``group``; False where there is nothing to confirm
        (an agent unknown, already offline, or with no endpoint): the caller applies it at once."""
        entry = self._registry.get(status.agent_id)
        if entry is None or entry.state == control_pb2.AGENT_STATE_OFFLINE or not entry.status.endpoint:
            return False
        self.cancel(status.agent_id)
        ca_pem = self._ca_pem if entry.status.certificate_fingerprint else None
        self._running[status.agent_id] = group.create_task(
            self._confirm(status, entry.status.endpoint, ca_pem), name=f"gpupool[{status.agent_id}].probe"
        )
        return True

    def cancel(self, agent_id: str) -> None:
        """Drop the probe of ``agent_id``'s OFFLINE status, if one runs (a newer status arrived)."""
        task = self._running.pop(agent_id, None)
        if task is not None:
            task.cancel()

    def cancel_all(self) -> None:
        """Drop every probe (the coordinator is stopping)."""
        for agent_id in list(self._running):
            self.cancel(agent_id)

    async def _confirm(self, status: AgentStatus, endpoint: str, ca_pem: bytes | None) -> None:
        agent_id = status.agent_id
        try:
            async with self._slots:
                probed = await self._probe(status, endpoint=endpoint, ca_pem=ca_pem)
            alive, why = probed.alive, probed.why
        except Exception as exc:  # a probe that breaks must not take the coordinator down: believe the status
            log.exception("probing agent %s at %s", agent_id, endpoint)
            alive, why = False, f"the probe failed: {exc!r}"
        finally:
            if self._running.get(agent_id) is asyncio.current_task():
                del self._running[agent_id]
        entry = self._registry.get(agent_id)
        if entry is None:
            return  # forgotten meanwhile
        if alive:
            self.refuted += 1
            self._kept.emit(
                agent_id,
                f"agent {agent_id} ({entry.name}): an OFFLINE status came over MQTT (its last will: a broker "
                f"that stops cleanly sends every agent's, live ones too; or a replay of it), but {why}: "
                f"kept {state_name(entry.state)}",
            )
            return
        self.confirmed += 1
        log.debug("agent %s: OFFLINE confirmed: %s", agent_id, why)
        self._applied(self._registry.apply_status(status, now=time.monotonic()))
