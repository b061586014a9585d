"""Uploads of one buffer in several streams ("parts"), each carrying a range of its rows.

A client may split a shard's rows over several ``UploadRaw`` streams, so that the bytes of one shard are not
bound to one HTTP/2 stream (``UploadHeader.has_rows``, ``start``, ``stop`` in
``protos/gpupool/v1/agent.proto``). The first part to arrive reserves the whole buffer's memory and
allocates its array (:class:`Assembly`); each part fills its own rows of that one array, in place. The
buffer is committed once its parts have covered every row, and no sooner: until then it is not resident,
and every part's reply waits for the commit, so a client sees all of its parts succeed or all fail.

What is refused, and drops the whole upload with whatever arrived (the reservation released, the array
let go): a range outside the buffer, empty, or overlapping a range another part claimed; a part whose
worker, dtype, shape or session differ from the first part's; any part that fails, is cancelled, or
stalls. An assembly never outlives its parts: the last part still waiting ends it at its deadline, or
when no part has sent anything for ``stall`` seconds.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpupool.agent.buffers import BufferRegistry, Reservation
from gpupool.protocol.errors import RpcRefusal

__all__ = ["Assemblies", "Assembly", "PartsFailed"]


class PartsFailed(Exception):
    """Another part of the upload failed: this one is refused with the same words."""

    def __init__(self, refusal: RpcRefusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


@dataclass(eq=False, slots=True, kw_only=True)
class Assembly:
    """One buffer being filled by several parts.

    Attributes:
        buffer_id: the agent's name for the buffer (qualified by the guard where there is one).
        worker: the worker it is for.
        dtype, shape: the whole buffer's.
        session: the owner.
        reservation: the whole buffer's memory and id, held until commit or failure.
        array: the preallocated array the parts fill (a device array on a GPU worker).
        deadline: the loop time by which every part must have arrived and finished.
        claimed: the row ranges parts have claimed, in arrival order.
        rows_done: rows whose part has arrived in full.
        receiving: how many parts are still writing into ``array``: a failed upload's array and reservation
            go once none is (each stops at its next chunk, or at the stall deadline if none comes).
        last_progress: the loop time of the last chunk or part, for the stall deadline.
        allocated: resolved once ``array`` is allocated (parts arriving before wait for it).
        done: resolved on commit, or set to the refusal that dropped the upload.
    """

    buffer_id: str
    worker: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    session: str
    reservation: Reservation
    array: Any
    deadline: float
    last_progress: float
    done: asyncio.Future[None]
    allocated: asyncio.Future[None]
    claimed: list[tuple[int, int]] = field(default_factory=list)
    rows_done: int = 0
    receiving: int = 0

    @property
    def row_bytes(self) -> int:
        """Bytes of one row."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    def claim(self, start: int, stop: int) -> None:
        """Take rows ``[start, stop)`` for a part.

        Raises:
            RpcRefusal: ``bad-request`` for a range that is empty, outside the buffer, or overlaps one
                another part claimed.
        """
        rows = self.shape[0]
        if not 0 <= start < stop <= rows:
            raise RpcRefusal(
                "bad-request",
                f"part rows [{start}, {stop}) are not a non-empty range of the buffer's {rows} rows",
                buffer_id=self.buffer_id,
            )
        for other_start, other_stop in self.claimed:
            if start < other_stop and other_start < stop:
                raise RpcRefusal(
                    "bad-request",
                    f"part rows [{start}, {stop}) overlap rows [{other_start}, {other_stop}) of another part",
                    buffer_id=self.buffer_id,
                )
        self.claimed.append((start, stop))


class Assemblies:
    """The uploads in parts in progress on one agent, by buffer id. Event loop only.

    Args:
        registry: where the whole buffer's memory is reserved and the buffer finally committed.
        clock: the loop's monotonic clock.
    """

    def __init__(self, registry: BufferRegistry, *, clock: Callable[[], float]) -> None:
        self._registry = registry
        self._clock = clock
        self._open: dict[str, Assembly] = {}

    def __len__(self) -> int:
        return len(self._open)

    def get(self, buffer_id: str) -> Assembly | None:
        """The assembly of ``buffer_id`` in progress, if any."""
        return self._open.get(buffer_id)

    def open(
        self,
        *,
        buffer_id: str,
        worker: int,
        dtype: np.dtype[Any],
        shape: tuple[int, ...],
        session: str,
        reservation: Reservation,
        seconds: float,
    ) -> Assembly:
        """Start the assembly of a buffer whose memory ``reservation`` holds; :meth:`allocate` gives it its
        array (parts that arrive meanwhile wait for it in :meth:`join`)."""
        now = self._clock()
        loop = asyncio.get_running_loop()
        assembly = Assembly(
            buffer_id=buffer_id,
            worker=worker,
            dtype=dtype,
            shape=shape,
            session=session,
            reservation=reservation,
            array=None,
            deadline=now + seconds,
            last_progress=now,
            done=loop.create_future(),
            allocated=loop.create_future(),
        )
        self._open[buffer_id] = assembly
        return assembly

    def allocate(self, assembly: Assembly, array: Any) -> None:
        """The array the parts fill is ready."""
        if not assembly.done.done():
            assembly.array = array
            assembly.allocated.set_result(None)

    async def join(self, assembly: Assembly) -> None:
        """Wait, as a part that found the assembly open, until its array is allocated.

        Raises:
            PartsFailed: the allocation failed, or the upload was dropped meanwhile.
            TimeoutError: the upload's deadline passed.
        """
        if not assembly.allocated.done():
            async with asyncio.timeout_at(assembly.deadline):
                # asyncio.wait leaves the futures alone, whatever happens to this wait
                await asyncio.wait([assembly.allocated, assembly.done], return_when=asyncio.FIRST_COMPLETED)
        if assembly.done.done() and assembly.done.exception() is not None:
            assembly.done.result()

    def check_same(
        self, assembly: Assembly, *, worker: int, dtype: np.dtype[Any], shape: tuple[int, ...], session: str
    ) -> None:
        """Refuse a part that disagrees with the first part of its buffer.

        Raises:
            RpcRefusal: ``bad-request``.
        """
        if (worker, dtype, shape, session) != (
            assembly.worker,
            assembly.dtype,
            assembly.shape,
            assembly.session,
        ):
            raise RpcRefusal(
                "bad-request",
                f"a part of buffer {assembly.buffer_id} disagrees with its first part "
                f"(worker {worker}, {dtype.name}{list(shape)} against worker {assembly.worker}, "
                f"{assembly.dtype.name}{list(assembly.shape)})",
                buffer_id=assembly.buffer_id,
            )

    def progressed(self, assembly: Assembly) -> None:
        """A chunk or a part arrived: the stall deadline starts again."""
        assembly.last_progress = self._clock()

    def finished(self, assembly: Assembly, start: int, stop: int) -> None:
        """Rows ``[start, stop)`` arrived in full; commit the buffer if that was the last of them."""
        if assembly.done.done():
            return
        assembly.rows_done += stop - start
        if assembly.rows_done == assembly.shape[0]:
            self._open.pop(assembly.buffer_id, None)
            self._registry.commit(assembly.reservation, assembly.array)
            assembly.array = None
            assembly.done.set_result(None)

    def fail(self, assembly: Assembly, refusal: RpcRefusal) -> None:
        """Drop the upload: every part is refused (one still receiving at its next chunk: cancelling a call's
        handler midway would leave gRPC unable to answer it); the array and the reservation go once no part
        writes into the array any more."""
        if self._open.get(assembly.buffer_id) is assembly:
            del self._open[assembly.buffer_id]
        if not assembly.done.done():
            assembly.done.set_exception(PartsFailed(refusal))
            assembly.done.exception()  # retrieved: a failure no part waits for is not an unhandled error
        self._let_go(assembly)

    def enter(self, assembly: Assembly) -> None:
        """A part starts writing into the array."""
        assembly.receiving += 1

    def leave(self, assembly: Assembly) -> None:
        """A part stopped writing into the array (whatever happened)."""
        assembly.receiving -= 1
        self._let_go(assembly)

    def _let_go(self, assembly: Assembly) -> None:
        if not assembly.receiving and assembly.done.done() and assembly.done.exception() is not None:
            self._registry.release(assembly.reservation)  # a no-op once released
            assembly.array = None

    async def wait(self, assembly: Assembly, stall: float) -> None:
        """Wait, as a part that has arrived in full, until the buffer is committed.

        Raises:
            PartsFailed: another part failed.
            RpcRefusal: the deadline passed, or no part sent anything for ``stall`` seconds (the upload is
                dropped then).
        """
        while not assembly.done.done():
            now = self._clock()
            if now >= assembly.deadline:
                self.fail(assembly, _overdue(assembly, "its parts did not all arrive by the deadline"))
                break
            if now - assembly.last_progress >= stall:
                self.fail(assembly, _overdue(assembly, f"no part sent anything for {stall:g} s"))
                break
            wake = min(assembly.deadline, assembly.last_progress + stall)
            await asyncio.wait([assembly.done], timeout=max(wake - now, 0))
        assembly.done.result()


def _overdue(assembly: Assembly, why: str) -> RpcRefusal:
    return RpcRefusal(
        "bad-request",
        f"the upload of buffer {assembly.buffer_id} in parts was dropped: {why} "
        f"({assembly.rows_done} of {assembly.shape[0]} rows had arrived)",
        buffer_id=assembly.buffer_id,
    )
