"""The rig owner's pause schedule (gpupool.agent.schedule): pure, a clock given, no network."""

from __future__ import annotations

from datetime import datetime

import pytest

from gpupool._errors import UsageError
from gpupool.agent.schedule import parse_schedule, parse_window, paused_at

# 2026-11-30 is a Monday.
MONDAY = 30


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute) if day <= 30 else datetime(2026, 12, day - 30, hour, minute)


def test_working_hours_on_weekdays() -> None:
    schedule = parse_schedule(["Mon-Fri 08:00-18:00"])
    assert paused_at(schedule, at(MONDAY, 8))
    assert paused_at(schedule, at(MONDAY, 17, 59))
    assert not paused_at(schedule, at(MONDAY, 18))
    assert not paused_at(schedule, at(MONDAY, 7, 59))
    assert paused_at(schedule, at(MONDAY + 4, 12))  # Friday
    assert not paused_at(schedule, at(MONDAY + 5, 12))  # Saturday


def test_a_window_past_midnight_belongs_to_the_day_it_starts() -> None:
    schedule = parse_schedule(["Fri 22:00-06:00"])
    assert paused_at(schedule, at(MONDAY + 4, 23))  # Friday night
    assert paused_at(schedule, at(MONDAY + 5, 5, 59))  # Saturday morning
    assert not paused_at(schedule, at(MONDAY + 5, 6))
    assert not paused_at(schedule, at(MONDAY + 3, 23))  # Thursday night
    assert not paused_at(schedule, at(MONDAY + 4, 5))  # Friday morning: Thursday's window, not there


def test_days_lists_ranges_wrapping_daily_and_whole_days() -> None:
    assert parse_window("Sat,Sun 10:00-12:00").days == frozenset({5, 6})
    assert parse_window("Fri-Mon 10:00-12:00").days == frozenset({4, 5, 6, 0})
    assert parse_window("wednesday 10:00-12:00").days == frozenset({2})
    assert parse_window("10:00-12:00").days == parse_window("daily 10:00-12:00").days == frozenset(range(7))
    whole = parse_schedule(["daily 00:00-24:00"])
    assert all(paused_at(whole, at(MONDAY + d, h, 30)) for d in range(7) for h in (0, 12, 23))


def test_several_windows_in_one_text_and_in_many() -> None:
    schedule = parse_schedule(["Mon 08:00-09:00; Tue 08:00-09:00", "", "Wed 08:00-09:00"])
    assert len(schedule) == 3
    assert [paused_at(schedule, at(MONDAY + d, 8, 30)) for d in range(4)] == [True, True, True, False]
    assert not paused_at(parse_schedule([]), at(MONDAY, 8))


@pytest.mark.parametrize(
    "text",
    [
        "Mon-Fri",
        "Mon-Fri 8-18",
        "Moon 08:00-09:00",
        "Mon 25:00-26:00",
        "Mon 08:60-09:00",
        "Mon 09:00-09:00",
        "Mon 24:00-01:00",
        "Mon-Fri 08:00 18:00",
    ],
)
def test_a_window_that_does_not_read_is_refused(text: str) -> None:
    with pytest.raises(UsageError):
        parse_window(text)
