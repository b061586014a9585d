"""Which rows move where when a resident array takes another row layout: pure functions, no network.

A layout is a sequence of :class:`Span`\\ s in row order, each a block of rows ``[start, stop)`` held by one
agent. :func:`plan_moves` compares a source layout with a target layout of the same rows and says, for
each target span, which rows of which source span fill it (:class:`Segment`). A segment whose source and
target are on the same agent is a local copy on that agent; only the others cross the network, so rows
that stay where they are never move. The coordinator's ``PlanMoves`` answers with this plan for a target
it places itself; the client uses the same function where it keeps its own target places (a reshape).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from gpupool._errors import PlacementError

__all__ = ["Segment", "Span", "check_spans", "moved_rows", "plan_moves"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Span:
    """Rows ``[start, stop)`` of an array on worker ``worker`` of agent ``agent_id``."""

    agent_id: str
    worker: int = 0
    start: int
    stop: int

    @property
    def rows(self) -> int:
        """How many rows the span covers."""
        return self.stop - self.start


@dataclass(frozen=True, slots=True, kw_only=True)
class Segment:
    """Rows ``[start, stop)`` (global row numbers) of target span ``target`` come from source span
    ``source`` (indices into the two layouts); ``moved`` is False where both are on the same agent."""

    target: int
    source: int
    start: int
    stop: int
    moved: bool

    @property
    def rows(self) -> int:
        """How many rows the segment carries."""
        return self.stop - self.start


def check_spans(spans: Sequence[Span], rows: int, *, what: str) -> None:
    """Check that ``spans`` cover rows ``[0, rows)`` in order, without gaps or overlaps.

    Raises:
        PlacementError: they do not (the message says where).
    """
    position = 0
    for index, span in enumerate(spans):
        if span.start != position or span.stop < span.start:
            raise PlacementError(
                f"{what} span {index} covers rows [{span.start}, {span.stop}), "
                f"expected to start at {position}"
            )
        position = span.stop
    if position != rows:
        raise PlacementError(f"{what} spans cover {position} rows, not the array's {rows}")


def plan_moves(source: Sequence[Span], target: Sequence[Span]) -> list[Segment]:
    """The segments that fill each target span from the source spans: by target, then by row.

    Every row of every target span comes from exactly one source span; empty spans get no segments.

    Raises:
        PlacementError: the two layouts do not cover the same rows, each in order without gaps.
    """
    rows = source[-1].stop if source else 0
    check_spans(source, rows, what="source")
    check_spans(target, rows, what="target")
    starts = [span.start for span in source]
    segments: list[Segment] = []
    for t, span in enumerate(target):
        row = span.start
        s = max(bisect.bisect_right(starts, row) - 1, 0)
        while row < span.stop:
            while source[s].stop <= row:  # skip empty source spans and those wholly before ``row``
                s += 1
            stop = min(span.stop, source[s].stop)
            moved = source[s].agent_id != span.agent_id
            segments.append(Segment(target=t, source=s, start=row, stop=stop, moved=moved))
            row = stop
    return segments


def moved_rows(segments: Sequence[Segment]) -> int:
    """How many rows of a plan cross the network."""
    return sum(segment.rows for segment in segments if segment.moved)
