"""What clients' verification says of the agents: trust scores, quarantine, and who may report what.

A client started with ``gp.connect(verify=...)`` re-runs a sample of its programs on a second agent and
tells the coordinator whether the results agreed (``ReportVerification``). :class:`TrustBook` keeps, per
agent, how many checks were reported and how many disagreed; an agent with ``quarantine_after``
mismatches is quarantined (placement skips it, as it skips cordoned agents) until an operator takes it
back with ``gpupool uncordon``.

A client is not trusted blindly. It may report only on agents the coordinator placed rows on for its
session (the agent checked and the one that re-ran the program), so it cannot name an arbitrary rig;
and each session's mismatch reports are rate-limited (a burst, then one per interval), so one session
cannot turn a stream of made-up mismatches into quarantines faster than that. Pure state, tested
without a network; its clock is an argument. One event loop owns it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Final

from gpupool._errors import AuthError, UsageError

__all__ = [
    "DEFAULT_QUARANTINE_AFTER",
    "DETAIL_CHARS",
    "MISMATCH_BURST",
    "MISMATCH_INTERVAL",
    "AgentQuarantined",
    "TrustBook",
    "TrustRecord",
    "Verdict",
]

#: Mismatches that quarantine an agent (``gpupool coordinator --quarantine-after``).
DEFAULT_QUARANTINE_AFTER: Final = 2
#: Mismatch reports a session may make at once, and the seconds after which it may make one more.
MISMATCH_BURST: Final = 4
MISMATCH_INTERVAL: Final = 60.0
#: Characters of a client's detail kept (for the log and the quarantine reason).
DETAIL_CHARS: Final = 256
#: Seconds between saves that only agreements would cause (a mismatch or a release is saved at once).
SAVE_INTERVAL: Final = 10.0


@dataclass(frozen=True, slots=True)
class TrustRecord:
    """What verification found of one agent.

    Attributes:
        checks: reports counted about it.
        mismatches: of them, results that disagreed.
        quarantined: whether placement skips it.
        reason: why it was quarantined ("" when it is not).
    """

    checks: int = 0
    mismatches: int = 0
    quarantined: bool = False
    reason: str = ""

    @property
    def score(self) -> float:
        """The Laplace-smoothed share of checks that agreed: (agreed + 1) / (checks + 2); 0.5 unchecked."""
        return (self.checks - self.mismatches + 1) / (self.checks + 2)


@dataclass(frozen=True, slots=True)
class AgentQuarantined:
    """An agent reached the mismatch limit: placement skips it from now on."""

    agent_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one report did.

    Attributes:
        trust: the agent's record after it.
        counted: False for a mismatch over the session's rate limit (nothing changed).
        note: why it was not counted.
        quarantined: the event, when this report quarantined the agent.
    """

    trust: TrustRecord
    counted: bool = True
    note: str = ""
    quarantined: AgentQuarantined | None = None


class TrustBook:
    """Every agent's :class:`TrustRecord`, the agents each running session was placed on, and each
    session's allowance of mismatch reports.

    Args:
        quarantine_after: mismatches that quarantine an agent (at least 1).
        burst: mismatch reports a session may make at once.
        interval: seconds after which a session may make one more.
        save: called with :meth:`dump`'s text after a change worth keeping across a restart (every
            mismatch and release at once; agreements at most every :data:`SAVE_INTERVAL` seconds).
    """

    def __init__(
        self,
        *,
        quarantine_after: int = DEFAULT_QUARANTINE_AFTER,
        burst: int = MISMATCH_BURST,
        interval: float = MISMATCH_INTERVAL,
        save: Callable[[str], None] | None = None,
    ) -> None:
        if quarantine_after < 1:
            raise UsageError(f"quarantine_after must be at least 1, not {quarantine_after}")
        self.quarantine_after = quarantine_after
        self._burst = burst
        self._interval = interval
        self._save = save
        self._saved_at = float("-inf")
        self._records: dict[str, TrustRecord] = {}
        self._placed: dict[str, set[str]] = {}
        self._allowance: dict[str, tuple[float, float]] = {}

    def get(self, agent_id: str) -> TrustRecord:
        """The agent's record (a fresh one for an agent never checked)."""
        return self._records.get(agent_id) or TrustRecord()

    def quarantined(self) -> list[str]:
        """The ids of the quarantined agents, sorted."""
        return sorted(agent_id for agent_id, record in self._records.items() if record.quarantined)

    def placed(self, session: str, agent_ids: Iterable[str]) -> None:
        """Remember that the coordinator placed rows of ``session`` on ``agent_ids`` (it may report on
        them)."""
        self._placed.setdefault(session, set()).update(agent_ids)

    def session_ended(self, session: str) -> None:
        """Forget what the ended session was placed on and its allowance."""
        self._placed.pop(session, None)
        self._allowance.pop(session, None)

    def report(
        self,
        session: str,
        agent_id: str,
        reference_agent_id: str,
        *,
        agreed: bool,
        detail: str = "",
        now: float,
    ) -> Verdict:
        """Count one verification outcome about ``agent_id``, checked against ``reference_agent_id``.

        Raises:
            UsageError: no agent named, or the agent named as its own reference.
            AuthError: the coordinator did not place rows on both agents for this session; the
                servicer refuses the call with PERMISSION_DENIED.
        """
        if not agent_id or not reference_agent_id:
            raise UsageError("a verification report names the agent checked and the agent that re-ran it")
        if agent_id == reference_agent_id:
            raise UsageError(f"agent {agent_id} cannot verify its own result")
        placed = self._placed.get(session, set())
        strangers = [a for a in (agent_id, reference_agent_id) if a not in placed]
        if strangers:
            raise AuthError(
                f"session {session} may report only on agents the coordinator placed its rows on, "
                f"and it was never placed on {', '.join(strangers)}"
            )
        record = self.get(agent_id)
        if agreed:
            record = replace(record, checks=record.checks + 1)
            self._records[agent_id] = record
            self._saved(now, urgent=False)
            return Verdict(record)
        if not self._allow_mismatch(session, now):
            note = (
                f"not counted: session {session} is over its limit of {self._burst} mismatch reports "
                f"(one more each {self._interval:g} s)"
            )
            return Verdict(record, counted=False, note=note)
        record = replace(record, checks=record.checks + 1, mismatches=record.mismatches + 1)
        event = None
        if not record.quarantined and record.mismatches >= self.quarantine_after:
            reason = (
                f"{record.mismatches} of {record.checks} verified results disagreed with another agent's; "
                f"last: {detail[:DETAIL_CHARS] or 'no detail'}"
            )
            record = replace(record, quarantined=True, reason=reason)
            event = AgentQuarantined(agent_id, reason)
        self._records[agent_id] = record
        self._saved(now, urgent=True)
        return Verdict(record, quarantined=event)

    def release(self, agent_id: str, *, now: float) -> TrustRecord | None:
        """Take a quarantined agent back with a clean record; the old record, or None if it was not
        quarantined (nothing changes then)."""
        record = self._records.get(agent_id)
        if record is None or not record.quarantined:
            return None
        del self._records[agent_id]
        self._saved(now, urgent=True)
        return record

    def forget(self, agent_id: str, *, now: float) -> None:
        """Drop the agent's record (``gpupool forget``: it must enrol again, under a new id)."""
        if self._records.pop(agent_id, None) is not None:
            self._saved(now, urgent=True)

    def dump(self) -> str:
        """The records as JSON, for :meth:`load` after a restart."""
        return json.dumps(
            {
                agent_id: [record.checks, record.mismatches, record.quarantined, record.reason]
                for agent_id, record in sorted(self._records.items())
            },
            separators=(",", ":"),
        )

    def load(self, text: str) -> list[str]:
        """Take back records :meth:`dump` wrote; the agents quarantined among them.

        Raises:
            UsageError: text that :meth:`dump` did not write.
        """
        try:
            loaded = json.loads(text)
            records = {
                str(agent_id): TrustRecord(int(checks), int(mismatches), bool(quarantined), str(reason))
                for agent_id, (checks, mismatches, quarantined, reason) in loaded.items()
            }
        except (ValueError, TypeError, AttributeError) as exc:
            raise UsageError(f"unreadable agent trust records: {exc}") from exc
        self._records.update(records)
        return sorted(agent_id for agent_id, record in records.items() if record.quarantined)

    def _allow_mismatch(self, session: str, now: float) -> bool:
        """Take one from the session's allowance (a token bucket), if there is one left."""
        tokens, at = self._allowance.get(session, (float(self._burst), now))
        tokens = min(float(self._burst), tokens + max(0.0, now - at) / self._interval)
        if tokens < 1.0:
            self._allowance[session] = (tokens, now)
            return False
        self._allowance[session] = (tokens - 1.0, now)
        return True

    def _saved(self, now: float, *, urgent: bool) -> None:
        if self._save is not None and (urgent or now - self._saved_at >= SAVE_INTERVAL):
            self._saved_at = now
            self._save(self.dump())
