"""The coordinator's state in SQLite: token digests, enrolled agents, client sessions.

One file, ``<state_dir>/state.sqlite3``, which several processes may open at once: a coordinator holds
it while ``gpupool token create --state-dir`` adds a token. So every call is one statement, or one short
``BEGIN IMMEDIATE`` transaction, and no transaction is ever left open; WAL mode lets readers go on while
one process writes, and a writer waits up to 5 s for another to finish. Within a process a lock
serialises the calls, so one store may be shared by threads.

Every time is in seconds since the epoch and comes from the caller (``now=``), as in the rest of the
coordinator's pure state.
"""

from __future__ import annotations

import hmac
import math
import os
import sqlite3
import stat
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self

from gpupool._errors import AuthError, UsageError
from gpupool.security.files import private_dir
from gpupool.security.tokens import TOKEN_PREFIX, Role, new_token, parse_role, parse_token, token_digest

__all__ = ["SCHEMA_VERSION", "STATE_FILE", "AgentEnrolment", "SessionRecord", "StateStore", "TokenRecord"]

#: The layout of the tables, kept in ``PRAGMA user_version``.
SCHEMA_VERSION: Final = 1
#: The file's name inside the state directory.
STATE_FILE: Final = "state.sqlite3"

SessionState = Literal["running", "ended"]

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS tokens (
        token_id TEXT PRIMARY KEY, digest TEXT NOT NULL, role TEXT NOT NULL, name TEXT NOT NULL,
        created REAL NOT NULL, expires REAL, revoked REAL)""",
    """CREATE TABLE IF NOT EXISTS agents (
        agent_id TEXT PRIMARY KEY, name TEXT NOT NULL, certificate_pem BLOB NOT NULL,
        fingerprint TEXT NOT NULL, token_id TEXT NOT NULL, enrolled REAL NOT NULL, revoked REAL)""",
    """CREATE TABLE IF NOT EXISTS sessions (
        session_id TEXT PRIMARY KEY, token_id TEXT NOT NULL, token_name TEXT NOT NULL,
        client TEXT NOT NULL, client_version TEXT NOT NULL, started REAL NOT NULL, renewed REAL NOT NULL,
        state TEXT NOT NULL, ended REAL, ended_reason TEXT NOT NULL DEFAULT '',
        arrays_placed INTEGER NOT NULL DEFAULT 0, bytes_placed INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS sessions_by_state ON sessions (state, renewed)",
    """CREATE TABLE IF NOT EXISTS session_agents (
        session_id TEXT NOT NULL, agent_id TEXT NOT NULL,
        PRIMARY KEY (session_id, agent_id)) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
_TOKEN_COLUMNS: Final = "token_id, digest, role, name, created, expires, revoked"
_AGENT_COLUMNS: Final = "agent_id, name, certificate_pem, fingerprint, token_id, enrolled, revoked"
# The agents of a session ride along as one unit-separated string, so a listing is one statement.
_SESSION_COLUMNS: Final = (
    "s.rowid AS seq, s.session_id, s.token_id, s.token_name, s.client, s.client_version, s.started, "
    "s.renewed, s.state, s.ended, s.ended_reason, s.arrays_placed, s.bytes_placed, "
    "(SELECT group_concat(a.agent_id, char(31)) FROM session_agents a WHERE a.session_id = s.session_id) "
    "AS agents"
)
_SESSION: Final = f"SELECT {_SESSION_COLUMNS} FROM sessions s"
_ID_ATTEMPTS: Final = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenRecord:
    """A stored token; its secret is not kept, only its digest.

    Attributes:
        token_id: the 8 hex digits after ``gpt_``.
        role: what the token may do.
        name: the operator's label for it ("" if none).
        created: when it was issued.
        expires: when it stops working, or ``None`` for never.
        revoked: when it was revoked, or ``None``.
    """

    token_id: str
    role: Role
    name: str
    created: float
    expires: float | None
    revoked: float | None

    def active(self, now: float) -> bool:
        """Whether the token is neither revoked nor expired at ``now``."""
        return self.revoked is None and (self.expires is None or now < self.expires)


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentEnrolment:
    """An agent the pool CA issued a certificate to.

    Attributes:
        agent_id: the id the coordinator gave it (its certificate's common name).
        name: the name the agent asked for.
        certificate_pem: its certificate.
        fingerprint: SHA-256 hex of the certificate's DER.
        token_id: the join token it enrolled with.
        enrolled: when it (last) enrolled.
        revoked: when it was revoked, or ``None``.
    """

    agent_id: str
    name: str
    certificate_pem: bytes
    fingerprint: str
    token_id: str
    enrolled: float
    revoked: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionRecord:
    """A client session (a job in ``gpupool jobs``).

    Attributes:
        session_id: the session's id, also the job id.
        token_id: the token that connected it.
        token_name: that token's name when the session started.
        client: who connected (``user@host``), as the client said.
        client_version: the client's gpupool version.
        started: when it connected.
        renewed: when its lease was last renewed.
        state: ``"running"`` until it ends.
        ended: when it ended, if it has.
        ended_reason: why it ended (``"disconnected"``, ``"lease expired"``, ...), "" while running.
        arrays_placed: arrays placed for it.
        bytes_placed: bytes of those arrays.
        agents: the agents it has been placed on, sorted.
    """

    session_id: str
    token_id: str
    token_name: str
    client: str
    client_version: str
    started: float
    renewed: float
    state: SessionState
    ended: float | None
    ended_reason: str
    arrays_placed: int
    bytes_placed: int
    agents: tuple[str, ...]


class StateStore:
    """The coordinator's SQLite state. Make one with :meth:`open`; close it, or use it as a context manager.

    Args:
        connection: an open connection in autocommit mode with the schema in place.
        path: the file it opened.
    """

    def __init__(self, *, connection: sqlite3.Connection, path: Path) -> None:
        self.path = path
        self._db = connection
        self._lock = threading.Lock()

    @classmethod
    def open(cls, state_dir: Path) -> StateStore:
        """Open (creating if needed) ``state_dir/state.sqlite3``, the directory 0700 and the file 0600.

        Raises:
            UsageError: the directory or file cannot be made or opened, another process kept the file
                locked for over 5 s, the file is not a gpupool state file, or a newer gpupool wrote it.
        """
        path = state_dir / STATE_FILE
        try:
            private_dir(state_dir)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                path.chmod(0o600)
        except OSError as exc:
            raise UsageError(f"cannot open the state file {path}: {exc.strerror}") from exc
        # isolation_level=None: no transaction opens behind our back; the ones we open are short.
        db = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout = 5000")
            db.execute("PRAGMA journal_mode = WAL")
            # Sessions are renewed every few seconds; in WAL mode NORMAL still never corrupts the file.
            db.execute("PRAGMA synchronous = NORMAL")
            _create_schema(db, path)
        except sqlite3.OperationalError as exc:  # locked, read-only, disk full: not the file's fault
            db.close()
            raise UsageError(f"cannot open the state file {path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            db.close()
            raise UsageError(f"{path} is not a gpupool state file ({exc}); move it aside") from exc
        except BaseException:
            db.close()
            raise
        return cls(connection=db, path=path)

    def close(self) -> None:
        """Close the file; calling it again does nothing."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- tokens

    def create_token(
        self, *, role: Role, name: str = "", ttl: float | None, now: float
    ) -> tuple[str, TokenRecord]:
        """Issue a token; the plaintext is returned here once and never stored.

        Raises:
            UsageError: an unknown role, or a lifetime that is not a positive number of seconds.
        """
        role = parse_role(role)
        if ttl is not None and not (math.isfinite(ttl) and ttl > 0):
            raise UsageError(f"token lifetime must be a positive number of seconds or None, not {ttl!r}")
        expires = None if ttl is None else now + ttl
        for _ in range(_ID_ATTEMPTS):
            token, token_id = new_token()
            try:
                self._run(
                    f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL)",
                    (token_id, token_digest(token), role, name, now, expires),
                )
            except sqlite3.IntegrityError:  # 32-bit ids: a clash is rare, and only needs another draw
                continue
            record = TokenRecord(
                token_id=token_id, role=role, name=name, created=now, expires=expires, revoked=None
            )
            return token, record
        raise UsageError(f"no unused token id after {_ID_ATTEMPTS} draws; is the random source broken?")

    def list_tokens(self) -> list[TokenRecord]:
        """Every token, revoked and expired ones included, oldest first."""
        rows = self._rows(f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY created, token_id")
        return [_token(row) for row in rows]

    def revoke_token(self, token_id_or_unique_prefix: str, *, now: float) -> TokenRecord:
        """Revoke the token with this id, or the only one whose id starts with it (or the token itself).

        Revoking a revoked token keeps its first revocation time.

        Raises:
            UsageError: no token matches, or several do.
        """
        key = token_id_or_unique_prefix.strip().lower()
        if key.startswith(TOKEN_PREFIX):  # the whole token, pasted: its id follows the prefix
            key = key[len(TOKEN_PREFIX) :][:8]
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise UsageError(
                f"{token_id_or_unique_prefix!r} is not a token id: "
                "ids are 8 hex digits (see `gpupool token list`)"
            )
        with self._transaction() as db:
            rows = db.execute(
                "SELECT token_id FROM tokens WHERE substr(token_id, 1, ?) = ?", (len(key), key)
            ).fetchall()
            if len(rows) != 1:
                found = ", ".join(sorted(row["token_id"] for row in rows))
                raise UsageError(
                    f"token id {key!r} matches {found}; give more digits"
                    if rows
                    else f"no token with id {key!r} (see `gpupool token list`)"
                )
            token_id = rows[0]["token_id"]
            db.execute("UPDATE tokens SET revoked = coalesce(revoked, ?) WHERE token_id = ?", (now, token_id))
            row = db.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE token_id = ?", (token_id,)
            ).fetchone()
        return _token(row)

    def authenticate(self, token: str, *, now: float) -> TokenRecord:
        """The record of a presented token, if it is known, not revoked and not expired.

        Raises:
            AuthError: a malformed, unknown, revoked or expired token, each with its own message (which
                never quotes the secret); the caller answers UNAUTHENTICATED.
        """
        token_id = parse_token(token)
        rows = self._rows(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE token_id = ?", (token_id,))
        # An id alone says nothing about a token's state: the digest is checked before anything else is.
        if not rows or not hmac.compare_digest(rows[0]["digest"], token_digest(token)):
            raise AuthError(f"unknown token {token_id}: this pool did not issue it (was its state reset?)")
        record = _token(rows[0])
        if record.revoked is not None:
            raise AuthError(f"token {token_id} was revoked at {_when(record.revoked)}; ask for a new one")
        if record.expires is not None and now >= record.expires:
            raise AuthError(f"token {token_id} expired at {_when(record.expires)}; ask for a new one")
        return record

    # -- enrolled agents

    def enrol_agent(
        self, *, agent_id: str, name: str, certificate_pem: bytes, fingerprint: str, token_id: str, now: float
    ) -> AgentEnrolment:
        """Record (or replace) an agent's enrolment; an agent that enrols again is no longer revoked."""
        record = AgentEnrolment(
            agent_id=agent_id,
            name=name,
            certificate_pem=certificate_pem,
            fingerprint=fingerprint,
            token_id=token_id,
            enrolled=now,
            revoked=None,
        )
        self._run(
            f"INSERT OR REPLACE INTO agents ({_AGENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL)",
            (agent_id, name, certificate_pem, fingerprint, token_id, now),
        )
        return record

    def get_agent(self, agent_id: str) -> AgentEnrolment | None:
        """The agent's enrolment, revoked or not, or ``None`` if it never enrolled."""
        rows = self._rows(f"SELECT {_AGENT_COLUMNS} FROM agents WHERE agent_id = ?", (agent_id,))
        return _agent(rows[0]) if rows else None

    def list_agents(self) -> list[AgentEnrolment]:
        """Every enrolment, revoked ones included, oldest first."""
        rows = self._rows(f"SELECT {_AGENT_COLUMNS} FROM agents ORDER BY enrolled, agent_id")
        return [_agent(row) for row in rows]

    def revoke_agent(self, agent_id: str, *, now: float) -> AgentEnrolment:
        """Revoke an agent's enrolment, keeping the first revocation time.

        Raises:
            UsageError: the agent never enrolled.
        """
        if not self._run(
            "UPDATE agents SET revoked = coalesce(revoked, ?) WHERE agent_id = ?", (now, agent_id)
        ):
            raise UsageError(f"no enrolled agent {agent_id!r} (see `gpupool agents`)")
        record = self.get_agent(agent_id)
        assert record is not None  # enrolments are replaced, never deleted
        return record

    # -- sessions

    def create_session(
        self, *, session_id: str, token_id: str, token_name: str, client: str, client_version: str, now: float
    ) -> SessionRecord:
        """Start a running session.

        Raises:
            UsageError: a session with this id exists.
        """
        try:
            self._run(
                "INSERT INTO sessions (session_id, token_id, token_name, client, client_version, started, "
                "renewed, state) VALUES (?, ?, ?, ?, ?, ?, ?, 'running')",
                (session_id, token_id, token_name, client, client_version, now, now),
            )
        except sqlite3.IntegrityError as exc:
            raise UsageError(f"session {session_id!r} exists already") from exc
        return SessionRecord(
            session_id=session_id,
            token_id=token_id,
            token_name=token_name,
            client=client,
            client_version=client_version,
            started=now,
            renewed=now,
            state="running",
            ended=None,
            ended_reason="",
            arrays_placed=0,
            bytes_placed=0,
            agents=(),
        )

    def get_session(self, session_id: str) -> SessionRecord | None:
        """The session, running or ended, or ``None`` if there is none with this id."""
        rows = self._rows(f"{_SESSION} WHERE s.session_id = ?", (session_id,))
        return _session(rows[0]) if rows else None

    def renew_session(self, session_id: str, *, now: float) -> SessionRecord | None:
        """Renew a running session's lease; ``None`` if no running session has this id."""
        if not self._run(
            "UPDATE sessions SET renewed = max(renewed, ?) WHERE session_id = ? AND state = 'running'",
            (now, session_id),
        ):
            return None
        return self.get_session(session_id)

    def end_session(self, session_id: str, *, reason: str, now: float) -> SessionRecord | None:
        """End a session; ending an ended one keeps its first time and reason. ``None`` if unknown."""
        self._run(
            "UPDATE sessions SET state = 'ended', ended = ?, ended_reason = ? "
            "WHERE session_id = ? AND state = 'running'",
            (now, reason, session_id),
        )
        return self.get_session(session_id)

    def record_placement(self, session_id: str, nbytes: int) -> None:
        """Count one placed array of ``nbytes`` against the session (an unknown session is ignored)."""
        self._run(
            "UPDATE sessions SET arrays_placed = arrays_placed + 1, bytes_placed = bytes_placed + ? "
            "WHERE session_id = ?",
            (nbytes, session_id),
        )

    def add_session_agents(self, session_id: str, agent_ids: Iterable[str]) -> None:
        """Add agents to the set the session has been placed on."""
        pairs = [(session_id, agent_id) for agent_id in set(agent_ids)]
        if pairs:
            with self._transaction() as db:
                db.executemany("INSERT OR IGNORE INTO session_agents VALUES (?, ?)", pairs)

    def list_sessions(
        self, *, token_id: str | None = None, include_ended: bool = True, limit_ended: int = 100
    ) -> list[SessionRecord]:
        """Running sessions and the ``limit_ended`` most recently ended ones, oldest first.

        Args:
            token_id: only the sessions of this token.
            include_ended: list ended sessions too.
            limit_ended: at most this many ended sessions, the latest to end.
        """
        ended_limit = max(limit_ended, 0) if include_ended else 0
        rows = self._rows(
            f"{_SESSION} WHERE s.state = 'running' AND (?1 IS NULL OR s.token_id = ?1) UNION ALL "
            f"SELECT * FROM ({_SESSION} WHERE s.state = 'ended' AND (?1 IS NULL OR s.token_id = ?1) "
            "ORDER BY s.ended DESC, s.rowid DESC LIMIT ?2) ORDER BY started, seq",
            (token_id, ended_limit),
        )
        return [_session(row) for row in rows]

    def expired_sessions(self, *, ttl: float, now: float) -> list[SessionRecord]:
        """Running sessions not renewed within ``ttl`` seconds of ``now``, oldest first."""
        rows = self._rows(
            f"{_SESSION} WHERE s.state = 'running' AND s.renewed < ? ORDER BY s.started, seq", (now - ttl,)
        )
        return [_session(row) for row in rows]

    # -- key/value

    def get_meta(self, key: str) -> str | None:
        """The value stored under ``key``, or ``None``."""
        rows = self._rows("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0]["value"]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, replacing any value there."""
        self._run("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- plumbing

    def _rows(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _run(self, sql: str, params: tuple[object, ...] = ()) -> int:
        """Run one statement (its own transaction); the number of rows it changed."""
        with self._lock:
            return self._db.execute(sql, params).rowcount

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction, taken at once so that it cannot deadlock with another writer."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")


def _create_schema(db: sqlite3.Connection, path: Path) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise UsageError(
            f"{path} has schema version {version}, "
            f"newer than this gpupool's {SCHEMA_VERSION}; upgrade gpupool"
        )
    if version == SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")  # two processes creating the file at once: one waits for the other
    try:
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _token(row: sqlite3.Row) -> TokenRecord:
    return TokenRecord(
        token_id=row["token_id"],
        role=parse_role(row["role"]),
        name=row["name"],
        created=row["created"],
        expires=row["expires"],
        revoked=row["revoked"],
    )


def _agent(row: sqlite3.Row) -> AgentEnrolment:
    return AgentEnrolment(
        agent_id=row["agent_id"],
        name=row["name"],
        certificate_pem=bytes(row["certificate_pem"]),
        fingerprint=row["fingerprint"],
        token_id=row["token_id"],
        enrolled=row["enrolled"],
        revoked=row["revoked"],
    )


def _session(row: sqlite3.Row) -> SessionRecord:
    agents = row["agents"]
    return SessionRecord(
        session_id=row["session_id"],
        token_id=row["token_id"],
        token_name=row["token_name"],
        client=row["client"],
        client_version=row["client_version"],
        started=row["started"],
        renewed=row["renewed"],
        state="running" if row["state"] == "running" else "ended",
        ended=row["ended"],
        ended_reason=row["ended_reason"],
        arrays_placed=row["arrays_placed"],
        bytes_placed=row["bytes_placed"],
        agents=tuple(sorted(agents.split("\x1f"))) if agents else (),
    )
