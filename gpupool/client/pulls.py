"""One ``Pull`` call: an agent makes a new buffer from row ranges of resident buffers, its own or other
agents' (``Pull`` in ``protos/gpupool/v1/agent.proto``), the bytes moving agent to agent. :mod:`rowmoves`
plans pulls for arrays; :mod:`recovery` pulls a lost shard's replica.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np

from gpupool._proto.v1 import agent_pb2
from gpupool.client.layout import Piece
from gpupool.client.session import Session
from gpupool.protocol.codec import meta_of

__all__ = ["PULLED", "Pull", "pull_request", "pull_whole", "run_pulls"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Pull:
    """One ``Pull``: ``target`` (its place and new buffer id) made from ``sources``, each a resident piece
    and the rows ``[start, stop)`` of its buffer, combined into an array of ``shape`` and ``dtype``."""

    target: Piece
    sources: tuple[tuple[Piece, int, int], ...]
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    combine: Literal["concatenate", "sum"] = "concatenate"
    axis: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the new buffer."""
        return math.prod(self.shape) * self.dtype.itemsize


#: Why a buffer made by a pull cannot be rebuilt (gpupool.client.lineage).
PULLED: Final = (
    "it was made by moving rows between agents (indexing, sorting, a re-layout), which keeps no lineage yet"
)


def run_pulls(session: Session, pulls: Sequence[Pull], *, what: str) -> None:
    """Run the pulls concurrently, each on its target's agent.

    Raises:
        RemoteError: an agent refused its pull, or could not read a source (the message names it);
            the buffers the other pulls made are freed first.
    """
    if not pulls:
        return
    moved = sum(pull.nbytes for pull in pulls)
    deadline = 2 * session.timeouts.for_stream(moved) + session.timeouts.connect

    async def go() -> None:
        calls = [
            session.channel(p.target.agent_id, p.target.endpoint).pull(
                pull_request(session, p), timeout=deadline
            )
            for p in pulls
        ]
        results: list[object] = list(await asyncio.gather(*calls, return_exceptions=True))
        await session.raise_after_cleanup(results, [[p.target] for p in pulls])

    session.run(go(), timeout=deadline + session.timeouts.rpc, what=what)
    for pull in pulls:
        session.book.made_elsewhere(pull.target, PULLED)


def pull_request(session: Session, pull: Pull) -> agent_pb2.PullRequest:
    request = agent_pb2.PullRequest(
        worker=pull.target.worker,
        output=pull.target.buffer_id,
        combine=pull.combine,
        axis=pull.axis,
        expect=meta_of(pull.dtype, pull.shape),
        session=session.id,
    )
    for piece, start, stop in pull.sources:
        source = request.sources.add(
            agent_id=piece.agent_id, buffer_id=piece.buffer_id, start=start, stop=stop
        )
        if piece.agent_id != pull.target.agent_id:
            # The capability carries the agent's address; an open agent is named by its endpoint.
            token = session.capability_token(piece.agent_id)
            if token:
                source.capability = token
            else:
                source.endpoint = piece.endpoint
    return request


async def pull_whole(
    session: Session, target: Piece, source: Piece, shape: tuple[int, ...], dtype: np.dtype[Any]
) -> None:
    """Have ``target``'s worker make buffer ``target.buffer_id`` a whole copy of ``source``'s buffer (of
    ``shape`` and ``dtype``), agent to agent (loop thread).

    Raises:
        RemoteError: the agent refused, or could not read the source; as for any call.
    """
    pull = Pull(target=target, sources=((source, 0, shape[0] if shape else 1),), shape=shape, dtype=dtype)
    timeout = session.timeouts.connect + session.timeouts.for_stream(pull.nbytes)
    await session.channel(target.agent_id, target.endpoint).pull(pull_request(session, pull), timeout=timeout)
