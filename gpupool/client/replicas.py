"""Replicas of uploaded shards (``gp.connect(keep_uploads="replica")``): each shard of an uploaded array is
copied whole to a worker of another agent, agent to agent (a ``Pull``: the client's link carries nothing
more), and the lineage book records the copy as the shard's recipe; a shard lost with its agent is then
pulled back from its replica (:mod:`gpupool.client.recovery`) instead of uploaded from a copy on the client.

The cost is pool memory: every uploaded byte twice. A replica is freed when no recipe needs it any more
(the array and everything computed from it freed). A pool with one agent has nowhere for replicas: its
uploads keep none (a lost shard is then lost for good, and says so).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import numpy as np

from gpupool._errors import GpupoolError
from gpupool.client.layout import Piece
from gpupool.client.pulls import pull_whole
from gpupool.client.session import Session
from gpupool.protocol.codec import meta_of

__all__ = ["protect"]

log = logging.getLogger(__name__)


def protect(session: Session, host: np.ndarray, pieces: list[Piece]) -> None:
    """Give each of ``pieces`` (``host``'s rows, just uploaded) a replica on another agent, where the
    session keeps replicas (keep_uploads="replica"); a piece that gets none is logged, not raised."""
    if session.book.keep != "replica" or not pieces:
        return
    row_bytes = host.dtype.itemsize * int(np.prod(host.shape[1:], dtype=np.int64))

    async def one(piece: Piece) -> None:
        rows = piece.stop - piece.start
        shape = (rows, *host.shape[1:])
        try:
            (place,) = await session.place_async(
                (1, max(rows * row_bytes, 1)), np.dtype(np.uint8), exclude=[piece.agent_id]
            )
        except (GpupoolError, ValueError) as exc:
            log.warning(
                "no replica for rows %d:%d on agent %s: %s", piece.start, piece.stop, piece.agent_id, exc
            )
            return
        replica = piece.moved_to(place).with_buffer(session.new_buffer_id())
        await pull_whole(session, replica, piece, shape, host.dtype)
        session.book.replicated(piece, replica, meta_of(host.dtype, shape), _releaser(session))

    async def all_of_them() -> None:
        results = await asyncio.gather(*(one(p) for p in pieces), return_exceptions=True)
        for piece, result in zip(pieces, results, strict=True):
            if isinstance(result, BaseException):
                log.warning(
                    "no replica for rows %d:%d on agent %s: %s",
                    piece.start,
                    piece.stop,
                    piece.agent_id,
                    result,
                )

    with session.track("replicate", total=host.nbytes, unit="bytes"):
        session.run(all_of_them(), timeout=session.timeouts.for_stream(host.nbytes) * 2, what="replicate")


def _none_for(piece: Piece, why: BaseException) -> None:
    log.warning("no replica for rows %d:%d on agent %s: %s", piece.start, piece.stop, piece.agent_id, why)


def _releaser(session: Session) -> Callable[[Piece], None]:
    def release(replica: Piece) -> None:
        session.release([replica])

    return release
