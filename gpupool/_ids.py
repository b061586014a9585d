"""Distinct id types, so an agent id is never passed where a buffer id belongs."""

from __future__ import annotations

import secrets
from typing import NewType

__all__ = ["AgentId", "BufferId", "JobId", "new_agent_id", "new_buffer_id", "new_job_id"]

AgentId = NewType("AgentId", str)
BufferId = NewType("BufferId", str)
JobId = NewType("JobId", str)


def new_agent_id() -> AgentId:
    """A fresh agent id: 12 hex digits, unique for the pool's lifetime with overwhelming odds."""
    return AgentId(secrets.token_hex(6))


def new_job_id() -> JobId:
    """A fresh job (client session) id."""
    return JobId("job-" + secrets.token_hex(6))


def new_buffer_id(session: str, serial: int) -> BufferId:
    """The id of a session's ``serial``-th buffer: unique per agent because sessions are, and not
    guessable (48 random bits), so knowing a session's id does not name its buffers."""
    return BufferId(f"{session}.{serial}.{secrets.token_hex(6)}")
