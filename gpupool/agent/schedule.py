"""The rig owner's pause schedule: when the agent gives its GPUs back to its owner by itself.

A schedule is a list of windows, each ``[DAYS] HH:MM-HH:MM`` in the rig's local time: ``Mon-Fri 08:00-18:00``,
``Sat,Sun 10:00-12:00``, ``daily 22:00-06:00``. DAYS is ``daily`` (also ``*``, or left out), or a comma list
of days (``Mon``, ``tue``, ``Wednesday``) and ranges of days (``Mon-Fri``; ``Fri-Mon`` wraps past Sunday);
they are the days a window *starts* on. ``24:00`` ends a window at midnight; a window whose end is not after
its start runs past midnight into the next day. The agent is paused while any window holds
(:func:`paused_at`), pausing and resuming at the windows' edges as ``gpupool-agent pause`` and ``resume`` do.

Pure: no clock of its own, no network.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from gpupool._errors import UsageError

__all__ = ["DAY_NAMES", "PauseWindow", "parse_schedule", "parse_window", "paused_at"]

DAY_NAMES: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_DAY_NAMES: Final = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_EVERY_DAY: Final = frozenset(range(7))
_MINUTES_PER_DAY: Final = 24 * 60
_WINDOW: Final = re.compile(
    r"^\s*(?:(?P<days>\S+)\s+)?(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class PauseWindow:
    """One window of a pause schedule.

    Attributes:
        days: the weekdays it starts on (0 is Monday, as :meth:`datetime.weekday`).
        start: its start, in minutes after midnight (0 to 1439).
        end: its end, in minutes after midnight (1 to 1440); not after ``start``: on the next day.
        text: as written.
    """

    days: frozenset[int]
    start: int
    end: int
    text: str

    def holds(self, weekday: int, minute: int) -> bool:
        """Whether the window holds at ``minute`` after midnight of weekday ``weekday``."""
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        # Past midnight: from the start to midnight on its own day, then until the end on the next.
        return (weekday in self.days and minute >= self.start) or (
            (weekday - 1) % 7 in self.days and minute < self.end
        )


def parse_window(text: str) -> PauseWindow:
    """One window, ``[DAYS] HH:MM-HH:MM`` (see the module).

    Raises:
        UsageError: it is not one; the message says what is wrong.
    """
    match = _WINDOW.match(text)
    if match is None:
        raise UsageError(
            f"a pause window reads [DAYS] HH:MM-HH:MM, e.g. 'Mon-Fri 08:00-18:00' or 'daily 22:00-06:00'; "
            f"not {text!r}"
        )
    days = _parse_days(match.group("days") or "daily", text)
    start = _parse_minute(match.group("start"), text, allow_midnight_end=False)
    end = _parse_minute(match.group("end"), text, allow_midnight_end=True)
    if start == end:
        raise UsageError(
            f"pause window {text!r} is empty (it starts when it ends); 00:00-24:00 is a whole day"
        )
    return PauseWindow(days=days, start=start, end=end, text=text.strip())


def parse_schedule(texts: Iterable[str]) -> tuple[PauseWindow, ...]:
    """Windows from ``texts``, each of which may hold several separated by ``;`` (as an environment variable
    gives them); empty pieces are skipped.

    Raises:
        UsageError: a window that does not read (see :func:`parse_window`).
    """
    return tuple(parse_window(piece) for text in texts for piece in text.split(";") if piece.strip())


def paused_at(schedule: Sequence[PauseWindow], when: datetime) -> bool:
    """Whether the agent should be paused at ``when`` (the rig's local time, naive or aware alike)."""
    minute = when.hour * 60 + when.minute
    weekday = when.weekday()
    return any(window.holds(weekday, minute) for window in schedule)


def _parse_days(text: str, window: str) -> frozenset[int]:
    lowered = text.lower()
    if lowered in ("daily", "*", "every"):
        return _EVERY_DAY
    days: set[int] = set()
    for part in lowered.split(","):
        first, dash, last = part.partition("-")
        start = _day(first, window)
        if not dash:
            days.add(start)
            continue
        stop = _day(last, window)
        day = start
        while True:  # Fri-Mon wraps past Sunday
            days.add(day)
            if day == stop:
                break
            day = (day + 1) % 7
    return frozenset(days)


def _day(text: str, window: str) -> int:
    name = text.strip()
    if name in DAY_NAMES:
        return DAY_NAMES.index(name)
    if name in _FULL_DAY_NAMES:
        return _FULL_DAY_NAMES.index(name)
    raise UsageError(
        f"pause window {window!r}: {text!r} is not a day (Mon Tue Wed Thu Fri Sat Sun, a range like "
        "Mon-Fri, or daily)"
    )


def _parse_minute(text: str, window: str, *, allow_midnight_end: bool) -> int:
    hours, _, minutes = text.partition(":")
    hour, minute = int(hours), int(minutes)
    total = hour * 60 + minute
    if minute >= 60 or total > _MINUTES_PER_DAY or (total == _MINUTES_PER_DAY and not allow_midnight_end):
        raise UsageError(f"pause window {window!r}: {text} is not a time of day (00:00 to 24:00)")
    return total
