"""Which MQTT statuses and telemetry the coordinator believes: enrolled, signed, sane, not replayed.

A broker ACL keeps agents to their own topics, but the coordinator does not rely on it alone: on a broker
without one (or with a stolen password) a forged status must still not turn into placements. So every
payload is checked here before the registry sees it:

- its size is under :data:`MAX_PAYLOAD_BYTES` and its fields are in range;
- its agent id is enrolled and not revoked (unless ``allow_unenrolled``, a development setting);
- it is signed with the key of the agent's enrolled certificate, whose fingerprint it names;
- a status is newer than the last one accepted from the agent (a replayed READY must not revive a dead
  agent), except for the agent's own last will (OFFLINE, same start time), and not from an earlier
  start of the agent; telemetry is newer than the last accepted and at most :data:`MAX_TELEMETRY_AGE`
  old by the coordinator's clock (a replayed report must not keep a dead agent alive).

Rejections raise :class:`Dropped`; the caller logs one line per agent and reason (:class:`DropLog`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from gpupool._config import parse_endpoint
from gpupool._errors import GpupoolError, ProtocolError, UsageError
from gpupool._proto.v1 import control_pb2
from gpupool._proto.v1.control_pb2 import AgentStatus, AgentTelemetry
from gpupool._ratelog import RateLimitedLog
from gpupool.protocol.codec import decode_json
from gpupool.security.pki import load_certificate
from gpupool.security.signing import verify_message
from gpupool.security.store import StateStore

__all__ = ["MAX_PAYLOAD_BYTES", "Admission", "DropLog", "Dropped"]

#: Largest status or telemetry payload taken (a status with 16 GPUs is about 8 KiB).
MAX_PAYLOAD_BYTES: Final = 64 << 10
#: Oldest telemetry believed, in seconds by the coordinator's clock (agents report every few seconds;
#: rigs and coordinator are expected to keep their clocks within this of each other, e.g. with NTP).
MAX_TELEMETRY_AGE: Final = 120.0
_MAX_WORKERS: Final = 64
_MAX_TEXT: Final = 512
_MAX_BYTES_FIELD: Final = 1 << 56

M = TypeVar("M", AgentStatus, AgentTelemetry)


class Dropped(GpupoolError):
    """A payload the coordinator does not believe.

    Args:
        agent_id: the topic's agent.
        reason: why, in a few words (also the key of the rate-limited log line).
    """

    def __init__(self, agent_id: str, reason: str, *, quiet: bool = False) -> None:
        self.agent_id = agent_id
        self.reason = reason
        self.quiet = quiet  # a harmless repeat (a retained status delivered again): counted, not logged
        super().__init__(f"dropped a payload for agent {agent_id}: {reason}")


@dataclass(slots=True)
class _Known:
    public_key: Any
    fingerprint: str
    revoked: bool
    checked: float


class Admission:
    """Checks statuses and telemetry against enrolment.

    Args:
        store: enrolled agents.
        allow_unenrolled: take unsigned payloads of agents that never enrolled (agents run with
            ``--insecure``); enrolled agents are still held to their signatures.
        clock: seconds (monotonic) for the enrolment cache.
        cache_seconds: how long an enrolment look-up is trusted (a revocation takes effect within it).
    """

    def __init__(
        self,
        store: StateStore,
        *,
        allow_unenrolled: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        cache_seconds: float = 2.0,
    ) -> None:
        self._store = store
        self._allow_unenrolled = allow_unenrolled
        self._clock = clock
        self._wall_clock = wall_clock
        self._telemetry_times: dict[str, float] = {}
        self._cache_seconds = cache_seconds
        self._known: dict[str, _Known | None] = {}
        self._checked_missing: dict[str, float] = {}
        # agent id -> (started, updated, state) of the newest status accepted
        self._latest: dict[str, tuple[float, float, int]] = {}

    def forget(self, agent_id: str) -> None:
        """Drop what is cached of an agent (after ``gpupool forget``)."""
        self._known.pop(agent_id, None)
        self._checked_missing.pop(agent_id, None)
        self._latest.pop(agent_id, None)
        self._telemetry_times.pop(agent_id, None)

    def check_forgettable(self, agent_id: str) -> None:
        """Whether an empty (cleared) status may remove the agent: only one not enrolled, or revoked.

        Raises:
            Dropped: the agent is enrolled and not revoked (anyone on an open broker can clear a topic;
                ``gpupool forget`` revokes the enrolment first).
        """
        known = self._enrolment(agent_id)
        if known is not None and not known.revoked:
            raise Dropped(agent_id, "an empty status for an enrolled agent (gpupool forget removes one)")

    def _enrolment(self, agent_id: str) -> _Known | None:
        now = self._clock()
        known = self._known.get(agent_id)
        if known is not None and now - known.checked < self._cache_seconds:
            return known
        if known is None and now - self._checked_missing.get(agent_id, -1e9) < self._cache_seconds:
            return None
        record = self._store.get_agent(agent_id)
        if record is None:
            self._known.pop(agent_id, None)
            self._checked_missing[agent_id] = now
            return None
        if known is None or known.fingerprint != record.fingerprint:
            known = _Known(
                load_certificate(record.certificate_pem).public_key(), record.fingerprint, False, now
            )
        known.revoked = record.revoked is not None
        known.checked = now
        self._known[agent_id] = known
        return known

    def _check_signed(
        self, agent_id: str, message: AgentStatus | AgentTelemetry, fingerprint: str | None
    ) -> bool:
        """Whether the message is signed by the enrolled agent; False when it may pass unsigned."""
        known = self._enrolment(agent_id)
        if known is None:
            if self._allow_unenrolled:
                return False
            raise Dropped(agent_id, "not an enrolled agent of this pool")
        if known.revoked:
            raise Dropped(agent_id, "its enrolment was revoked")
        if fingerprint is not None and fingerprint != known.fingerprint:
            raise Dropped(agent_id, "names a certificate other than the enrolled one")
        if not verify_message(message, known.public_key):
            raise Dropped(agent_id, "bad or missing signature")
        return True

    def status(self, agent_id: str, payload: bytes) -> AgentStatus:
        """The status on agent ``agent_id``'s topic, if it is to be believed.

        Raises:
            Dropped: why not.
        """
        status = _decode(agent_id, payload, AgentStatus, "status")
        _check_status_fields(agent_id, status)
        self._check_signed(agent_id, status, status.certificate_fingerprint)
        started = status.started.ToNanoseconds() / 1e9
        updated = status.updated.ToNanoseconds() / 1e9
        latest = self._latest.get(agent_id)
        if latest is not None:
            if started < latest[0]:
                raise Dropped(agent_id, "a status of an earlier start of the agent (a replay?)")
            own_will = status.state == control_pb2.AGENT_STATE_OFFLINE and started == latest[0]
            if own_will and latest[2] == control_pb2.AGENT_STATE_OFFLINE and updated <= latest[1]:
                raise Dropped(agent_id, "the last will already accepted", quiet=True)
            if own_will:
                # The last will is made at start (so it is older than what followed), and it ends this
                # start: a status of the same start is believed again only if it is newer than any seen.
                self._latest[agent_id] = (started, latest[1], status.state)
                return status
            if updated == latest[1] and started == latest[0]:
                raise Dropped(agent_id, "the status already accepted", quiet=True)
            if updated < latest[1]:
                raise Dropped(agent_id, "older than the status already accepted (a replay?)")
        self._latest[agent_id] = (started, updated, status.state)
        return status

    def telemetry(self, agent_id: str, payload: bytes) -> AgentTelemetry:
        """The telemetry on agent ``agent_id``'s topic, if it is to be believed.

        Raises:
            Dropped: why not.
        """
        telemetry = _decode(agent_id, payload, AgentTelemetry, "telemetry")
        if len(telemetry.workers) > _MAX_WORKERS:
            raise Dropped(agent_id, f"telemetry with {len(telemetry.workers)} workers")
        for worker in telemetry.workers:
            if max(worker.memory_used, worker.memory_limit, worker.gpu_memory_free) > _MAX_BYTES_FIELD:
                raise Dropped(agent_id, "telemetry memory figures out of range")
        self._check_signed(agent_id, telemetry, None)
        sent = telemetry.time.ToNanoseconds() / 1e9
        if sent <= self._telemetry_times.get(agent_id, 0.0):
            raise Dropped(agent_id, "telemetry not newer than the last accepted (a replay?)")
        if sent < self._wall_clock() - MAX_TELEMETRY_AGE:
            raise Dropped(
                agent_id, f"telemetry more than {MAX_TELEMETRY_AGE:g} s old (a replay, or a skewed clock?)"
            )
        self._telemetry_times[agent_id] = sent
        return telemetry


def _decode(agent_id: str, payload: bytes, message_type: type[M], what: str) -> M:
    """The payload on agent ``agent_id``'s topic decoded, small enough, and naming that agent (or none)."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise Dropped(agent_id, f"{what} of {len(payload)} bytes is over {MAX_PAYLOAD_BYTES}")
    try:
        message = decode_json(payload, message_type, what=f"{what} of agent {agent_id}")
    except ProtocolError as exc:
        raise Dropped(agent_id, f"undecodable {what}: {exc}") from exc
    if message.agent_id and message.agent_id != agent_id:
        raise Dropped(agent_id, f"{what} names agent {message.agent_id[:64]!r}")
    message.agent_id = agent_id
    return message


def _check_status_fields(agent_id: str, status: AgentStatus) -> None:
    if status.state not in control_pb2.AgentState.values() or status.state == 0:
        raise Dropped(agent_id, f"unknown state {status.state}")
    if len(status.workers) > _MAX_WORKERS:
        raise Dropped(agent_id, f"status with {len(status.workers)} workers")
    for text in (status.name, status.version, status.endpoint, status.backend, status.hostname, status.note):
        if len(text) > _MAX_TEXT:
            raise Dropped(agent_id, "a text field over 512 characters")
    if status.state != control_pb2.AGENT_STATE_OFFLINE:
        try:
            _, port = parse_endpoint(status.endpoint)
        except UsageError as exc:
            raise Dropped(agent_id, f"endpoint {status.endpoint[:64]!r} is not HOST:PORT") from exc
        if not 0 < port < 65536:
            raise Dropped(agent_id, f"endpoint port {port} out of range")
    indexes = set()
    for worker in status.workers:
        if worker.index in indexes or worker.index > 1024:
            raise Dropped(agent_id, f"worker index {worker.index} repeated or out of range")
        indexes.add(worker.index)
        if max(worker.memory_limit, worker.memory_used) > _MAX_BYTES_FIELD:
            raise Dropped(agent_id, "worker memory figures out of range")


class DropLog:
    """One log line per agent and reason per ``interval`` seconds, however many payloads are dropped.

    Args:
        log: called with the line.
        interval: seconds between repeats of the same (agent, reason).
        clock: monotonic seconds.
    """

    def __init__(
        self,
        log: Callable[[str], None],
        *,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lines = RateLimitedLog(log, interval=interval, clock=clock)
        self.dropped = 0

    def record(self, dropped: Dropped) -> None:
        """Count a dropped payload; log it unless it is a harmless repeat or was logged lately."""
        self.dropped += 1
        if not dropped.quiet:
            self._lines.emit((dropped.agent_id[:64], dropped.reason), str(dropped))
