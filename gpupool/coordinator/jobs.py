"""Client sessions, tracked as jobs for ``gpupool jobs``: pure state, tested without a network.

A client's Connect starts a job (its id is the session id), each Place counts an array and its bytes,
and Disconnect ends it. Ended jobs are kept for a while, newest last, so an operator sees recent work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gpupool._errors import PlacementError
from gpupool._ids import JobId, new_job_id

__all__ = ["Job", "JobState", "Jobs"]

JobState = Literal["running", "ended"]


@dataclass(slots=True)
class Job:
    """One client session.

    Attributes:
        job_id: the job's id, which is also the session id the client sends.
        client: who connected (``user@host``), as the client said.
        client_version: the client's gpupool version.
        started: when Connect came, in seconds since the epoch.
        state: ``"running"`` until Disconnect, then ``"ended"``.
        arrays_placed: Place calls answered.
        bytes_placed: bytes of the arrays placed.
        ended: when Disconnect came, if it did.
    """

    job_id: JobId
    client: str
    client_version: str
    started: float
    state: JobState = "running"
    arrays_placed: int = 0
    bytes_placed: int = 0
    ended: float | None = None


class Jobs:
    """The coordinator's jobs, running and recently ended. One event loop owns it.

    Args:
        keep_ended: how many ended jobs to keep listing; older ones are dropped.
    """

    def __init__(self, *, keep_ended: int = 100) -> None:
        self._keep_ended = keep_ended
        self._jobs: dict[str, Job] = {}

    def connect(self, client: str, client_version: str, *, now: float) -> Job:
        """Start a job for a newly connected client."""
        job = Job(new_job_id(), client or "unknown", client_version, now)
        self._jobs[job.job_id] = job
        return job

    def running(self, session: str) -> Job:
        """The running job of this session.

        Raises:
            PlacementError: no such session, or it has ended (the coordinator refuses the call).
        """
        job = self._jobs.get(session)
        if job is None:
            raise PlacementError(
                f"unknown session {session!r}: connect first (the coordinator may have restarted)"
            )
        if job.state != "running":
            raise PlacementError(f"session {session!r} has ended")
        return job

    def record_placement(self, session: str, nbytes: int) -> Job:
        """Count one placed array of ``nbytes`` against the session's job.

        Raises:
            PlacementError: no such running session.
        """
        job = self.running(session)
        job.arrays_placed += 1
        job.bytes_placed += nbytes
        return job

    def disconnect(self, session: str, *, now: float) -> Job:
        """End the session's job; ending an ended job again changes nothing.

        Raises:
            PlacementError: no such session.
        """
        job = self._jobs.get(session)
        if job is None:
            raise PlacementError(f"unknown session {session!r}")
        if job.state == "running":
            job.state = "ended"
            job.ended = now
            self._drop_old_ended()
        return job

    def list(self) -> list[Job]:
        """Every job kept, oldest first."""
        return sorted(self._jobs.values(), key=lambda job: (job.started, job.job_id))

    def running_count(self) -> int:
        """How many jobs are running."""
        return sum(1 for job in self._jobs.values() if job.state == "running")

    def _drop_old_ended(self) -> None:
        ended = sorted((j for j in self._jobs.values() if j.state == "ended"), key=lambda j: j.ended or 0.0)
        for job in ended[: max(0, len(ended) - self._keep_ended)]:
            del self._jobs[job.job_id]
