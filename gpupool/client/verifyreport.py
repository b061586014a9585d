"""Telling the coordinator what verification found: one ``ReportVerification`` call per compared result.

A session started with ``gp.connect(..., verify=...)`` re-runs a sample of programs on a second agent and
compares the results; :func:`report_verification` hands the verdict to the coordinator, which keeps each
agent's trust score and quarantines an agent once enough of its results disagreed (placement skips it;
``gpupool agents`` shows it). The coordinator believes a session only about agents it placed that
session's rows on (both the agent checked and the one that re-ran the program), and counts at most a
few mismatch reports per session per minute.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gpupool._proto.v1 import coordinator_pb2

__all__ = ["CallCoordinator", "VerificationOutcome", "report_verification"]

CallCoordinator = Callable[[str, Any], Awaitable[Any]]
"""Calls a Coordinator method by name with a request and returns its reply, raising gpupool's exceptions
(``Session.call_coordinator``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class VerificationOutcome:
    """The coordinator's answer to one report: the agent's standing after it.

    Attributes:
        agent_id: the agent the report was about.
        counted: False when the session was over its limit of mismatch reports (nothing changed).
        note: why it was not counted.
        score: (agreed + 1) / (checks + 2) over every session's reports.
        checks: reports counted about the agent.
        mismatches: of them, results that disagreed.
        quarantined: whether placement skips the agent now (its work should be redone elsewhere).
        reason: why it was quarantined.
    """

    agent_id: str
    counted: bool
    note: str
    score: float
    checks: int
    mismatches: int
    quarantined: bool
    reason: str


async def report_verification(
    call: CallCoordinator,
    session: str,
    *,
    agent_id: str,
    reference_agent_id: str,
    agreed: bool,
    detail: str = "",
) -> VerificationOutcome:
    """Report whether ``agent_id``'s result agreed with the same program re-run on ``reference_agent_id``.

    Call it on the session's event loop, once per compared result, agreements included (they raise the
    agent's score). ``agreed=False`` says the client judged ``agent_id``'s result the wrong one; ``detail``
    (what differed, e.g. the first bad element) goes to the coordinator's log and the quarantine reason.

    Raises:
        AuthError: the coordinator did not place this session's rows on both agents, or the session is
            another token's; a client's bug, not a fault of the agents.
        UsageError: no agent named, or the same agent twice.
        PlacementError: the session has ended or is unknown.
        ConnectError, DeadlineExceeded: the coordinator could not be reached; the caller may drop the
            report (verification goes on) or try again later.
    """
    request = coordinator_pb2.ReportVerificationRequest(
        session=session,
        agent_id=agent_id,
        reference_agent_id=reference_agent_id,
        agreed=agreed,
        detail=detail[:256],
    )
    reply: coordinator_pb2.ReportVerificationReply = await call("ReportVerification", request)
    trust = reply.trust
    return VerificationOutcome(
        agent_id=agent_id,
        counted=reply.counted,
        note=reply.note,
        score=trust.score,
        checks=trust.checks,
        mismatches=trust.mismatches,
        quarantined=trust.quarantined,
        reason=trust.reason,
    )
