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
from dataclasses import replace

import numpy as np

from gpupool._errors import AgentNotAccepting, BufferMoved, GpupoolError, ShardsLost
from gpupool.client.layout import Piece
from gpupool.client.lineage import Rebuild, Unrebuildable
from gpupool.client.losses import LOSSES, REBUILD_TRIES, Loss, loss_of
from gpupool.client.pulls import pull_whole
from gpupool.client.session import Session
from gpupool.protocol.codec import check_dtype, shape_of

__all__ = ["new_place", "rebuild_at", "recover", "repoint"]

log = logging.getLogger(__name__)


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
        return state.current(lost.with_buffer("")).with_buffer(lost.buffer_id).with_buffer(lost.buffer_id)
    running = state.running.get(place)
    if running is None:
        running = state.running[place] = asyncio.ensure_future(_recover(session, lost, kind, cause))
        running.add_done_callback(lambda _: state.running.pop(place, None))
    await asyncio.shield(running)
    return state.current(lost.with_buffer("")).with_buffer(lost.buffer_id)


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
        repoint(session, lost, to, ids)
        return to
    ids = book.on(lost.place)
    # What cannot be rebuilt is lost for good: a later use of it raises ShardsLost naming it (dead).
    gone = {lost.agent_id, *state.avoid, *session.offline_agents} if kind == "agent" else set(state.avoid)
    plan = book.plan(ids, session.new_buffer_id, partial=True, gone=gone)
    for buffer_id, why in plan.dead.items():
        state.dead[buffer_id] = _named(session, lost, Unrebuildable(buffer_id, why))
    book.forget(plan.dead)
    ids = [i for i in ids if i not in plan.dead]
    exclude = [lost.agent_id] if kind == "agent" else []
    delay = 0.2
    for attempt in range(REBUILD_TRIES):
        target = await new_place(session, max(plan.nbytes, 1), exclude)
        try:
            await rebuild_at(session, target, plan)
            break
        except (AgentNotAccepting, *LOSSES) as exc:
            # A worker process still restarting, or the new place lost too: free what arrived, try again.
            with contextlib.suppress(GpupoolError):
                await session.channel(target.agent_id, target.endpoint).free(plan.made)
            if attempt == REBUILD_TRIES - 1:
                raise
            if not isinstance(exc, AgentNotAccepting):
                exclude.append(target.agent_id)
            log.info("rebuilding on agent %s failed (%s); trying again", target.agent_id, exc)
            await asyncio.sleep(delay * (1 + random.random()))
            delay *= 2
    repoint(session, lost, target, ids)
    state.rebuilt += len(ids)
    state.recoveries += 1
    log.warning(
        "agent %s %s: rebuilt %d of this session's buffers (%d bytes, %d ops, %d uploads) on agent %s "
        "worker %d in %.2f s%s",
        lost.agent_id,
        "is lost" if kind == "agent" else "lost its worker process",
        len(ids),
        plan.nbytes,
        len(plan.ops),
        len(plan.uploads),
        target.agent_id,
        target.worker,
        time.monotonic() - started,
        f"; {len(plan.dead)} cannot be rebuilt" if plan.dead else "",
    )
    return target


async def rebuild_at(session: Session, target: Piece, plan: Rebuild) -> None:
    """Upload the plan's rows to ``target``'s worker, then run its program there."""
    channel = session.channel(target.agent_id, target.endpoint)
    await asyncio.gather(
        *(channel.upload(name, target.worker, rows, session.id) for name, rows in plan.uploads),
        *(
            pull_whole(
                session,
                replace(target, start=replica.start, stop=replica.stop, buffer_id=name),
                replica,
                shape_of(meta),
                check_dtype(meta.dtype),
            )
            for name, replica, meta in plan.pulls
        ),
    )
    if plan.ops:
        timeout = session.timeouts.for_work(plan.nbytes * 3, 0)
        await channel.execute(target.worker, plan.ops, session=session.id, free=plan.free, timeout=timeout)
    elif plan.free:
        await channel.free(plan.free)


async def new_place(session: Session, nbytes: int, exclude: list[str]) -> Piece:
    """One worker with room for ``nbytes`` (placed as a single row, so the coordinator cannot split it),
    not on the ``exclude``\\ d agents; retried a bounded number of times with jittered backoff while the
    coordinator still lists the lost agent as ready."""
    delay = 0.1
    for attempt in range(4):
        try:
            (placed,) = await session.place_async((1, nbytes), np.dtype(np.uint8), exclude=exclude)
            return placed.with_buffer("")
        except GpupoolError:
            if attempt == 3:
                raise
            await asyncio.sleep(delay * (1 + random.random()))
            delay *= 2
    raise AssertionError("unreachable")


def repoint(session: Session, old: Piece, to: Piece, ids: list[str]) -> None:
    """Everything the session kept at ``old``'s place (``ids``) is at ``to``'s now: the book, the arrays,
    later lookups; and nothing new goes to ``old``'s agent if ``to`` is on another."""
    session.book.move(ids, to)
    recovery = session.recovery
    recovery.moved[old.place] = to
    recovery.follow(ids, to)
    if to.agent_id != old.agent_id:
        recovery.avoid.add(old.agent_id)
    for holder in session.holders():
        holder.relocate(old.place, to)


def _named(session: Session, lost: Piece, exc: Unrebuildable) -> ShardsLost:
    """``exc`` as the user's error: the array (if one still holds the buffer) and its rows."""
    piece = session.book.piece(exc.buffer_id) or lost
    for holder in session.holders():
        name = holder.holding(exc.buffer_id)
        if name:
            return ShardsLost(lost.agent_id, name, (piece.start, piece.stop), exc.why)
    return ShardsLost(lost.agent_id, "", (piece.start, piece.stop), exc.why)
