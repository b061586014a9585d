"""``Pull``: an agent makes a new buffer of a session from row ranges of the session's buffers, its own or
other agents' (read peer to peer through :class:`~gpupool.agent.peers.Peers`), concatenated or summed.

The client plans the pull and names the sources; their bytes go from agent to agent. What a pull may read
and where it may dial is decided in :meth:`Peers.resolve` (see :mod:`gpupool.agent.peers`); here the
request is checked, memory reserved, the pieces read concurrently, combined and committed, all or nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, Final

import numpy as np

from gpupool._errors import UnsupportedDType
from gpupool._proto.v1 import agent_pb2
from gpupool.agent.buffers import BufferRegistry
from gpupool.agent.peers import Peer, Peers
from gpupool.agent.procworker import AnyWorker, ProcessWorker, RemoteArray
from gpupool.agent.status import Counters
from gpupool.protocol.codec import check_dtype, shape_of
from gpupool.protocol.errors import RpcRefusal

__all__ = ["MAX_PULL_SOURCES", "Puller"]

#: Most sources one Pull may name.
MAX_PULL_SOURCES: Final = 4096

_COMBINES: Final = ("", "concatenate", "sum")


class Puller:
    """Runs ``Pull`` requests (already confined to their session by the guard, where there is one).

    Args:
        workers: the agent's workers, by index.
        registry: the resident buffers.
        peers: checks remote sources and reads them.
        counters: work counters (bytes received are added here).
        accepting: whether new buffers are taken now (False while draining).
    """

    def __init__(
        self,
        *,
        workers: Sequence[AnyWorker],
        registry: BufferRegistry,
        peers: Peers,
        counters: Counters,
        accepting: Callable[[], bool],
    ) -> None:
        self._workers = tuple(workers)
        self._registry = registry
        self._peers = peers
        self._counters = counters
        self._accepting = accepting

    async def pull(self, request: agent_pb2.PullRequest) -> agent_pb2.PullReply:
        """Make ``request.output`` from its sources; nothing is kept if any source fails.

        Raises:
            RpcRefusal: a malformed request, a source refused (see :meth:`Peers.resolve`), a source
                unreachable (peer-unavailable, naming it), pieces that do not combine into the expected
                array (bad-request), no memory (out-of-memory), a draining agent (not-accepting).
        """
        worker, dtype, shape, nbytes = self._check(request)
        peers = [
            None if self._is_local(source) else self._peers.resolve(source, request.session)
            for source in request.sources
        ]
        reservation = self._registry.reserve(
            worker=worker.index, buffer_id=request.output, nbytes=nbytes, session=request.session
        )
        try:
            target: RemoteArray | None = None
            if _direct(request, shape):
                if isinstance(worker, ProcessWorker) and worker.shares(nbytes):
                    target = await worker.allocate(
                        dtype, shape, request.output
                    )  # mapped here: filled in place
                host = (
                    target.host if target is not None and target.host is not None else np.empty(shape, dtype)
                )
                pieces = await self._read_all(request, peers, dtype, nbytes, into=host)
            else:
                pieces = await self._read_all(request, peers, dtype, nbytes)
                host = _combine(request, pieces, dtype, shape)
            pulled = sum(piece.nbytes for piece, peer in zip(pieces, peers, strict=True) if peer is not None)
            del pieces
            array: Any = host
            if target is not None and target.host is not None:
                array = target
            elif not worker.host_resident:
                array = await worker.to_device(host, request.output)
            self._registry.commit(reservation, array)
        finally:
            self._registry.release(reservation)  # a no-op once committed
        self._counters.bytes_received += pulled
        return agent_pb2.PullReply(buffer_id=request.output, nbytes=nbytes, bytes_pulled=pulled)

    def _is_local(self, source: agent_pb2.PullSource) -> bool:
        return source.agent_id == self._peers.agent_id

    def _check(self, request: agent_pb2.PullRequest) -> tuple[AnyWorker, np.dtype[Any], tuple[int, ...], int]:
        if not request.output:
            raise RpcRefusal("bad-request", "the pull names no output buffer")
        if not 0 < len(request.sources) <= MAX_PULL_SOURCES:
            raise RpcRefusal(
                "bad-request", f"a pull takes 1 to {MAX_PULL_SOURCES} sources, not {len(request.sources)}"
            )
        if request.combine not in _COMBINES:
            raise RpcRefusal("bad-request", f"unknown combine {request.combine[:32]!r}: concatenate or sum")
        try:
            dtype = check_dtype(request.expect.dtype)
        except UnsupportedDType as exc:
            raise RpcRefusal("bad-request", str(exc), buffer_id=request.output) from exc
        shape = shape_of(request.expect)
        if any(n < 0 for n in shape):
            raise RpcRefusal("bad-request", f"negative dimension in shape {list(shape)}")
        for source in request.sources:
            if not 0 <= source.start <= source.stop:
                raise RpcRefusal("bad-request", f"rows [{source.start}, {source.stop}) of a pull source")
        self._registry.check_worker(request.worker)
        if not self._accepting():
            raise RpcRefusal("not-accepting", "this agent is draining: it takes no new buffers")
        return self._workers[request.worker], dtype, shape, math.prod(shape) * dtype.itemsize

    async def _read_all(
        self,
        request: agent_pb2.PullRequest,
        peers: Sequence[Peer | None],
        dtype: np.dtype[Any],
        nbytes: int,
        *,
        into: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """Every source's rows as a host array, read concurrently; the first failure cancels the rest.

        With ``into`` (a concatenation along axis 0 with no reshape: see :func:`_direct`), each source's
        rows are written straight into their rows of it, and the pieces returned are those views.
        """
        pieces: list[np.ndarray] = [np.empty(0, dtype)] * len(peers)
        shape = shape_of(request.expect)
        offsets = itertools.accumulate((_rows(s, shape) for s in request.sources), initial=0)

        async def read(index: int, source: agent_pb2.PullSource, peer: Peer | None, first: int) -> None:
            rows = _rows(source, shape)
            region = None if into is None else into[first : first + rows]
            if peer is None:
                pieces[index] = await self._read_local(source, dtype, region)
            else:
                pieces[index] = await self._peers.fetch(
                    peer,
                    source.buffer_id,
                    source.start,
                    source.stop,
                    dtype,
                    max_bytes=nbytes,
                    into=region,
                    whole=source.whole,
                )

        try:
            async with asyncio.TaskGroup() as group:
                for index, (source, peer, first) in enumerate(
                    zip(request.sources, peers, offsets, strict=False)
                ):
                    group.create_task(read(index, source, peer, first))
        except BaseExceptionGroup as failed:
            refusal = _first_refusal(failed)
            if refusal is None:
                raise
            raise refusal from None
        return pieces

    async def _read_local(
        self, source: agent_pb2.PullSource, dtype: np.dtype[Any], into: np.ndarray | None
    ) -> np.ndarray:
        buffer = self._registry.get(source.buffer_id)
        if buffer.dtype != dtype:
            raise RpcRefusal(
                "bad-request",
                f"buffer {source.buffer_id} is {buffer.dtype.name}, not the pull's {dtype.name}",
                buffer_id=source.buffer_id,
            )
        if not source.whole and (not buffer.shape or source.stop > buffer.shape[0]):
            raise RpcRefusal(
                "bad-request",
                f"rows [{source.start}, {source.stop}) are not rows of buffer {source.buffer_id} "
                f"of shape {list(buffer.shape)}",
                buffer_id=source.buffer_id,
            )
        worker = self._workers[buffer.worker]
        shared = (
            await worker.host_view(buffer.array, source.buffer_id)
            if isinstance(worker, ProcessWorker)
            else None
        )
        span = slice(None) if source.whole else slice(source.start, source.stop)
        if shared is not None:
            rows: np.ndarray = shared[span]
        elif worker.host_resident:
            rows = buffer.array[span]
        else:
            rows = await worker.to_host(
                buffer.array, source.buffer_id, None if source.whole else (source.start, source.stop)
            )
        if into is None:
            return rows
        if rows.size != into.size:
            raise RpcRefusal(
                "bad-request",
                f"rows of buffer {source.buffer_id} are {list(rows.shape[1:])}, not of "
                f"{into.size // max(1, len(rows))} elements as the pull expects",
                buffer_id=source.buffer_id,
            )
        into.reshape(-1)[:] = rows.reshape(-1)
        return into


def _first_refusal(group: BaseExceptionGroup[Any]) -> RpcRefusal | None:
    for exc in group.exceptions:
        if isinstance(exc, RpcRefusal):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_refusal(exc)
            if found is not None:
                return found
    return None


def _rows(source: agent_pb2.PullSource, shape: tuple[int, ...]) -> int:
    """How many rows of the result a source fills: its range's, or for a whole buffer the result's rows (a
    whole source goes straight into the result only when it is the only one: see :func:`_direct`)."""
    if source.whole:
        return shape[0] if shape else 0
    return source.stop - source.start


def _direct(request: agent_pb2.PullRequest, shape: tuple[int, ...]) -> bool:
    """Whether the pieces go straight into their rows of the result: a concatenation along axis 0 whose
    pieces' rows add up to the result's (so each row has the result's row of elements, whatever its shape),
    or a whole buffer that is the only source (copied as it is, then given the result's shape)."""
    if request.combine == "sum" or not shape:
        return False
    if any(source.whole for source in request.sources):
        return len(request.sources) == 1
    if request.axis != 0 and len(request.sources) > 1:
        return False
    return sum(source.stop - source.start for source in request.sources) == shape[0]


def _combine(
    request: agent_pb2.PullRequest, pieces: list[np.ndarray], dtype: np.dtype[Any], shape: tuple[int, ...]
) -> np.ndarray:
    """The pieces concatenated (then reshaped) or summed into an array of ``dtype`` and ``shape``.

    Raises:
        RpcRefusal: bad-request, where they do not make that array.
    """
    if request.combine == "sum":
        if any(piece.shape != shape for piece in pieces):
            found = sorted({str(list(piece.shape)) for piece in pieces})
            raise RpcRefusal("bad-request", f"a sum of pieces shaped {', '.join(found)}, not {list(shape)}")
        total = np.array(pieces[0], dtype=dtype, copy=True)
        for piece in pieces[1:]:
            np.add(total, piece, out=total)
        return total
    try:
        # One piece: copied all the same where it views a local buffer (the new buffer must not alias it).
        joined = np.concatenate(pieces, axis=request.axis) if len(pieces) > 1 else pieces[0]
        if not joined.flags.owndata:
            joined = joined.copy()
    except (ValueError, np.exceptions.AxisError) as exc:
        raise RpcRefusal(
            "bad-request", f"the pieces do not concatenate along axis {request.axis}: {exc}"
        ) from None
    if joined.size != math.prod(shape):
        raise RpcRefusal(
            "bad-request", f"the pieces make {list(joined.shape)}, which does not reshape to {list(shape)}"
        )
    return np.asarray(joined.reshape(shape), dtype=dtype, order="C")  # ascontiguousarray: 0-d made 1-d
