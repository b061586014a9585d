"""The proxy device: a connection to a pool, from which remote arrays are made."""

from __future__ import annotations

import asyncio
import getpass
import itertools
import logging
import socket
import threading
from collections import defaultdict
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np

from gpupool._config import Timeouts, coordinator_address
from gpupool._errors import ArrayFreed, ConnectError, DeadlineExceeded, UsageError
from gpupool._ids import new_buffer_id
from gpupool._proto.v1 import agent_pb2, agent_pb2_grpc, coordinator_pb2, coordinator_pb2_grpc
from gpupool._version import __version__
from gpupool.client._loop import LoopThread
from gpupool.client.channels import CHANNEL_OPTIONS, AgentChannel
from gpupool.client.types import AgentInfo, agent_info_from_record
from gpupool.protocol.codec import array_from_bytes, check_dtype, meta_of
from gpupool.protocol.errors import translate_rpc_error

if TYPE_CHECKING:
    from gpupool.client.array import RemoteArray

__all__ = ["FREE_DELAY", "Piece", "Pool", "connect"]

#: Seconds a garbage-collected array's buffers wait for a program to carry their free (else a Free call).
FREE_DELAY = 0.05

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Piece:
    """One shard of a remote array as the client tracks it: where it lives and its buffer."""

    agent_id: str
    endpoint: str
    worker: int
    start: int
    stop: int
    buffer_id: str

    @property
    def place(self) -> tuple[str, int]:
        """``(endpoint, worker)``: pieces with the same place can meet in one program."""
        return self.endpoint, self.worker

    def with_buffer(self, buffer_id: str) -> Piece:
        """The same rows and place, another buffer."""
        return Piece(self.agent_id, self.endpoint, self.worker, self.start, self.stop, buffer_id)


class Pool:
    """A connection to a gpupool coordinator, and the device remote arrays live on.

    Use :func:`connect` to make one; close it (or use it as a context manager) to free every buffer it made.

    Args:
        address: the coordinator's ``host:port``.
        timeouts: deadlines for every call.
        client: how the coordinator lists this session in ``gpupool jobs``.
    """

    def __init__(self, address: str, *, timeouts: Timeouts = Timeouts(), client: str | None = None) -> None:
        self.address = address
        self.timeouts = timeouts
        self._loop = LoopThread(f"gpupool[{address}].loop")
        self._channels: dict[str, AgentChannel] = {}
        self._serial = itertools.count(1)
        self._pending_free: dict[str, list[str]] = defaultdict(list)
        self._free_lock = threading.Lock()
        self._agent_of: dict[str, str] = {}
        self._flush_scheduled = False
        self._sync_stubs: dict[str, agent_pb2_grpc.AgentStub] = {}
        self._sync_channels: list[grpc.Channel] = []
        self._closed = False
        self._coordinator: coordinator_pb2_grpc.CoordinatorStub | None = None
        self._coordinator_channel: grpc.aio.Channel | None = None
        try:
            reply = self.run(
                self._connect(client or f"{getpass.getuser()}@{socket.gethostname()}"),
                timeout=timeouts.connect + 1,
                what="connect",
            )
        except DeadlineExceeded as exc:
            self._loop.stop()
            raise ConnectError(
                address,
                f"no coordinator answered within {timeouts.connect:.0f} s "
                "(is `gpupool up` or `gpupool coordinator` running there?)",
            ) from exc
        except BaseException:
            self._loop.stop()
            raise
        self.session: str = reply.session
        self.coordinator_version: str = reply.coordinator_version

    # -- plumbing ---------------------------------------------------------------------------------
    def run(self, awaitable: Awaitable[T], *, timeout: float, what: str) -> T:
        """Run a coroutine on the pool's loop (internal; used by remote arrays)."""

        async def wrapped() -> T:
            return await awaitable

        return self._loop.run(wrapped(), timeout=timeout, what=what)

    def channel(self, agent_id: str, endpoint: str) -> AgentChannel:
        """The channel to an agent (loop thread only)."""
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = self._channels[endpoint] = AgentChannel(agent_id, endpoint, self.timeouts)
        return channel

    def execute_now(
        self, place: Piece, ops: Sequence[agent_pb2.Op], *, fetch: Sequence[str], free: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Run one program from the calling thread, over a synchronous channel (see :meth:`channel`)."""
        self.check_open()
        stub = self._sync_stubs.get(place.endpoint)
        if stub is None:
            with self._free_lock:
                if place.endpoint not in self._sync_stubs:
                    channel = grpc.insecure_channel(place.endpoint, options=CHANNEL_OPTIONS)
                    self._sync_channels.append(channel)
                    self._sync_stubs[place.endpoint] = agent_pb2_grpc.AgentStub(channel)  # type: ignore[no-untyped-call]
                stub = self._sync_stubs[place.endpoint]
        request = agent_pb2.ExecuteRequest(
            worker=place.worker, ops=ops, fetch=fetch, free=free, session=self.session
        )
        try:
            reply = stub.Execute(request, timeout=self.timeouts.rpc)
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, peer=place.endpoint, agent_id=place.agent_id) from exc  # type: ignore[arg-type]
        return {item.buffer_id: array_from_bytes(item.data, item.meta) for item in reply.fetched}

    def new_buffer_id(self) -> str:
        """A buffer id unique to this session."""
        return new_buffer_id(self.session, next(self._serial))

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def check_open(self) -> None:
        """Raise :class:`ArrayFreed` once the pool is closed."""
        if self._closed:
            raise ArrayFreed("the pool this array belongs to is closed")

    async def _connect(self, client: str) -> coordinator_pb2.ConnectReply:
        self._coordinator_channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self._coordinator = coordinator_pb2_grpc.CoordinatorStub(  # type: ignore[no-untyped-call]
            self._coordinator_channel
        )
        request = coordinator_pb2.ConnectRequest(client=client, client_version=__version__)
        reply: coordinator_pb2.ConnectReply = await self._call_coordinator(
            "Connect", request, wait_for_ready=True
        )
        return reply

    async def _call_coordinator(self, method: str, request: Any, *, wait_for_ready: bool = False) -> Any:
        assert self._coordinator is not None
        try:
            return await getattr(self._coordinator, method)(
                request,
                timeout=self.timeouts.rpc if not wait_for_ready else self.timeouts.connect,
                wait_for_ready=wait_for_ready or None,
            )
        except grpc.aio.AioRpcError as exc:
            raise translate_rpc_error(exc, peer=self.address) from exc

    # -- the public API ---------------------------------------------------------------------------
    def agents(self, *, include_offline: bool = False) -> list[AgentInfo]:
        """The agents in the pool's registry (ready, cordoned and draining; offline ones on request)."""
        self.check_open()
        reply = self.run(
            self._call_coordinator(
                "ListAgents", coordinator_pb2.ListAgentsRequest(include_offline=include_offline)
            ),
            timeout=self.timeouts.rpc,
            what="list agents",
        )
        return [agent_info_from_record(record) for record in reply.agents]

    def asarray(self, data: object, dtype: object = None) -> RemoteArray:
        """Upload ``data`` (an array or nested sequence), its rows sharded over the ready agents.

        Raises:
            UnsupportedDType: a dtype gpupool does not carry (before anything is sent).
            UsageError: a 0-d array (shard along axis 0 needs one).
            NoCapacity, PlacementError: the pool cannot take it.
            DeviceOutOfMemory, RemoteError: an agent refused its shard (nothing is left behind).
        """
        from gpupool.client.array import RemoteArray

        self.check_open()
        if isinstance(data, RemoteArray):
            return data if dtype is None else data.astype(dtype)
        host = np.asarray(data, dtype=check_dtype(dtype)) if dtype is not None else np.asarray(data)
        check_dtype(host.dtype)
        if host.ndim == 0:
            raise UsageError("pool.asarray needs an array of at least one dimension (rows are sharded)")
        host = np.ascontiguousarray(host, dtype=host.dtype.newbyteorder("="))
        pieces = self.run(
            self._upload(host), timeout=self.timeouts.for_stream(host.nbytes) * 2, what="upload"
        )
        return RemoteArray(self, host.shape, host.dtype, pieces)

    def asarray_like(self, host: np.ndarray, like: RemoteArray) -> RemoteArray:
        """Upload ``host`` with the same rows on the same workers as ``like`` (so they meet in programs)."""
        from gpupool.client.array import RemoteArray

        self.check_open()
        host = np.ascontiguousarray(host)
        check_dtype(host.dtype)
        pieces = [p.with_buffer(self.new_buffer_id()) for p in like.layout]
        self.run(
            self.upload_pieces(host, pieces), timeout=self.timeouts.for_stream(host.nbytes) * 2, what="upload"
        )
        return RemoteArray(self, host.shape, host.dtype, pieces)

    async def _upload(self, host: np.ndarray) -> list[Piece]:
        request = coordinator_pb2.PlaceRequest(session=self.session, meta=meta_of(host.dtype, host.shape))
        reply = await self._call_coordinator("Place", request)
        pieces = [
            Piece(s.agent_id, s.endpoint, s.worker, s.start, s.stop, self.new_buffer_id())
            for s in sorted(reply.shards, key=lambda s: s.start)
        ]
        await self.upload_pieces(host, pieces)
        return pieces

    async def upload_pieces(self, host: np.ndarray, pieces: Sequence[Piece]) -> None:
        """Upload each piece's rows of ``host``; on any failure free what arrived and re-raise."""
        results = await asyncio.gather(
            *(
                self.channel(p.agent_id, p.endpoint).upload(
                    p.buffer_id, p.worker, host[p.start : p.stop], self.session
                )
                for p in pieces
            ),
            return_exceptions=True,
        )
        await self.raise_after_cleanup(results, [[p] for p in pieces])

    async def raise_after_cleanup(
        self, results: Sequence[object], created: Sequence[Sequence[Piece]]
    ) -> None:
        """If any result is an exception, free what the successful calls created and raise the first."""
        errors = [r for r in results if isinstance(r, BaseException)]
        if not errors:
            return
        leftovers = [
            p
            for r, made in zip(results, created, strict=True)
            if not isinstance(r, BaseException)
            for p in made
        ]
        await self.free_now(leftovers)
        raise errors[0]

    async def free_now(self, pieces: Iterable[Piece]) -> None:
        """Free buffers, grouped per agent; failures are logged, never raised (best effort)."""
        by_endpoint: dict[str, list[Piece]] = defaultdict(list)
        for piece in pieces:
            by_endpoint[piece.endpoint].append(piece)
        results = await asyncio.gather(
            *(
                self.channel(ps[0].agent_id, ep).free([p.buffer_id for p in ps])
                for ep, ps in by_endpoint.items()
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                log.warning("freeing buffers failed: %s", result)

    def release(self, pieces: Iterable[Piece]) -> None:
        """Free buffers soon, from any thread, without waiting (used when an array is garbage-collected).

        The ids ride along with the next program sent to their agent; what no program picks up within
        :data:`FREE_DELAY` seconds goes in one Free call per agent.
        """
        if self._closed:
            return
        with self._free_lock:
            for piece in pieces:
                self._pending_free[piece.endpoint].append(piece.buffer_id)
                self._agent_of[piece.endpoint] = piece.agent_id
            schedule = not self._flush_scheduled
            self._flush_scheduled = True
        if schedule:  # at most one wake-up of the loop per FREE_DELAY, however many arrays go
            self._loop.call_soon(lambda: self._loop.loop.call_later(FREE_DELAY, self._flush_frees))

    def take_pending_frees(self, endpoint: str) -> list[str]:
        """The buffer ids waiting to be freed on ``endpoint``, for a program to free on its way."""
        with self._free_lock:
            return self._pending_free.pop(endpoint, [])

    def _flush_frees(self) -> None:
        with self._free_lock:
            pending, self._pending_free = self._pending_free, defaultdict(list)
            self._flush_scheduled = False
        for endpoint, ids in pending.items():
            if ids:
                task = asyncio.ensure_future(self.channel(self._agent_of[endpoint], endpoint).free(ids))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def close(self) -> None:
        """Free every buffer this session made, end the session, and stop the loop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.run(self._close(), timeout=self.timeouts.rpc, what="close")
        except Exception as exc:  # closing must not raise over a dead agent or coordinator
            log.warning("closing the pool: %s", exc)
        finally:
            self._loop.stop()
            for channel in self._sync_channels:
                channel.close()

    async def _close(self) -> None:
        self._flush_frees()
        channels = list(self._channels.values())
        await asyncio.gather(*(c.free(session=self.session) for c in channels), return_exceptions=True)
        try:
            await self._call_coordinator(
                "Disconnect", coordinator_pb2.DisconnectRequest(session=self.session)
            )
        except Exception as exc:
            log.warning("disconnect: %s", exc)
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
        if self._coordinator_channel is not None:
            await self._coordinator_channel.close(grace=None)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        closed = " closed" if self._closed else ""
        return f"<gpupool.Pool {self.address} session={getattr(self, 'session', '?')}{closed}>"


def connect(address: str | None = None, *, timeouts: Timeouts | None = None) -> Pool:
    """Connect to a pool's coordinator.

    Args:
        address: ``host:port``; default ``$GPUPOOL_COORDINATOR``, else ``127.0.0.1:50051``.
        timeouts: deadlines for every call (defaults: :class:`gpupool.Timeouts`).

    Raises:
        ConnectError, DeadlineExceeded: no coordinator answered within the connect deadline.
    """
    return Pool(coordinator_address(address), timeouts=timeouts or Timeouts())
