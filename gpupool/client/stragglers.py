"""Speculative twins: when one shard's program runs far behind its siblings, the same program runs on
another worker too, and the first result wins (issue 9, item 3).

The twin needs that shard's inputs where it runs: it rebuilds, on a new worker (the coordinator places
it, away from the straggler's agent), everything the session keeps on the straggler's worker, from
lineage (:mod:`gpupool.client.lineage`), under the same buffer ids, then runs the program there. If the
twin finishes first, the straggler's place is moved to the twin's for good (its buffers are re-pointed as
after a loss, so later programs run there too: a slow card stops slowing the array down); the original
call is cancelled and what it left on the slow agent is freed. If the original finishes first, the twin
is cancelled and what it made is freed. A twin that fails is dropped (the original goes on).

When: once at least half of a round's programs are done, a program still running after
:data:`FACTOR` times the slowest of those (and at least :data:`FLOOR` seconds, and as long as moving what the
session keeps on that worker would take at :data:`REBUILD_BYTES_PER_SECOND`) gets a twin. A round of a
single program has no siblings to compare with: it runs alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol, TypeVar

import numpy as np

from gpupool._errors import GpupoolError
from gpupool.client.layout import Piece
from gpupool.client.recovery import new_place, rebuild_at, repoint
from gpupool.client.session import Session

__all__ = ["FACTOR", "FLOOR", "REBUILD_BYTES_PER_SECOND", "run"]

#: A program this many times slower than the slowest sibling that finished is a straggler.
FACTOR: Final = 3.0
#: ... and only after this many seconds (a twin costs a rebuild: not worth it for fast rounds).
FLOOR: Final = 0.1
#: ... and only after as long as its rebuild would take at this rate (a twin of a worker holding much data
#: costs moving it all).
REBUILD_BYTES_PER_SECOND: Final = 500e6
#: How often the race looks at its programs.
TICK: Final = 0.02

log = logging.getLogger(__name__)


#: Cleanups running (kept referenced until done).
_CLEANUPS: set[asyncio.Task[None]] = set()


class Racer(Protocol):
    """What a race needs of a program (:class:`gpupool.client.graph.Program`)."""

    place: Piece
    creates: list[Piece]


P = TypeVar("P", bound=Racer)


async def run(
    session: Session,
    programs: Sequence[P],
    execute: Callable[[P, Piece], Awaitable[dict[str, np.ndarray]]],
    *,
    enabled: bool = True,
) -> list[object]:
    """Run ``programs`` concurrently with ``execute(program, place)``, twinning stragglers (with
    ``enabled``); returns each program's fetched arrays or its exception, in order. A program its twin won
    has its ``place`` set to the twin's."""
    started = time.monotonic()
    originals = [asyncio.ensure_future(execute(p, p.place)) for p in programs]
    finished: list[float] = []
    twins: dict[int, asyncio.Task[tuple[Piece, list[str], dict[str, np.ndarray]]]] = {}
    outcome: list[object] = [None] * len(programs)
    open_ = set(range(len(programs)))
    while open_:
        waiting = {originals[i] for i in open_} | {twins[i] for i in open_ if i in twins}
        await asyncio.wait(waiting, timeout=TICK if enabled else None, return_when=asyncio.FIRST_COMPLETED)
        now = time.monotonic() - started
        for i in sorted(open_):
            original, twin = originals[i], twins.get(i)
            if twin is not None and twin.done() and not twin.cancelled() and twin.exception() is None:
                target, made, fetched = twin.result()
                _twin_won(session, programs[i], original, target, made)
                outcome[i] = fetched
                open_.discard(i)
            elif original.done() and (original.exception() is None or twin is None or twin.done()):
                # Done; a failed original waits for its running twin (which then stands in for a recovery).
                outcome[i] = original.exception() or original.result()
                open_.discard(i)
                finished.append(now)
                if twin is not None:
                    _twin_lost(session, twin)
        if enabled and open_ and 2 * len(finished) >= len(programs) and finished:
            threshold = max(FACTOR * max(finished), FLOOR)
            for i in open_:
                if i not in twins and now > max(threshold, _rebuild_seconds(session, programs[i].place)):
                    log.warning(
                        "agent %s's program runs %.1f s, its siblings' took at most %.2f s: starting a twin",
                        programs[i].place.agent_id,
                        now,
                        max(finished),
                    )
                    twins[i] = asyncio.ensure_future(_twin(session, programs[i], execute))
    return outcome


def _rebuild_seconds(session: Session, place: Piece) -> float:
    """Roughly how long rebuilding what the session keeps at ``place`` elsewhere would take."""
    book = session.book
    held = sum(
        recipe.nbytes for recipe in (book.recipe(b) for b in book.on(place.place)) if recipe is not None
    )
    return held / REBUILD_BYTES_PER_SECOND


async def _twin(
    session: Session,
    program: P,
    execute: Callable[[P, Piece], Awaitable[dict[str, np.ndarray]]],
) -> tuple[Piece, list[str], dict[str, np.ndarray]]:
    """Rebuild the straggler's worker's buffers on a new place and run ``program`` there; returns the
    place, what was made there (to free if the twin loses), and the program's fetched arrays."""
    slow = program.place
    ids = session.book.on(slow.place)
    plan = session.book.plan(ids, session.new_buffer_id)
    target = await new_place(session, max(plan.nbytes, 1), [slow.agent_id])
    made = [*plan.made, *(c.buffer_id for c in program.creates)]
    here = slow.moved_to(target)
    try:
        await rebuild_at(session, target, plan)
        fetched = await execute(program, here)
    except BaseException:
        _free_soon(session, target, made)
        raise
    return here, ids, fetched


def _twin_won(
    session: Session,
    program: Racer,
    original: asyncio.Future[dict[str, np.ndarray]],
    target: Piece,
    ids: list[str],
) -> None:
    slow = program.place
    original.cancel()
    log.warning(
        "the twin on agent %s won over agent %s: this session's buffers there now live on agent %s",
        target.agent_id,
        slow.agent_id,
        target.agent_id,
    )
    # What the slow agent still holds (and the program may yet make there) is freed.
    _free_soon(session, slow, [*ids, *(c.buffer_id for c in program.creates)])
    repoint(session, slow, target, ids)
    session.recovery.follow((c.buffer_id for c in program.creates), target)
    session.recovery.twins_won += 1
    program.place = target


def _twin_lost(session: Session, twin: asyncio.Task[tuple[Piece, list[str], dict[str, np.ndarray]]]) -> None:
    twin.cancel()  # its own cleanup frees what it made
    twin.add_done_callback(_quietly)
    session.recovery.twins_lost += 1


def _quietly(task: asyncio.Task[tuple[Piece, list[str], dict[str, np.ndarray]]]) -> None:
    """Retrieve a losing twin's failure (a twin that could not run is not an error of the round)."""
    if not task.cancelled() and task.exception() is not None:
        log.info("a twin failed: %s", task.exception())


def _free_soon(session: Session, place: Piece, ids: list[str]) -> None:
    async def free() -> None:
        with contextlib.suppress(GpupoolError, asyncio.CancelledError):
            await session.channel(place.agent_id, place.endpoint).free(ids)

    if ids:
        task = asyncio.ensure_future(free())
        _CLEANUPS.add(task)
        task.add_done_callback(_CLEANUPS.discard)
