"""The coordinator's event log: a line per event while they are few, one summary line per burst."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gpupool._proto.v1 import control_pb2
from gpupool.coordinator.eventlog import EventLog
from gpupool.coordinator.registry import AgentRegistered, AgentWentOffline

READY = control_pb2.AGENT_STATE_READY


def test_a_burst_is_logged_as_its_first_events_and_one_summary(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gpupool.coordinator.eventlog")

    async def burst() -> None:
        events = EventLog(describe=lambda: "1000 agents known: 1000 ready", burst=3, window=0.2)
        for n in range(1000):
            events.record(AgentRegistered(f"a{n}", f"rig{n}", READY))
        events.record(AgentWentOffline("a7", "rig7", READY))
        await asyncio.sleep(0.3)  # the window closes: its summary
        events.record(AgentRegistered("late", "late", READY))  # a new window: logged on its own

    asyncio.run(burst())
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("INFO", "agent a0 (rig0) registered, ready"),
        ("INFO", "agent a1 (rig1) registered, ready"),
        ("INFO", "agent a2 (rig2) registered, ready"),
        (
            "WARNING",
            "and 998 more agent events within 0.2 s, not logged one by one: 997 registered, 1 went offline; "
            "now 1000 agents known: 1000 ready",
        ),
        ("INFO", "agent late (late) registered, ready"),
    ]


def test_flush_logs_what_is_held_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gpupool.coordinator.eventlog")

    async def stop_early() -> None:
        events = EventLog(describe=lambda: "2 agents known", burst=1, window=60.0)
        events.record(AgentRegistered("a", "a", READY))
        events.record(AgentRegistered("b", "b", READY))
        events.flush()
        events.flush()  # nothing left: no second summary

    asyncio.run(stop_early())
    assert [r.getMessage() for r in caplog.records][1:] == [
        "and 1 more agent events within 60 s, not logged one by one: 1 registered; now 2 agents known"
    ]
