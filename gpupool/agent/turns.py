"""Turns on a worker's device: one op computes at a time, and sessions take turns round-robin.

Several programs may be in flight on one worker, each in a thread of its own, but each op (or fused run)
waits for a turn first. When a turn ends, the next one goes to the session that has waited longest, so a
session gets consecutive turns only while nobody else waits, and a long program of one session holds a
small op of another for about one op, not for the whole program.
"""

from __future__ import annotations

import threading
from collections import deque

__all__ = ["TurnGate"]


class TurnGate:
    """One worker's turns, handed round-robin across the sessions that wait for one.

    Contract: a thread calls :meth:`acquire` before its op and :meth:`release` after it, exactly once
    each, in that order; the holder does not ask again before releasing. Thread-safe.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._held = False
        self._granted: object | None = None  # the ticket the last release handed the turn to
        self._sessions: deque[str] = deque()  # sessions with a waiting ticket, longest waiting first
        self._tickets: dict[str, deque[object]] = {}

    def acquire(self, session: str) -> None:
        """Wait for a turn on behalf of ``session``."""
        with self._condition:
            if not self._held and not self._sessions:
                self._held = True
                return
            ticket = object()
            waiting = self._tickets.get(session)
            if waiting is None:
                self._tickets[session] = waiting = deque()
                self._sessions.append(session)
            waiting.append(ticket)
            while self._granted is not ticket:
                self._condition.wait()
            self._granted = None

    def release(self) -> None:
        """End the turn: hand it to the next waiting session, if any."""
        with self._condition:
            if not self._sessions:
                self._held = False
                return
            session = self._sessions.popleft()
            waiting = self._tickets[session]
            self._granted = waiting.popleft()
            if waiting:
                self._sessions.append(session)  # its next ticket waits behind the other sessions
            else:
                del self._tickets[session]
            self._condition.notify_all()

    def waiting(self) -> int:
        """How many turns are asked for and not yet given."""
        with self._condition:
            return sum(len(tickets) for tickets in self._tickets.values())

    def idle(self) -> bool:
        """Whether nobody holds a turn or waits for one."""
        with self._condition:
            return not self._held and not self._sessions
