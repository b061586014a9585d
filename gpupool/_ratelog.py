"""Log lines that a peer can provoke at will, at most once per key and interval."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Writes a line for a key at most once per ``interval`` seconds; counts the rest.

    For refusals of input an attacker controls (forged statuses, replayed commands): one line tells the
    operator, a flood of them would bury everything else.

    Args:
        log: called with each line let through.
        interval: seconds between two lines of the same key.
        clock: monotonic seconds.
        max_keys: keys remembered before the memory is cleared (the set is attacker-sized).
    """

    def __init__(
        self,
        log: Callable[[str], None],
        *,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        self._log = log
        self._interval = interval
        self._clock = clock
        self._max_keys = max_keys
        self._last: dict[object, float] = {}
        self.count = 0

    def emit(self, key: object, line: str) -> bool:
        """Count one event; log ``line`` unless ``key`` was logged within the interval. Returns if logged."""
        self.count += 1
        now = self._clock()
        if now - self._last.get(key, -1e18) < self._interval:
            return False
        if len(self._last) >= self._max_keys:
            self._last.clear()
        self._last[key] = now
        self._log(line)
        return True
