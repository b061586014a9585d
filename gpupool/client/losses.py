"""What a failed call says was lost, and a session's record of its recoveries and verifications: the part of
:mod:`gpupool.client.recovery` that :class:`~gpupool.client.session.Session` itself needs (its uploads
place rows again after a loss), below it in the layering."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from gpupool._errors import (
    AgentLost,
    BufferMoved,
    BufferNotFound,
    ConnectError,
    ShardsLost,
    StreamClosed,
)
from gpupool.client.layout import Piece, Place

__all__ = ["LOSSES", "MAX_RECOVERIES", "REBUILD_TRIES", "Loss", "Recovery", "Verification", "loss_of"]

#: How many times one call is retried after recovering the shards it needed.
MAX_RECOVERIES: Final = 3
#: How many places one recovery tries (a worker still restarting, or a new place lost too).
REBUILD_TRIES: Final = 5
#: Failures that say an agent is gone.
LOSSES: Final = (AgentLost, ConnectError, StreamClosed)

Loss = Literal["agent", "worker", "moved"]


@dataclass(slots=True)
class Recovery:
    """A session's recoveries: where each lost place went, those running, and how many buffers were
    rebuilt (for tests and logs)."""

    moved: dict[Place, Piece] = field(default_factory=dict)
    #: Buffer id -> the place it lives at now, for each buffer a move re-pointed (or a program re-placed
    #: made there): pieces computed before the move are followed by id (a new buffer at the old place is
    #: not moved).
    moved_ids: dict[str, Piece] = field(default_factory=dict)
    #: Buffers lost for good (no lineage), and the error a later use of each raises.
    dead: dict[str, ShardsLost] = field(default_factory=dict)
    #: Agents this session places nothing new on: lost, or slower than the twin that replaced them.
    avoid: set[str] = field(default_factory=set)
    running: dict[Place, asyncio.Future[Piece]] = field(default_factory=dict)
    rebuilt: int = 0
    recoveries: int = 0
    twins_won: int = 0
    twins_lost: int = 0

    def dead_or(self, error: BaseException) -> BaseException:
        """``error``, or the :class:`ShardsLost` of the buffer it says is missing, if that one was lost
        for good."""
        if isinstance(error, BufferNotFound) and error.buffer_id in self.dead:
            return self.dead[error.buffer_id]
        return error

    def check_alive(self, buffer_ids: Iterable[str]) -> None:
        """Raise the :class:`ShardsLost` of the first of ``buffer_ids`` lost for good."""
        if self.dead:
            for buffer_id in buffer_ids:
                error = self.dead.get(buffer_id)
                if error is not None:
                    raise error

    def follow(self, buffer_ids: Iterable[str], to: Piece) -> None:
        """The buffers live at ``to``'s place now."""
        for buffer_id in buffer_ids:
            self.moved_ids[buffer_id] = to

    def current_all(self, pieces: Iterable[Piece]) -> tuple[Piece, ...]:
        """:meth:`current` of each piece (the pieces themselves while nothing moved)."""
        if not self.moved_ids:
            return tuple(pieces)
        return tuple(self.current(p) for p in pieces)

    def current(self, piece: Piece) -> Piece:
        """``piece`` where its buffer lives now (itself if it never moved); a piece with no buffer (a
        program's place) at the place that replaced its own."""
        to = self.moved_ids.get(piece.buffer_id) if piece.buffer_id else None
        seen = 0
        while to is None and not piece.buffer_id and piece.place in self.moved and seen < 64:
            to = self.moved[piece.place]
            if to.place == piece.place:
                break
            piece, to, seen = piece.moved_to(to), None, seen + 1
        return piece if to is None else piece.moved_to(to)


@dataclass(slots=True)
class Verification:
    """A session's sampling and counts: ``rate`` of programs checked (0: none)."""

    rate: float = 0.0
    rng: random.Random = field(default_factory=random.Random)
    checked: int = 0
    agreed: int = 0
    wrong: int = 0
    skipped: int = 0
    redone: int = 0
    #: Matmuls checked by Freivalds' products instead of a full re-run.
    freivalds: int = 0
    caught: list[str] = field(default_factory=list)

    def wanted(self) -> bool:
        """Whether to check the next program."""
        return self.rate > 0 and self.rng.random() < self.rate


def loss_of(exc: BaseException) -> Loss | None:
    """What a failed call says was lost: the whole agent, its worker process (the agent still answers),
    or nothing (the buffer was moved, or the failure is of another kind: None)."""
    if isinstance(exc, ShardsLost):
        return None
    if isinstance(exc, BufferMoved):
        return "moved" if exc.to_endpoint else None
    if isinstance(exc, LOSSES):
        return "agent"
    if isinstance(exc, BufferNotFound) and " was lost" in exc.remote_message:
        return "worker"
    return None
