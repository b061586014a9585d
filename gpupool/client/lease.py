"""A session's standing with the coordinator: its lease, its capabilities on agents, which agents the
coordinator shows offline, and the network throughput the session observed per agent (which each heartbeat
reports)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from gpupool._errors import GpupoolError
from gpupool._proto.v1 import coordinator_pb2
from gpupool.client.channels import Metadata
from gpupool.transport.coordinator import CoordinatorClient
from gpupool.transport.rpc import CAPABILITY_KEY

__all__ = ["WATCH_INTERVAL", "LeaseKeeper", "ObservedTransfers", "TransferMeter"]

#: Seconds between the client's looks at which agents the coordinator shows offline (a Renew call).
WATCH_INTERVAL = 1.0
#: Capabilities with fewer seconds than this left are renewed at the next beat.
RENEW_BEFORE = 300

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ObservedTransfers:
    """Bytes moved to and from one agent and the seconds those transfers took (summed over transfers, not
    the wall time between heartbeats)."""

    agent_id: str
    nbytes: int
    seconds: float


class TransferMeter:
    """Sums a session's transfers per agent between heartbeats; thread-safe.

    The session calls :meth:`add` after each upload or download (a shard's bytes and the seconds its
    stream took) and hands :meth:`drain` to :class:`LeaseKeeper` as its ``observed`` provider.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sums: dict[str, tuple[int, float]] = {}

    def add(self, agent_id: str, nbytes: int, seconds: float) -> None:
        """Count one transfer of ``nbytes`` to or from ``agent_id`` that took ``seconds``."""
        with self._lock:
            total, spent = self._sums.get(agent_id, (0, 0.0))
            self._sums[agent_id] = (total + nbytes, spent + seconds)

    def drain(self) -> list[ObservedTransfers]:
        """The sums since the last drain, by agent id, and start again from zero."""
        with self._lock:
            sums, self._sums = self._sums, {}
        return [
            ObservedTransfers(agent_id=agent_id, nbytes=nbytes, seconds=seconds)
            for agent_id, (nbytes, seconds) in sorted(sums.items())
        ]


class LeaseKeeper:
    """Keeps a session's lease and capabilities alive, and watches which agents went offline.

    Use it on the session's event loop; :meth:`run` beats until :meth:`close` (or until cancelled).

    Args:
        rpc: the client of the coordinator.
        session: the session's id.
        lease: the seconds the coordinator keeps the session without a renewal (0: no lease, no beats).
        on_offline: called at each beat with the agents the coordinator shows offline.
        observed: called at each beat for what the session's transfers to each agent measured since the
            previous beat (:meth:`TransferMeter.drain`); the beat reports it to the coordinator, which
            shows a smoothed figure per agent (``gpupool agents``' NET column). Figures of a beat that
            fails are not sent again. None: nothing reported.
    """

    def __init__(
        self,
        rpc: CoordinatorClient,
        *,
        session: str,
        lease: float,
        on_offline: Callable[[frozenset[str]], None],
        observed: Callable[[], Sequence[ObservedTransfers]] | None = None,
    ) -> None:
        self._rpc = rpc
        self._session = session
        self._lease = lease
        self._on_offline = on_offline
        self._observed = observed
        self._capabilities: dict[str, tuple[str, float]] = {}
        self._closed = False
        self.offline_agents: frozenset[str] = frozenset()

    def holds(self, agent_id: str) -> bool:
        """Whether the session holds a capability on ``agent_id`` (an enrolled agent, dialled with TLS)."""
        return agent_id in self._capabilities

    def metadata(self, agent_id: str) -> Metadata:
        """The metadata that carries the session's capability on ``agent_id`` (none for an open agent)."""
        held = self._capabilities.get(agent_id)
        return ((CAPABILITY_KEY, held[0]),) if held is not None else ()

    def keep_placed(self, shards: Iterable[coordinator_pb2.ShardPlacement]) -> None:
        """Keep the capabilities a placement carries."""
        for shard in shards:
            if shard.HasField("capability") and shard.capability.token:
                self._capabilities[shard.agent_id] = (shard.capability.token, shard.capability.expires)

    async def grant(self, agent_ids: Sequence[str]) -> None:
        """Get the session's capabilities on ``agent_ids`` from the coordinator.

        A coordinator that is restarting is waited for (up to the call's deadline): the session and its
        capabilities outlive the restart.

        Raises:
            PlacementError: an agent that is not an enrolled agent of the pool.
        """
        reply = await self._rpc.acall(
            "Grant",
            coordinator_pb2.GrantRequest(session=self._session, agent_ids=list(agent_ids)),
            wait_for_ready=True,
        )
        for capability in reply.capabilities:
            self._capabilities[capability.agent_id] = (capability.token, capability.expires)

    async def run(self) -> None:
        """Renew the lease, learn which agents went offline, and renew capabilities before they run out.

        Every :data:`WATCH_INTERVAL` seconds (at most a third of the lease): the coordinator's view of
        dead agents reaches a waiting call within about that. A failed beat is logged and the next one
        tries again (a restarting coordinator). Returns at once without a lease.
        """
        if self._lease <= 0:
            return
        interval = max(0.1, min(WATCH_INTERVAL, self._lease / 3))
        while not self._closed:
            await asyncio.sleep(interval)
            try:
                reply = await self._rpc.acall(
                    "Renew", self._renew_request(), timeout=max(1.0, self._lease / 3)
                )
                self.offline_agents = frozenset(reply.offline_agents)
                self._on_offline(self.offline_agents)
                now = time.time()
                stale = [a for a, (_, expires) in self._capabilities.items() if expires - now < RENEW_BEFORE]
                if stale:
                    await self.grant(stale)
            except GpupoolError as exc:
                log.warning("session %s: heartbeat: %s", self._session, exc)

    def _renew_request(self) -> coordinator_pb2.RenewRequest:
        request = coordinator_pb2.RenewRequest(session=self._session)
        if self._observed is not None:
            add = request.observed.add
            for figure in self._observed():
                if figure.nbytes > 0 and figure.seconds > 0:
                    add(agent_id=figure.agent_id, bytes=figure.nbytes, seconds=figure.seconds)
        return request

    def close(self) -> None:
        """End :meth:`run` at its next beat."""
        self._closed = True
