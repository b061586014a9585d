"""Bounded retries with full-jitter exponential backoff."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Full-jitter exponential backoff: the n-th delay is uniform in [0, min(cap, base * 2**n)].

    Attributes:
        base: the first delay's upper bound, in seconds.
        cap: the largest delay's upper bound.
        attempts: how many delays to yield; None for no bound (a reconnect loop that runs until closed).
    """

    base: float = 0.1
    cap: float = 5.0
    attempts: int | None = 8

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The delays to sleep between tries, in order."""
        draw = (rng or random).uniform
        n = 0
        while self.attempts is None or n < self.attempts:
            yield draw(0.0, min(self.cap, self.base * (2 ** min(n, 32))))
            n += 1
