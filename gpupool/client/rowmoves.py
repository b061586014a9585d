"""Rows moved agent to agent: the client plans :class:`Pull`\\ s and sends them; the agents move the bytes.

A pull makes one new buffer on one agent from row ranges of resident buffers, this agent's or others'
(``Pull`` in ``protos/gpupool/v1/agent.proto``): concatenated along an axis (then reshaped), or summed.
:func:`run_pulls` sends many at once. :func:`pulls_for` turns a plan of segments
(:func:`gpupool.moves.plan_moves`, or the coordinator's ``PlanMoves``) into pulls, one per target piece;
:func:`rebalance` and :func:`reshard` move a whole array to a new layout; :func:`sum_tree` adds partial
results on the agents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from gpupool.client.graph import GraphArray
from gpupool.client.layout import Piece
from gpupool.client.pulls import Pull, run_pulls
from gpupool.client.session import Session
from gpupool.moves import Segment, Span, plan_moves

__all__ = ["pulls_for", "rebalance", "reshard", "resident", "spans_of", "sum_tree"]


def resident(array: GraphArray) -> tuple[Piece, ...]:
    """``array``'s pieces, computing it first if it is pending."""
    array.check()
    if array.node is not None:
        array.persist()  # type: ignore[attr-defined]  # RemoteArray, the one GraphArray
    return array.layout


def spans_of(pieces: Sequence[Piece], scale: int = 1) -> list[Span]:
    """The pieces as the planner's spans, their rows counted in units ``scale`` times smaller."""
    return [
        Span(agent_id=p.agent_id, worker=p.worker, start=p.start * scale, stop=p.stop * scale) for p in pieces
    ]


def pulls_for(
    sources: Sequence[Piece],
    targets: Sequence[Piece],
    segments: Sequence[Segment],
    *,
    shapes: Sequence[tuple[int, ...]],
    dtype: np.dtype[Any],
    source_starts: Sequence[int] | None = None,
) -> list[Pull]:
    """One pull per target piece, from the plan's segments (by target, then row).

    ``shapes`` is each target's array; ``source_starts`` the first row (in the plan's units) of each
    source buffer, where that is not its piece's ``start``. A target with no rows still gets a pull (of
    no rows), so that it has a buffer.
    """
    firsts = list(source_starts) if source_starts is not None else [p.start for p in sources]
    by_target: list[list[tuple[Piece, int, int]]] = [[] for _ in targets]
    for segment in segments:
        first = firsts[segment.source]
        by_target[segment.target].append(
            (sources[segment.source], segment.start - first, segment.stop - first)
        )
    pulls = []
    for target, taken, shape in zip(targets, by_target, shapes, strict=True):
        if not taken:  # an empty target: no rows of a source, from this agent if it holds one
            local = [p for p in sources if p.agent_id == target.agent_id]
            taken = [((local or list(sources))[0], 0, 0)]
        pulls.append(Pull(target=target, sources=tuple(taken), shape=shape, dtype=dtype))
    return pulls


def reshard(array: GraphArray, targets: Sequence[Piece]) -> tuple[Piece, ...]:
    """Move ``array``'s rows to ``targets`` (new buffers, covering its rows in order); rows whose agent
    stays the same are copied there, the others pulled from where they are. Returns the targets."""
    sources = resident(array)
    segments = plan_moves(spans_of(sources), spans_of(targets))
    rest = array.shape[1:]
    shapes = [(t.stop - t.start, *rest) for t in targets]
    pulls = pulls_for(sources, targets, segments, shapes=shapes, dtype=array.dtype)
    run_pulls(array.session, pulls, what="reshard")
    return tuple(targets)


def rebalance(
    session: Session, sources: Sequence[Piece], shape: tuple[int, ...], dtype: np.dtype[Any]
) -> tuple[Piece, ...]:
    """The rows of ``sources`` (resident pieces of an array of ``shape``, in row order) moved to a layout
    the coordinator places by free memory (``PlanMoves``); returns the new pieces, in row order."""
    targets, segments = session.plan_moves(shape, dtype, sources)
    shapes = [(t.stop - t.start, *shape[1:]) for t in targets]
    run_pulls(session, pulls_for(sources, targets, segments, shapes=shapes, dtype=dtype), what="rebalance")
    return tuple(targets)


def sum_tree(
    session: Session, partials: Sequence[Piece], shape: tuple[int, ...], dtype: np.dtype[Any]
) -> Piece:
    """The elementwise sum of same-shaped buffers, added by a tree of agents: at each level, pairs of
    partials (partners on one agent first, so those add without the network) become one on the first's
    agent, which pulls the second. Consumes ``partials`` (freed as they are added); returns the piece
    that holds the sum.

    Raises:
        RemoteError: a pull failed; every partial and partial sum is freed first.
    """
    rows = shape[0] if shape else 1
    level = sorted(partials, key=lambda p: (p.agent_id, p.worker))
    while len(level) > 1:
        pairs = [(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        sums = [replace(first, start=0, stop=rows, buffer_id=session.new_buffer_id()) for first, _ in pairs]
        pulls = [
            Pull(
                target=total,
                sources=((first, 0, rows), (second, 0, rows)),
                shape=shape,
                dtype=dtype,
                combine="sum",
            )
            for total, (first, second) in zip(sums, pairs, strict=True)
        ]
        try:
            run_pulls(session, pulls, what="sum")
        except BaseException:
            session.run(session.free_now(level), timeout=session.timeouts.rpc, what="free")
            raise
        consumed = [piece for pair in pairs for piece in pair]
        session.run(session.free_now(consumed), timeout=session.timeouts.rpc, what="free")
        level = sums + level[2 * len(pairs) :]
    return level[0]
