"""Where a remote array's rows live, as the client tracks them: pure values and functions, no I/O.

A *layout* is the sequence of an array's :class:`Piece`\\ s, one per row shard, in row order. Two arrays
whose layouts have the same :func:`layout_key` hold the same rows on the same workers, so their shards meet
in one program per shard.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TypeAlias

from gpupool._errors import UsageError
from gpupool._proto.v1 import coordinator_pb2

__all__ = [
    "LayoutKey",
    "Piece",
    "Place",
    "by_endpoint",
    "check_rows",
    "layout_key",
    "pieces_from_placement",
    "round_robin",
    "whole_copies",
]

#: ``(endpoint, worker)``: one worker of one agent.
Place: TypeAlias = tuple[str, int]
#: What :func:`layout_key` returns: each piece's place and rows.
LayoutKey: TypeAlias = tuple[tuple[Place, int, int], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Piece:
    """One shard of a remote array as the client tracks it: rows ``[start, stop)`` in buffer ``buffer_id``
    on worker ``worker`` of agent ``agent_id``, whose data plane listens at ``endpoint``."""

    agent_id: str
    endpoint: str
    worker: int
    start: int
    stop: int
    buffer_id: str

    @property
    def place(self) -> Place:
        """``(endpoint, worker)``: pieces with the same place can meet in one program."""
        return self.endpoint, self.worker

    def moved_to(self, to: Piece) -> Piece:
        """The same rows and buffer at ``to``'s place (agent, endpoint and worker)."""
        return replace(self, agent_id=to.agent_id, endpoint=to.endpoint, worker=to.worker)

    def with_buffer(self, buffer_id: str) -> Piece:
        """The same rows and place, another buffer."""
        return Piece(
            agent_id=self.agent_id,
            endpoint=self.endpoint,
            worker=self.worker,
            start=self.start,
            stop=self.stop,
            buffer_id=buffer_id,
        )


def layout_key(pieces: Sequence[Piece]) -> LayoutKey:
    """What two arrays must share for their shards to meet in one program."""
    return tuple((p.place, p.start, p.stop) for p in pieces)


def pieces_from_placement(
    shards: Iterable[coordinator_pb2.ShardPlacement], new_buffer_id: Callable[[], str]
) -> list[Piece]:
    """The pieces of the coordinator's placement, in row order, each with a new buffer id."""
    return [
        Piece(
            agent_id=s.agent_id,
            endpoint=s.endpoint,
            worker=s.worker,
            start=s.start,
            stop=s.stop,
            buffer_id=new_buffer_id(),
        )
        for s in sorted(shards, key=lambda s: s.start)
    ]


def whole_copies(pieces: Iterable[Piece], rows: int, new_buffer_id: Callable[[], str]) -> list[Piece]:
    """One piece per distinct place of ``pieces``, each holding all ``rows`` rows of an array in a new
    buffer: where whole copies of it go."""
    at = {piece.place: piece for piece in pieces}
    return [replace(p, start=0, stop=rows, buffer_id=new_buffer_id()) for p in at.values()]


def by_endpoint(pieces: Iterable[Piece]) -> dict[str, list[Piece]]:
    """``pieces`` grouped by the agent endpoint that holds them (one call each frees them)."""
    grouped: dict[str, list[Piece]] = defaultdict(list)
    for piece in pieces:
        grouped[piece.endpoint].append(piece)
    return grouped


def check_rows(rows: object, length: int) -> tuple[int, ...]:
    """An explicit sharding (``pool.asarray(x, rows=...)``) as row counts, checked against ``length`` rows.

    Raises:
        UsageError: not a sequence of integers, a negative count, no count at all, or counts that do not
            add up to ``length``.
    """
    if isinstance(rows, str | bytes) or not isinstance(rows, Sequence | range):
        raise UsageError(f"rows= takes a sequence of row counts, one per shard, not {rows!r}")
    counts: list[int] = []
    for count in rows:
        if isinstance(count, bool):
            raise UsageError(f"rows= takes integer row counts, not {count!r}")
        try:
            counts.append(operator.index(count))
        except TypeError:
            raise UsageError(f"rows= takes integer row counts, not {count!r}") from None
    if not counts:
        raise UsageError("rows= needs at least one shard")
    if any(c < 0 for c in counts):
        raise UsageError(f"rows= has a negative row count: {counts}")
    if sum(counts) != length:
        raise UsageError(f"rows= adds up to {sum(counts)} rows, but the array has {length}: {counts}")
    return tuple(counts)


def round_robin(counts: Sequence[int], places: int) -> list[tuple[int, int, int]]:
    """``(place, start, stop)`` of each shard of ``counts`` rows, in row order: shard ``i`` on place
    ``i % places`` (of ``places`` places, in the caller's order)."""
    if places <= 0:
        raise ValueError(f"round_robin needs at least one place, not {places}")
    split = []
    start = 0
    for index, count in enumerate(counts):
        split.append((index % places, start, start + count))
        start += count
    return split
