"""The coordinator's log of registry events: a line each while they are few, a summary during a burst.

A fleet registering at once, reconnecting after a broker restart, or dropping off the network sends a
thousand statuses within a second; a line for each would bury everything else in the log (and cost
the coordinator more than applying them). Within each window (one second from its first event), the
first ``burst`` events are logged one by one and the rest counted; when the window closes, one line
sums up what was held back and how the registry stands.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from gpupool.coordinator.registry import (
    AgentForgotten,
    AgentRegistered,
    AgentRestarted,
    AgentStateChanged,
    AgentWentOffline,
    RegistryEvent,
    state_name,
)

__all__ = ["EventLog", "log_event"]

log = logging.getLogger(__name__)

_KIND: dict[type, str] = {
    AgentRegistered: "registered",
    AgentStateChanged: "changed state",
    AgentWentOffline: "went offline",
    AgentRestarted: "restarted",
    AgentForgotten: "forgotten",
}
_WORRYING = frozenset({"went offline", "restarted"})


def log_event(event: RegistryEvent) -> None:
    """One line for one event: INFO, or WARNING for an agent lost or restarted."""
    match event:
        case AgentRegistered(agent_id, name, state):
            log.info("agent %s (%s) registered, %s", agent_id, name, state_name(state))
        case AgentStateChanged(agent_id, name, old, new):
            log.info("agent %s (%s) %s -> %s", agent_id, name, state_name(old), state_name(new))
        case AgentWentOffline(agent_id, name, previous):
            log.warning("agent %s (%s) went offline (was %s)", agent_id, name, state_name(previous))
        case AgentRestarted(agent_id, name):
            log.warning("agent %s (%s) restarted: the shards it held are gone", agent_id, name)
        case AgentForgotten(agent_id):
            log.info("agent %s forgotten: its retained status was cleared", agent_id)


class EventLog:
    """Logs registry events, summing up bursts. Call from the event loop that owns the registry.

    Args:
        describe: how the registry stands, for the summary line (``"1000 known: 998 ready, 2 offline"``).
        burst: events logged one by one per window.
        window: seconds from a window's first event to its summary.
    """

    def __init__(self, *, describe: Callable[[], str], burst: int = 20, window: float = 1.0) -> None:
        self._describe = describe
        self._burst = burst
        self._window = window
        self._opened: float | None = None
        self._logged = 0
        self._held: Counter[str] = Counter()
        self._timer: asyncio.TimerHandle | None = None

    def record(self, event: RegistryEvent) -> None:
        """Log ``event`` now, or count it for the window's summary."""
        now = time.monotonic()
        if self._opened is None or now - self._opened >= self._window:
            self.flush()
            self._opened, self._logged = now, 0
        if self._logged < self._burst:
            self._logged += 1
            log_event(event)
            return
        self._held[_KIND[type(event)]] += 1
        if self._timer is None:
            delay = self._opened + self._window - now
            self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self.flush)

    def flush(self) -> None:
        """Log the summary of the events held back, if any (also on shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._held:
            return
        held = ", ".join(f"{n} {kind}" for kind, n in sorted(self._held.items()))
        level = logging.WARNING if _WORRYING & self._held.keys() else logging.INFO
        log.log(
            level,
            "and %d more agent events within %g s, not logged one by one: %s; now %s",
            self._held.total(),
            self._window,
            held,
            self._describe(),
        )
        self._held.clear()
        self._opened = None
