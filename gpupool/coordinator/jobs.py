"""Client sessions, tracked as jobs for ``gpupool jobs``: leases kept in the coordinator's state store.

A client's Connect starts a job (its id is the session id) owned by the caller's token; every call of the
session renews its lease; Disconnect, an admin's ``gpupool jobs end`` or a lease not renewed within the
TTL ends it. Sessions live in the store, so they survive a coordinator restart. No network here: the
coordinator tells the agents when a session ends.
"""

from __future__ import annotations

from collections.abc import Iterable

from gpupool._errors import AuthError, PlacementError
from gpupool._ids import new_job_id
from gpupool.security.store import SessionRecord, StateStore, TokenRecord

__all__ = ["DEFAULT_LEASE", "Jobs"]

#: Seconds a session lives without a call or heartbeat.
DEFAULT_LEASE = 60.0


class Jobs:
    """The coordinator's sessions. One event loop owns it.

    Args:
        store: where sessions are kept.
        lease: seconds a session lives unless renewed.
    """

    def __init__(self, store: StateStore, *, lease: float = DEFAULT_LEASE) -> None:
        self._store = store
        self.lease = lease

    def connect(self, caller: TokenRecord, client: str, client_version: str, *, now: float) -> SessionRecord:
        """Start a session for ``caller``'s token."""
        session_id = new_job_id()
        self._store.create_session(
            session_id=session_id,
            token_id=caller.token_id,
            token_name=caller.name,
            client=client[:128] or "unknown",
            client_version=client_version[:32],
            now=now,
        )
        record = self._store.get_session(session_id)
        assert record is not None
        return record

    def get(self, session: str, caller: TokenRecord | None) -> SessionRecord:
        """The session, if ``caller`` may touch it (its own token's, or any for an admin; None: anyone).

        Raises:
            PlacementError: no such session.
            AuthError: the session belongs to another token.
        """
        record = self._store.get_session(session)
        if record is None:
            raise PlacementError(f"unknown session {session!r}: connect first")
        if caller is not None and caller.role != "admin" and record.token_id != caller.token_id:
            raise AuthError(f"session {session} belongs to another token")
        return record

    def running(self, session: str, caller: TokenRecord | None, *, now: float) -> SessionRecord:
        """The running session, its lease renewed.

        Raises:
            PlacementError: no such session, or it has ended (with the reason).
            AuthError: the session belongs to another token.
        """
        record = self.get(session, caller)
        if record.state != "running":
            raise PlacementError(f"session {session!r} has ended ({record.ended_reason or 'ended'})")
        renewed = self._store.renew_session(session, now=now)
        return renewed or record

    def record_placement(self, session: str, nbytes: int, agents: Iterable[str]) -> None:
        """Count one placed array of ``nbytes`` and remember the agents it went to."""
        self._store.record_placement(session, nbytes)
        self._store.add_session_agents(session, agents)

    def add_agents(self, session: str, agents: Iterable[str]) -> None:
        """Remember agents the session holds capabilities for (they are told when it ends)."""
        self._store.add_session_agents(session, agents)

    def end(self, session: str, *, reason: str, now: float) -> SessionRecord:
        """End the session; ending an ended one changes nothing.

        Raises:
            PlacementError: no such session.
        """
        record = self._store.end_session(session, reason=reason, now=now)
        if record is None:
            raise PlacementError(f"unknown session {session!r}")
        return record

    def expired(self, *, now: float) -> list[SessionRecord]:
        """Running sessions whose lease ran out."""
        return self._store.expired_sessions(ttl=self.lease, now=now)

    def list(self, caller: TokenRecord | None = None, *, all_sessions: bool = False) -> list[SessionRecord]:
        """Sessions oldest first: every one for an admin asking for all, else the caller's token's own."""
        if all_sessions or caller is None:
            return self._store.list_sessions()
        return self._store.list_sessions(token_id=caller.token_id)

    def running_count(self) -> int:
        """How many sessions are running."""
        return sum(1 for record in self._store.list_sessions() if record.state == "running")
