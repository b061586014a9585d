"""The network throughput clients observe to and from each agent, smoothed over every session's reports.

A client's heartbeat (``Renew``) carries, per agent, the bytes it moved there and back since its previous
beat and the seconds those transfers took. :class:`NetworkSpeeds` folds each into an exponentially
weighted moving average per agent, which ``ListAgents`` shows (``gpupool agents``' NET column). Pure
state, tested without a network. One event loop owns it.

A report says as much as the link between that client and the agent: a figure over a home link and one
over a LAN mix in one average. Small transfers measure latency rather than throughput and are ignored.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["MAX_BYTES_PER_SECOND", "MIN_SAMPLE_BYTES", "SMOOTHING", "NetworkSpeeds"]

#: The weight of each new report in the average.
SMOOTHING: Final = 0.3
#: Reports of fewer bytes are ignored: their time is mostly round trips.
MIN_SAMPLE_BYTES: Final = 256 * 1024
#: Reports claiming more are ignored (no link here carries a terabyte a second).
MAX_BYTES_PER_SECOND: Final = 1e12


class NetworkSpeeds:
    """Each agent's smoothed observed throughput, in bytes per second.

    Args:
        smoothing: the weight of each new report (0 < smoothing <= 1).
    """

    def __init__(self, *, smoothing: float = SMOOTHING) -> None:
        self._smoothing = smoothing
        self._speeds: dict[str, float] = {}

    def get(self, agent_id: str) -> float:
        """The agent's smoothed figure (0.0: no report taken yet)."""
        return self._speeds.get(agent_id, 0.0)

    def observe(self, agent_id: str, nbytes: int, seconds: float) -> bool:
        """Fold one report into the agent's average; False if it was ignored (too small, not a number,
        or implausibly fast)."""
        if nbytes < MIN_SAMPLE_BYTES or not math.isfinite(seconds) or seconds <= 0:
            return False
        rate = nbytes / seconds
        if rate > MAX_BYTES_PER_SECOND:
            return False
        old = self._speeds.get(agent_id)
        self._speeds[agent_id] = rate if old is None else old + self._smoothing * (rate - old)
        return True

    def forget(self, agent_id: str) -> None:
        """Drop the agent's figure."""
        self._speeds.pop(agent_id, None)
