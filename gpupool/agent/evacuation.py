"""Drain and take-back, the agent's part: the coordinator moves this agent's buffers to other agents.

When an agent turns DRAINING to have its buffers moved (``gpupool drain``, ``gpupool-agent pause``, the pause
schedule), the coordinator asks it for its :meth:`~Evacuation.inventory` (once the data-plane calls in flight
when it asked have ended, at most a few seconds: a program writing a new buffer finishes first), has other
agents ``Pull`` each buffer from here (same session, same buffer id), then calls :meth:`~Evacuation.forward`:
the buffers are freed here and their ids forwarded (:meth:`BufferRegistry.forward`), so that any later call
naming one is refused ``buffer-moved`` with its new home, and a line per session and target says what moved
where. The coordinator's last call is marked final; ``gpupool-agent pause`` waits for it
(:meth:`~Evacuation.wait`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from gpupool._proto.v1 import agent_pb2
from gpupool.agent.buffers import Buffer, BufferRegistry, Forward
from gpupool.protocol.codec import meta_of

__all__ = ["MAX_SETTLE_SECONDS", "CallsInFlight", "Evacuation", "EvacuationSummary", "MovedGroup"]

log = logging.getLogger(__name__)

#: Longest an inventory waits for the calls in flight, whatever the request asks.
MAX_SETTLE_SECONDS: Final = 30.0

RequestT = TypeVar("RequestT")
ReplyT = TypeVar("ReplyT")


class CallsInFlight:
    """The data-plane calls running now, so that an inventory can wait for those that came before it.

    One event loop owns it (the gRPC server's).
    """

    def __init__(self) -> None:
        self._next = 0
        self._active: set[int] = set()
        self._ended = asyncio.Event()

    def __len__(self) -> int:
        return len(self._active)

    def track(
        self, handler: Callable[[RequestT, Any], Awaitable[ReplyT]]
    ) -> Callable[[RequestT, Any], Awaitable[ReplyT]]:
        """``handler`` (a gRPC method's coroutine, unary or streaming), counted while it runs."""

        async def tracked(request: RequestT, context: Any) -> ReplyT:
            number = self._next
            self._next += 1
            self._active.add(number)
            try:
                return await handler(request, context)
            finally:
                self._active.discard(number)
                self._ended.set()
                self._ended = asyncio.Event()

        return tracked

    async def settle(self, seconds: float) -> bool:
        """Wait until every call that started before now has ended, for at most ``seconds``; whether they
        all did (later calls are not waited for: a busy agent would never be idle)."""
        horizon = self._next
        deadline = time.monotonic() + seconds
        while any(number < horizon for number in self._active):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ended = self._ended
            try:
                async with asyncio.timeout(left):
                    await ended.wait()
            except TimeoutError:
                return False
        return True


@dataclass(frozen=True, slots=True)
class MovedGroup:
    """Buffers of one session that moved to one worker of another agent."""

    session: str
    agent_id: str
    endpoint: str
    worker: int
    buffers: int
    nbytes: int

    def line(self) -> str:
        """One line of the agent's log (and of ``gpupool-agent pause``)."""
        return (
            f"moved {self.buffers} buffer(s), {self.nbytes} bytes, of session {self.session or '(none)'} "
            f"to agent {self.agent_id} ({self.endpoint}) worker {self.worker}"
        )

    def as_dict(self) -> dict[str, object]:
        """For the control socket's JSON answer."""
        return {
            "session": self.session,
            "agent_id": self.agent_id,
            "endpoint": self.endpoint,
            "worker": self.worker,
            "buffers": self.buffers,
            "bytes": self.nbytes,
        }


@dataclass(frozen=True, slots=True)
class EvacuationSummary:
    """What moved away since the agent was last drained or paused, and what stayed.

    Attributes:
        moved: by session, then agent and worker.
        left: buffers still here when the coordinator's last call came (0 before it).
        left_bytes: their bytes.
        note: the coordinator's word on why some stayed.
        finished: whether the coordinator's last call came.
    """

    moved: tuple[MovedGroup, ...]
    left: int
    left_bytes: int
    note: str
    finished: bool

    def as_dict(self) -> dict[str, object]:
        """For the control socket's JSON answer."""
        return {
            "moved": [group.as_dict() for group in self.moved],
            "left": self.left,
            "left_bytes": self.left_bytes,
            "note": self.note,
            "finished": self.finished,
        }


class Evacuation:
    """``Inventory`` and ``Forward``, already confined to the coordinator by the guard where there is one.

    Buffer ids here are the registry's (``<session>/<id>`` behind a guard, which rewrites them both ways).

    Args:
        registry: the resident buffers.
        calls: the data-plane calls in flight.
    """

    def __init__(self, *, registry: BufferRegistry, calls: CallsInFlight) -> None:
        self._registry = registry
        self._calls = calls
        self._moved: dict[tuple[str, str, str, int], list[int]] = {}  # (session, agent, endpoint, worker)
        self._final: agent_pb2.ForwardRequest | None = None
        self._finished = asyncio.Event()

    def begin(self) -> None:
        """A new drain or pause asks for moves: the summary starts afresh."""
        self._moved.clear()
        self._final = None
        self._finished = asyncio.Event()

    async def inventory(self, request: agent_pb2.InventoryRequest) -> agent_pb2.InventoryReply:
        """Every resident buffer, once the calls in flight have ended (at most ``settle_seconds``)."""
        seconds = min(max(request.settle_seconds, 0.0), MAX_SETTLE_SECONDS)
        settled = await self._calls.settle(seconds)
        reply = agent_pb2.InventoryReply(settled=settled)
        for buffer in self._registry.resident():
            reply.buffers.append(_resident(buffer))
        if not settled:
            log.warning(
                "inventory for a move: %d call(s) still in flight after %.0f s", len(self._calls), seconds
            )
        return reply

    async def forward(self, request: agent_pb2.ForwardRequest) -> agent_pb2.ForwardReply:
        """Free the buffers named and forward their ids to their new homes; log what moved where."""
        moves = [
            (home.buffer_id, Forward(home.session, home.agent_id, home.endpoint, home.worker))
            for home in request.moves
        ]
        forwarded, missing = self._registry.forward(moves)
        homes = dict(moves)
        groups: dict[tuple[str, str, str, int], list[int]] = {}
        for buffer in forwarded:
            home = homes[buffer.buffer_id]
            counts = groups.setdefault((home.session, home.agent_id, home.endpoint, home.worker), [0, 0])
            counts[0] += 1
            counts[1] += buffer.nbytes
        for key, (buffers, nbytes) in sorted(groups.items()):
            log.info("%s", MovedGroup(*key, buffers, nbytes).line())
            total = self._moved.setdefault(key, [0, 0])
            total[0] += buffers
            total[1] += nbytes
        reply = agent_pb2.ForwardReply(
            forwarded=len(forwarded), bytes_forwarded=sum(buffer.nbytes for buffer in forwarded)
        )
        wanted = {home.buffer_id: home for home in request.moves}
        reply.missing.extend(wanted[buffer_id] for buffer_id in missing)
        if missing:
            log.info("%d buffer(s) to move were freed meanwhile: not forwarded", len(missing))
        if request.final:
            self._final = request
            self._finished.set()
            moved = sum(counts[0] for counts in self._moved.values())
            log.info(
                "evacuation done: %d buffer(s), %d bytes moved in all; %d buffer(s), %d bytes left here%s",
                moved,
                sum(counts[1] for counts in self._moved.values()),
                request.left,
                request.left_bytes,
                f" ({request.note})" if request.note else "",
            )
        return reply

    def summary(self) -> EvacuationSummary:
        """What moved since :meth:`begin`, and whether the coordinator said it was done."""
        final = self._final
        return EvacuationSummary(
            moved=tuple(MovedGroup(*key, *counts) for key, counts in sorted(self._moved.items())),
            left=final.left if final is not None else 0,
            left_bytes=final.left_bytes if final is not None else 0,
            note=final.note if final is not None else "",
            finished=final is not None,
        )

    async def wait(self, seconds: float) -> EvacuationSummary:
        """The summary once the coordinator's last call came, or after ``seconds`` (then not finished)."""
        finished = self._finished
        try:
            async with asyncio.timeout(seconds):
                await finished.wait()
        except TimeoutError:
            pass
        return self.summary()


def _resident(buffer: Buffer) -> agent_pb2.ResidentBuffer:
    return agent_pb2.ResidentBuffer(
        session=buffer.session,
        buffer_id=buffer.buffer_id,
        worker=buffer.worker,
        meta=meta_of(buffer.dtype, buffer.shape),
        nbytes=buffer.nbytes,
    )
