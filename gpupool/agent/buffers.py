"""Resident buffers: who owns them, where they live, and each worker's memory against its limit.

Memory is counted in two parts per worker: bytes of resident buffers, and bytes reserved for work in
flight (an upload being streamed, a program's outputs before it commits). A reservation also holds
its buffer id, so two uploads of one id cannot both proceed. Limits are checked against both parts:
the worker's, and where one is set, each session's share of the worker (so one session cannot take
a worker's whole memory from the others).

A buffer moved to another agent (drain, pause: :meth:`BufferRegistry.forward`) leaves a forward behind: a
look-up of its id is refused ``buffer-moved`` naming its new home, until its session ends
(:meth:`BufferRegistry.drop_forwards`) or the buffer moves back here (committed again under its id).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from gpupool.protocol.errors import RpcRefusal

__all__ = [
    "FORWARDS_REMEMBERED",
    "LOST_REMEMBERED",
    "Buffer",
    "BufferRegistry",
    "Forward",
    "Reservation",
    "WorkerUsage",
]

#: How many lost buffer ids a registry remembers, to say why a look-up of one fails.
LOST_REMEMBERED: Final = 100_000
#: How many moved buffers a registry forwards at most (the oldest forward is forgotten first).
FORWARDS_REMEMBERED: Final = 200_000


@dataclass(frozen=True, slots=True)
class Forward:
    """Where a moved buffer lives now.

    Attributes:
        session: the buffer's session (its forward goes when the session ends).
        agent_id: the agent holding it now.
        endpoint: that agent's data-plane address.
        worker: the worker there.
    """

    session: str
    agent_id: str
    endpoint: str
    worker: int

    @property
    def moved_to(self) -> str:
        """``agent_id|endpoint|worker``: the ``gpupool-moved-to`` metadata of a buffer-moved refusal."""
        return f"{self.agent_id}|{self.endpoint}|{self.worker}"

    def refusal(self, buffer_id: str) -> RpcRefusal:
        """The refusal of a call naming the buffer that moved here."""
        return RpcRefusal(
            "buffer-moved",
            f"buffer {buffer_id} moved to worker {self.worker} of agent {self.agent_id} ({self.endpoint})",
            buffer_id=buffer_id,
            extra={"moved-to": self.moved_to},
        )


@dataclass(frozen=True, slots=True)
class Buffer:
    """A resident array.

    Attributes:
        buffer_id: the client's name for it, unique on this agent.
        worker: the worker holding it.
        array: the device array (NumPy or CuPy).
        nbytes: its size as counted against the worker's limit.
        session: the owner, for Free by session ("" if none was given).
    """

    buffer_id: str
    worker: int
    array: Any
    nbytes: int
    session: str

    @property
    def dtype(self) -> np.dtype[Any]:
        """The array's dtype."""
        dtype: np.dtype[Any] = np.dtype(self.array.dtype)
        return dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """The array's shape."""
        return tuple(int(n) for n in self.array.shape)


@dataclass(slots=True)
class Reservation:
    """Memory and a buffer id held for work in flight; commit it or release it, exactly once."""

    buffer_id: str
    worker: int
    nbytes: int
    session: str
    active: bool = True


@dataclass(frozen=True, slots=True)
class WorkerUsage:
    """A worker's memory at one moment.

    Attributes:
        limit: bytes it may hold.
        used: bytes of resident buffers.
        reserved: bytes held for work in flight.
        buffers: how many resident buffers.
    """

    limit: int
    used: int
    reserved: int
    buffers: int


class BufferRegistry:
    """Every resident buffer of one agent, by id, with per-worker memory accounting.

    Thread-safe: the event loop (uploads, frees) and the worker threads (programs) share it, and one
    lock guards all its tables. Methods raise :class:`RpcRefusal` for the servicer to pass on.

    Args:
        limits: bytes each worker may hold, by worker index.
        session_limits: bytes one session may hold (resident and reserved) on each worker, by worker
            index; None, or a None entry, for no cap beyond the worker's.
        on_change: called (under the lock: keep it quick) whenever buffers are committed or freed.
    """

    def __init__(
        self,
        limits: Sequence[int],
        *,
        session_limits: Sequence[int | None] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._on_change = on_change
        self._limits = list(limits)
        self._session_limits = list(session_limits or [None] * len(self._limits))
        if len(self._session_limits) != len(self._limits):
            raise ValueError("session_limits needs one entry per worker")
        self._by_session: dict[tuple[int, str], int] = {}  # (worker, session) -> resident + reserved bytes
        self._used = [0] * len(self._limits)
        self._reserved = [0] * len(self._limits)
        self._counts = [0] * len(self._limits)
        self._buffers: dict[str, Buffer] = {}
        self._pending: dict[str, Reservation] = {}
        self._lost: dict[str, str] = {}  # buffer id -> why it was lost, oldest first
        self._moved: dict[str, Forward] = {}  # buffer id -> its new home, oldest first
        self._lock = threading.Lock()

    @property
    def workers(self) -> int:
        """How many workers it accounts for."""
        return len(self._limits)

    def check_worker(self, worker: int) -> None:
        """Refuse a worker index this agent does not have.

        Raises:
            RpcRefusal: ``not-accepting``.
        """
        if not 0 <= worker < len(self._limits):
            raise RpcRefusal(
                "not-accepting", f"this agent has no worker {worker} (it has {len(self._limits)})"
            )

    def reserve(self, *, worker: int, buffer_id: str, nbytes: int, session: str) -> Reservation:
        """Hold ``nbytes`` of ``worker``'s memory and the id ``buffer_id``.

        Raises:
            RpcRefusal: ``bad-request`` for an empty id, ``not-accepting`` for an unknown worker,
                ``buffer-exists`` for an id held or reserved, ``out-of-memory`` past the worker's limit
                or the session's cap. (The id of a buffer moved away may be reserved: the buffer moving
                back, which replaces its forward once committed.)
        """
        if not buffer_id:
            raise RpcRefusal("bad-request", "a buffer id is required")
        self.check_worker(worker)
        with self._lock:
            if buffer_id in self._buffers or buffer_id in self._pending:
                raise RpcRefusal("buffer-exists", f"buffer {buffer_id} already exists", buffer_id=buffer_id)
            limit = self._limits[worker]
            taken = self._used[worker] + self._reserved[worker]
            if taken + nbytes > limit:
                raise RpcRefusal(
                    "out-of-memory",
                    f"worker {worker} cannot hold {nbytes} more bytes: "
                    f"{taken} of its {limit}-byte limit in use",
                    buffer_id=buffer_id,
                    extra={"needed": str(nbytes), "available": str(max(limit - taken, 0))},
                )
            cap = self._session_limits[worker]
            held = self._by_session.get((worker, session), 0)
            if cap is not None and held + nbytes > cap:
                raise RpcRefusal(
                    "out-of-memory",
                    f"session {session or '(none)'} cannot hold {nbytes} more bytes on worker {worker}: "
                    f"{held} of its {cap}-byte session cap in use",
                    buffer_id=buffer_id,
                    extra={"needed": str(nbytes), "available": str(max(cap - held, 0))},
                )
            reservation = Reservation(buffer_id, worker, nbytes, session)
            self._pending[buffer_id] = reservation
            self._reserved[worker] += nbytes
            self._count_session(worker, session, nbytes)
            return reservation

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation's memory and id (nothing if it was committed or released already)."""
        with self._lock:
            self._drop_pending(reservation)

    def _drop_pending(self, reservation: Reservation) -> None:
        if reservation.active:
            reservation.active = False
            self._reserved[reservation.worker] -= reservation.nbytes
            self._count_session(reservation.worker, reservation.session, -reservation.nbytes)
            self._pending.pop(reservation.buffer_id, None)

    def _count_session(self, worker: int, session: str, nbytes: int) -> None:
        key = (worker, session)
        held = self._by_session.get(key, 0) + nbytes
        if held:
            self._by_session[key] = held
        else:
            self._by_session.pop(key, None)

    def commit(self, reservation: Reservation, array: Any) -> Buffer:
        """Turn a reservation into a resident buffer holding ``array``.

        Raises:
            RuntimeError: the reservation was released or committed already (a bug).
        """
        return self.commit_all([(reservation, array)])[0]

    def commit_all(
        self, items: Sequence[tuple[Reservation, Any]], *, unless: threading.Event | None = None
    ) -> list[Buffer]:
        """Commit several reservations at once, or none of them if ``unless`` is set by then.

        The check of ``unless`` and the commit happen under one lock, so a caller that sets it and
        then releases the reservations leaves nothing behind.

        Raises:
            RuntimeError: a reservation was released or committed already (a bug).
        """
        with self._lock:
            if unless is not None and unless.is_set():
                return []
            if not all(reservation.active for reservation, _ in items):
                raise RuntimeError("commit of a reservation that is no longer held")
            made = []
            for reservation, array in items:
                self._drop_pending(reservation)
                buffer = Buffer(
                    reservation.buffer_id, reservation.worker, array, int(array.nbytes), reservation.session
                )
                self._buffers[buffer.buffer_id] = buffer
                self._moved.pop(buffer.buffer_id, None)  # moved back here: no longer forwarded
                self._used[buffer.worker] += buffer.nbytes
                self._count_session(buffer.worker, buffer.session, buffer.nbytes)
                self._counts[buffer.worker] += 1
                made.append(buffer)
            if made and self._on_change is not None:
                self._on_change()
            return made

    def get(self, buffer_id: str, *, worker: int | None = None) -> Buffer:
        """The resident buffer ``buffer_id`` (on ``worker`` when given).

        Raises:
            RpcRefusal: ``buffer-not-found``, also for a buffer that lives on another worker;
                ``buffer-moved`` for one moved to another agent (the refusal says where).
        """
        with self._lock:
            buffer = self._buffers.get(buffer_id)
            moved = self._moved.get(buffer_id) if buffer is None else None
        if moved is not None:
            raise moved.refusal(buffer_id)
        if buffer is None:
            lost = self._lost.get(buffer_id)
            if lost is not None:
                raise RpcRefusal(
                    "buffer-not-found", f"buffer {buffer_id} was lost: {lost}", buffer_id=buffer_id
                )
            raise RpcRefusal("buffer-not-found", f"no buffer {buffer_id} on this agent", buffer_id=buffer_id)
        if worker is not None and buffer.worker != worker:
            raise RpcRefusal(
                "buffer-not-found",
                f"buffer {buffer_id} lives on worker {buffer.worker}, not {worker}",
                buffer_id=buffer_id,
            )
        return buffer

    def nbytes_of(self, buffer_id: str) -> int:
        """The size of a resident buffer, 0 for an id it does not hold (no refusal: a cheap look-up)."""
        with self._lock:
            buffer = self._buffers.get(buffer_id)
        return buffer.nbytes if buffer is not None else 0

    def contains(self, buffer_id: str) -> bool:
        """Whether ``buffer_id`` is resident or reserved."""
        with self._lock:
            return buffer_id in self._buffers or buffer_id in self._pending

    def check_not_moved(self, buffer_ids: Iterable[str]) -> None:
        """Refuse a call naming a buffer moved away (a free of one, which would otherwise be skipped).

        Raises:
            RpcRefusal: ``buffer-moved``, for the first such id.
        """
        with self._lock:
            if not self._moved:
                return
            for buffer_id in buffer_ids:
                moved = self._moved.get(buffer_id)
                if moved is not None:
                    raise moved.refusal(buffer_id)

    def resident(self) -> list[Buffer]:
        """Every resident buffer now (reservations not included)."""
        with self._lock:
            return list(self._buffers.values())

    def forward(self, moves: Iterable[tuple[str, Forward]]) -> tuple[list[Buffer], list[str]]:
        """Free buffers that now live elsewhere, and forward their ids there (one step, under the lock: no
        call sees a moved buffer as neither here nor forwarded). An id not resident here is not forwarded.

        Returns:
            The buffers forwarded (freed here), and the ids not resident (freed meanwhile, or never here).
        """
        forwarded: list[Buffer] = []
        missing: list[str] = []
        with self._lock:
            for buffer_id, home in moves:
                buffer = self._buffers.pop(buffer_id, None)
                if buffer is None:
                    missing.append(buffer_id)
                    continue
                forwarded.append(buffer)
                self._moved.pop(buffer_id, None)  # re-inserted at the end: it is now the youngest
                self._moved[buffer_id] = home
            while len(self._moved) > FORWARDS_REMEMBERED:
                del self._moved[next(iter(self._moved))]
            self._account_freed(forwarded)
        return forwarded, missing

    def drop_forwards(self, session: str) -> int:
        """Forget the forwards of ``session``'s moved buffers (it ended). Returns how many."""
        with self._lock:
            doomed = [buffer_id for buffer_id, home in self._moved.items() if home.session == session]
            for buffer_id in doomed:
                del self._moved[buffer_id]
        return len(doomed)

    def free(self, buffer_ids: Iterable[str]) -> tuple[int, int]:
        """Drop these buffers; unknown ids are skipped. Returns (buffers freed, bytes freed)."""
        with self._lock:
            freed = [
                self._buffers.pop(buffer_id) for buffer_id in set(buffer_ids) if buffer_id in self._buffers
            ]
            return self._account_freed(freed)

    def lose_worker(self, worker: int, reason: str) -> list[str]:
        """Drop every buffer of ``worker`` (its process died, with its memory); later look-ups of them say
        ``reason`` (the last :data:`LOST_REMEMBERED` ids lost are remembered). Returns the ids lost."""
        with self._lock:
            doomed = [buffer_id for buffer_id, buffer in self._buffers.items() if buffer.worker == worker]
            self._account_freed([self._buffers.pop(buffer_id) for buffer_id in doomed])
            for buffer_id in doomed:
                self._lost[buffer_id] = reason
            while len(self._lost) > LOST_REMEMBERED:
                del self._lost[next(iter(self._lost))]
        return doomed

    def free_session(self, session: str) -> tuple[int, int]:
        """Drop every buffer of ``session``. Returns (buffers freed, bytes freed)."""
        with self._lock:
            doomed = [buffer_id for buffer_id, buffer in self._buffers.items() if buffer.session == session]
            return self._account_freed([self._buffers.pop(buffer_id) for buffer_id in doomed])

    def _account_freed(self, freed: list[Buffer]) -> tuple[int, int]:
        for buffer in freed:
            self._used[buffer.worker] -= buffer.nbytes
            self._count_session(buffer.worker, buffer.session, -buffer.nbytes)
            self._counts[buffer.worker] -= 1
        if freed and self._on_change is not None:
            self._on_change()
        return len(freed), sum(buffer.nbytes for buffer in freed)

    def usage(self, worker: int) -> WorkerUsage:
        """The worker's memory now."""
        with self._lock:
            return WorkerUsage(
                self._limits[worker], self._used[worker], self._reserved[worker], self._counts[worker]
            )

    def session_usage(self, worker: int, session: str) -> int:
        """Bytes ``session`` holds on ``worker`` now, resident and reserved."""
        with self._lock:
            return self._by_session.get((worker, session), 0)

    def session_limit(self, worker: int) -> int | None:
        """The cap on one session's bytes on ``worker``, None for none."""
        return self._session_limits[worker]

    def __len__(self) -> int:
        with self._lock:
            return len(self._buffers)
