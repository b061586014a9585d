"""Shards lost with an agent (or a worker) are made again elsewhere, and calls that failed with them are
retried there; shards an agent moved away (drain, its owner's pause) are followed.

A loss is noticed by the failed call (the agent's connection refused or reset, or its worker process
gone, which its agent reports as a lost buffer) or by the coordinator showing the agent offline (its last
will, or its silence): a call waiting on it is abandoned with :class:`~gpupool.AgentLost`. Then
:func:`recover` has the coordinator place one new worker for everything the session kept on the lost
one, and makes it all there again from lineage (:mod:`gpupool.client.lineage`) under the same buffer ids;
every array that had shards there is re-pointed. The caller retries its call at the new place, a bounded
number of times (:data:`MAX_RECOVERIES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from gpupool._errors import (
    AgentLost,
    AgentNotAccepting,
    BufferMoved,
    BufferNotFound,
    ConnectError,
    GpupoolError,
    ShardsLost,
    StreamClosed,
)
from gpupool._proto.v1 import coordinator_pb2
from gpupool.client.layout import Piece, Place
from gpupool.client.lineage import Rebuild, Unrebuildable
from gpupool.protocol.codec import meta_of, op_outputs

if TYPE_CHECKING:
    from gpupool.client.session import Session

__all__ = ["MAX_RECOVERIES", "Recovery", "loss_of", "recover"]

#: How many times one call is retried after recovering the shards it needed.
MAX_RECOVERIES: Final = 3
#: How many places one recovery tries (a worker still restarting, or a new place lost too).
REBUILD_TRIES: Final = 5
#: Failures that say an agent is gone.
LOSSES: Final = (AgentLost, ConnectError, StreamClosed)

log = logging.getLogger(__name__)

Loss = Literal["agent", "worker", "moved"]


@dataclass(slots=True)
class Recovery:
    """A session's recoveries: where each lost place went, those running, and how many buffers were
    rebuilt (for tests and logs)."""

    moved: dict[Place, Piece] = field(default_factory=dict)
    former: dict[Place, list[Place]] = field(default_factory=dict)
    running: dict[Place, asyncio.Future[Piece]] = field(default_factory=dict)
    rebuilt: int = 0
    recoveries: int = 0

    def current(self, piece: Piece) -> Piece:
        """``piece`` at the place that stands for its own now (itself if that was never lost)."""
        seen = 0
        while piece.place in self.moved and seen < 64:
            to = self.moved[piece.place]
            piece = Piece(
                agent_id=to.agent_id,
                endpoint=to.endpoint,
                worker=to.worker,
                start=piece.start,
                stop=piece.stop,
                buffer_id=piece.buffer_id,
            )
            seen += 1
        return piece


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


async def recover(session: Session, lost: Piece, cause: BaseException) -> Piece:
    """``lost`` (same rows and buffer) at the place that now stands for its own, whose call failed with
    ``cause``; that place made if need be: every
    buffer the session kept on that worker rebuilt there, every array re-pointed. One recovery per lost
    place runs at a time; callers that lose the same place share it.

    Raises:
        ShardsLost: a kept buffer there cannot be rebuilt (its array's rows, and why, are named).
        NoCapacity, PlacementError: no other worker can take them.
        ``cause``: it is not a loss.
    """
    kind = loss_of(cause)
    if kind is None:
        raise cause
    state = session.recovery
    place = lost.place
    if place in state.moved:
        return state.current(lost)
    running = state.running.get(place)
    if running is None:
        running = state.running[place] = asyncio.ensure_future(_recover(session, lost, kind, cause))
        running.add_done_callback(lambda _: state.running.pop(place, None))
    await asyncio.shield(running)
    return state.current(lost)


async def _recover(session: Session, lost: Piece, kind: Loss, cause: BaseException) -> Piece:
    state = session.recovery
    book = session.book
    started = time.monotonic()
    if kind == "moved":
        assert isinstance(cause, BufferMoved)
        to = Piece(
            agent_id=cause.to_agent,
            endpoint=cause.to_endpoint,
            worker=cause.to_worker,
            start=lost.start,
            stop=lost.stop,
            buffer_id="",
        )
        await session.grant([to.agent_id])
        ids = book.on(lost.place)
        log.warning(
            "agent %s moved this session's buffers to agent %s worker %d: following them",
            lost.agent_id,
            to.agent_id,
            to.worker,
        )
        _repoint(session, lost.place, to, ids)
        return to
    ids = book.on(lost.place)
    try:
        plan = book.plan(ids, session.new_buffer_id)
    except Unrebuildable as exc:
        raise _named(session, lost, exc) from cause
    exclude = [lost.agent_id] if kind == "agent" else []
    delay = 0.2
    for attempt in range(REBUILD_TRIES):
        target = await _new_place(session, max(plan.nbytes, 1), exclude)
        try:
            await _rebuild_at(session, target, plan)
            break
        except (AgentNotAccepting, *LOSSES) as exc:
            # A worker process still restarting, or the new place lost too: free what arrived, try again.
            made = [name for name, _ in plan.uploads] + [out for op in plan.ops for out in op_outputs(op)]
            with contextlib.suppress(GpupoolError):
                await session.channel(target.agent_id, target.endpoint).free(made)
            if attempt == REBUILD_TRIES - 1:
                raise
            if not isinstance(exc, AgentNotAccepting):
                exclude.append(target.agent_id)
            log.info("rebuilding on agent %s failed (%s); trying again", target.agent_id, exc)
            await asyncio.sleep(delay * (1 + random.random()))
            delay *= 2
    _repoint(session, lost.place, target, ids)
    state.rebuilt += len(ids)
    state.recoveries += 1
    log.warning(
        "agent %s %s: rebuilt %d of this session's buffers (%d bytes, %d ops, %d uploads) on agent %s "
        "worker %d in %.2f s",
        lost.agent_id,
        "is lost" if kind == "agent" else "lost its worker process",
        len(ids),
        plan.nbytes,
        len(plan.ops),
        len(plan.uploads),
        target.agent_id,
        target.worker,
        time.monotonic() - started,
    )
    return target


async def _rebuild_at(session: Session, target: Piece, plan: Rebuild) -> None:
    """Upload the plan's rows to ``target``'s worker, then run its program there."""
    channel = session.channel(target.agent_id, target.endpoint)
    await asyncio.gather(
        *(channel.upload(name, target.worker, rows, session.id) for name, rows in plan.uploads)
    )
    if plan.ops:
        timeout = session.timeouts.for_work(plan.nbytes * 3, 0)
        await channel.execute(target.worker, plan.ops, session=session.id, free=plan.free, timeout=timeout)
    elif plan.free:
        await channel.free(plan.free)


async def _new_place(session: Session, nbytes: int, exclude: list[str]) -> Piece:
    """One worker with room for ``nbytes`` (placed as a single row, so the coordinator cannot split it),
    not on the ``exclude``\\ d agents; retried a bounded number of times with jittered backoff while the
    coordinator still lists the lost agent as ready."""
    import numpy as np

    request = coordinator_pb2.PlaceRequest(
        session=session.id, meta=meta_of(np.dtype(np.uint8), (1, nbytes)), exclude_agents=exclude
    )
    delay = 0.1
    for attempt in range(4):
        try:
            reply = await session.call_coordinator("Place", request)
            break
        except GpupoolError:
            if attempt == 3:
                raise
            await asyncio.sleep(delay * (1 + random.random()))
            delay *= 2
    session.keep_placed(reply.shards)
    shard = reply.shards[0]
    return Piece(
        agent_id=shard.agent_id, endpoint=shard.endpoint, worker=shard.worker, start=0, stop=0, buffer_id=""
    )


def _repoint(session: Session, old: Place, to: Piece, ids: list[str]) -> None:
    """Everything at ``old`` is at ``to``'s place now: the book, the arrays, later lookups."""
    session.book.move(ids, to)
    session.recovery.moved[old] = to
    session.recovery.former.setdefault(to.place, []).append(old)
    for holder in session.holders():
        holder.relocate(old, to)


def _named(session: Session, lost: Piece, exc: Unrebuildable) -> ShardsLost:
    """``exc`` as the user's error: the array (if one still holds the buffer) and its rows."""
    piece = session.book.piece(exc.buffer_id) or lost
    for holder in session.holders():
        name = holder.holding(exc.buffer_id)
        if name:
            return ShardsLost(lost.agent_id, name, (piece.start, piece.stop), exc.why)
    return ShardsLost(lost.agent_id, "", (piece.start, piece.stop), exc.why)
