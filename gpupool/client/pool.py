"""The proxy device: a connection to a pool, from which remote arrays are made."""

from __future__ import annotations

import asyncio
import getpass
import itertools
import logging
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np

from gpupool._config import Timeouts
from gpupool._errors import AgentLost, ArrayFreed, ConnectError, DeadlineExceeded, GpupoolError, UsageError
from gpupool._ids import new_buffer_id
from gpupool._proto.v1 import agent_pb2, agent_pb2_grpc, coordinator_pb2
from gpupool._version import __version__
from gpupool.client._loop import LoopThread
from gpupool.client.channels import AgentChannel, Metadata, fetched_arrays
from gpupool.client.types import AgentInfo, agent_info_from_record
from gpupool.protocol.codec import check_dtype, meta_of
from gpupool.protocol.errors import translate_rpc_error
from gpupool.security.pki import agent_dns_name
from gpupool.transport.coordinator import CoordinatorClient, PoolCredentials
from gpupool.transport.rpc import CAPABILITY_KEY, sync_channel

if TYPE_CHECKING:
    from gpupool.client.array import RemoteArray

__all__ = ["FREE_DELAY", "Piece", "Pool", "connect"]

#: Seconds a garbage-collected array's buffers wait for a program to carry their free (else a Free call).
FREE_DELAY = 0.05
#: Seconds between the client's looks at which agents the coordinator shows offline (a Renew call).
WATCH_INTERVAL = 1.0

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
        credentials: the coordinator's address, this user's token, and the pool CA if the coordinator
            serves TLS.
        timeouts: deadlines for every call.
        client: how the coordinator lists this session in ``gpupool jobs``.
    """

    def __init__(
        self, credentials: PoolCredentials, *, timeouts: Timeouts = Timeouts(), client: str | None = None
    ) -> None:
        self.address = credentials.address
        self.timeouts = timeouts
        self._rpc = CoordinatorClient(credentials, timeout=timeouts.rpc)
        self._capabilities: dict[str, tuple[str, float]] = {}
        self._agent_ca: bytes | None = None
        self.lease = 0.0
        self.offline_agents: frozenset[str] = frozenset()
        self._loop = LoopThread(f"gpupool[{self.address}].loop")
        self._channels: dict[str, AgentChannel] = {}
        self._serial = itertools.count(1)
        self._pending_free: dict[str, list[str]] = defaultdict(list)
        self._free_lock = threading.Lock()
        self._agent_of: dict[str, str] = {}
        self._flush_scheduled = False
        self._sync_stubs: dict[str, agent_pb2_grpc.AgentStub] = {}
        self._sync_channels: list[grpc.Channel] = []
        self._closed = False
        try:
            reply = self.run(
                self._connect(client or f"{getpass.getuser()}@{socket.gethostname()}"),
                timeout=timeouts.connect + 1,
                what="connect",
            )
        except DeadlineExceeded as exc:
            self._loop.stop()
            raise ConnectError(
                self.address,
                f"no coordinator answered within {timeouts.connect:.0f} s "
                "(is `gpupool up` or `gpupool coordinator` running there?)",
            ) from exc
        except BaseException:
            self._loop.stop()
            raise
        self.session: str = reply.session
        self.coordinator_version: str = reply.coordinator_version
        self._agent_ca = reply.ca_certificate.encode() or None
        self.lease = reply.lease_seconds
        if self.lease > 0:
            self._loop.call_soon(self._start_heartbeat)

    # -- plumbing ---------------------------------------------------------------------------------
    def run(self, awaitable: Awaitable[T], *, timeout: float, what: str) -> T:
        """Run a coroutine on the pool's loop (internal; used by remote arrays)."""

        async def wrapped() -> T:
            return await awaitable

        return self._loop.run(wrapped(), timeout=timeout, what=what)

    def channel(self, agent_id: str, endpoint: str) -> AgentChannel:
        """The channel to an agent (loop thread only); TLS, checked against the agent's id, if enrolled."""
        channel = self._channels.get(endpoint)
        if channel is None or channel.agent_id != agent_id:
            channel = self._channels[endpoint] = AgentChannel(
                agent_id,
                endpoint,
                self.timeouts,
                ca_pem=self._agent_ca if agent_id in self._capabilities else None,
                metadata=lambda: self.capability_metadata(agent_id),
            )
        return channel

    def capability_metadata(self, agent_id: str) -> Metadata:
        """The metadata that carries this session's capability on ``agent_id`` (none for an open agent)."""
        held = self._capabilities.get(agent_id)
        return ((CAPABILITY_KEY, held[0]),) if held is not None else ()

    def _keep_capabilities(self, shards: Iterable[coordinator_pb2.ShardPlacement]) -> None:
        for shard in shards:
            if shard.HasField("capability") and shard.capability.token:
                self._capabilities[shard.agent_id] = (shard.capability.token, shard.capability.expires)

    def _start_heartbeat(self) -> None:
        task = asyncio.ensure_future(self._heartbeat())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _heartbeat(self) -> None:
        """Renew the session's lease, learn which agents went offline (abandoning calls waiting on them),
        and renew capabilities before they are half spent.

        Every :data:`WATCH_INTERVAL` seconds (at most a third of the lease): the coordinator's view of
        dead agents reaches a waiting call within about that.
        """
        interval = max(0.1, min(WATCH_INTERVAL, self.lease / 3))
        while not self._closed:
            await asyncio.sleep(interval)
            try:
                reply = await self._rpc.acall(
                    "Renew",
                    coordinator_pb2.RenewRequest(session=self.session),
                    timeout=max(1.0, self.lease / 3),
                )
                self._note_offline(frozenset(reply.offline_agents))
                now = time.time()
                stale = [a for a, (_, expires) in self._capabilities.items() if expires - now < 300]
                if stale:
                    granted = await self._rpc.acall(
                        "Grant",
                        coordinator_pb2.GrantRequest(session=self.session, agent_ids=stale),
                        wait_for_ready=True,
                    )
                    self._keep_capabilities_granted(granted.capabilities)
            except GpupoolError as exc:  # a restarting coordinator: the next beat tries again
                log.warning("session %s: heartbeat: %s", self.session, exc)

    def _note_offline(self, offline: frozenset[str]) -> None:
        self.offline_agents = offline
        for channel in self._channels.values():
            lost = channel.agent_id in offline
            if lost and not channel.lost:
                log.warning("agent %s is offline: abandoning calls waiting on it", channel.agent_id)
                channel.mark_lost()
            elif not lost:
                channel.lost = False  # back (a resumed rig): its buffers may be too

    async def grant(self, agent_ids: Sequence[str]) -> None:
        """Get this session's capabilities on ``agent_ids`` from the coordinator (loop thread only).

        Raises:
            PlacementError: an agent that is not an enrolled agent of the pool.
        """
        reply = await self._call_coordinator(
            "Grant", coordinator_pb2.GrantRequest(session=self.session, agent_ids=list(agent_ids))
        )
        self._keep_capabilities_granted(reply.capabilities)

    def _keep_capabilities_granted(self, capabilities: Iterable[coordinator_pb2.Capability]) -> None:
        for capability in capabilities:
            self._capabilities[capability.agent_id] = (capability.token, capability.expires)

    def execute_now(
        self,
        place: Piece,
        ops: Sequence[agent_pb2.Op],
        *,
        fetch: Sequence[str],
        free: Sequence[str],
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one program from the calling thread, over a synchronous channel (see :meth:`channel`)."""
        self.check_open()
        stub = self._sync_stubs.get(place.endpoint)
        if stub is None:
            with self._free_lock:
                if place.endpoint not in self._sync_stubs:
                    tls = place.agent_id in self._capabilities
                    channel = sync_channel(
                        place.endpoint,
                        ca_pem=self._agent_ca if tls else None,
                        server_name=agent_dns_name(place.agent_id) if tls else "",
                    )
                    self._sync_channels.append(channel)
                    self._sync_stubs[place.endpoint] = agent_pb2_grpc.AgentStub(channel)  # type: ignore[no-untyped-call]
                stub = self._sync_stubs[place.endpoint]
        request = agent_pb2.ExecuteRequest(
            worker=place.worker, ops=ops, fetch=fetch, free=free, session=self.session
        )
        if place.agent_id in self.offline_agents:
            raise AgentLost(place.agent_id, (place.start, place.stop))
        call = stub.Execute.future(
            request, timeout=timeout or self.timeouts.rpc, metadata=self.capability_metadata(place.agent_id)
        )
        try:
            # Wait in slices, so that an agent the coordinator shows offline is not waited on to the end.
            while True:
                try:
                    reply = call.result(timeout=WATCH_INTERVAL)
                    break
                except grpc.FutureTimeoutError:
                    if place.agent_id in self.offline_agents:
                        call.cancel()
                        raise AgentLost(place.agent_id, (place.start, place.stop)) from None
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, peer=place.endpoint, agent_id=place.agent_id) from exc
        return fetched_arrays(reply, peer=place.endpoint)

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
        request = coordinator_pb2.ConnectRequest(client=client, client_version=__version__)
        # No wait_for_ready: a refused port fails at once, with a clear message, not after the deadline.
        reply: coordinator_pb2.ConnectReply = await self._rpc.acall(
            "Connect", request, timeout=self.timeouts.connect
        )
        return reply

    async def _call_coordinator(self, method: str, request: Any) -> Any:
        # Once connected, a coordinator that is restarting is waited for (up to the call's deadline):
        # the session and its capabilities outlive the restart, so the user sees nothing of it.
        return await self._rpc.acall(method, request, wait_for_ready=True)

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
        self._keep_capabilities(reply.shards)
        pieces = [
            Piece(s.agent_id, s.endpoint, s.worker, s.start, s.stop, self.new_buffer_id())
            for s in sorted(reply.shards, key=lambda s: s.start)
        ]
        await self.upload_pieces(host, pieces)
        return pieces

    async def upload_pieces(self, host: np.ndarray, pieces: Sequence[Piece]) -> None:
        """Upload each piece's rows of ``host``; on any failure free what arrived and re-raise."""
        results: list[object] = await asyncio.gather(
            *(
                self.channel(p.agent_id, p.endpoint).upload(
                    p.buffer_id, p.worker, host[p.start : p.stop], self.session
                )
                for p in pieces
            ),
            return_exceptions=True,
        )
        results = [
            r.with_rows(p.start, p.stop) if isinstance(r, AgentLost) else r
            for r, p in zip(results, pieces, strict=True)
        ]
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
            # Not waited for if unreachable: an ended lease frees the session's buffers anyway.
            await self._rpc.acall("Disconnect", coordinator_pb2.DisconnectRequest(session=self.session))
        except Exception as exc:
            log.warning("disconnect: %s", exc)
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
        await self._rpc.aclose()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        closed = " closed" if self._closed else ""
        return f"<gpupool.Pool {self.address} session={getattr(self, 'session', '?')}{closed}>"


def connect(
    address: str | None = None,
    *,
    token: str | None = None,
    ca: str | bytes | None = None,
    timeouts: Timeouts | None = None,
    client: str | None = None,
) -> Pool:
    """Connect to a pool's coordinator.

    Args:
        address: ``host:port``; default ``$GPUPOOL_COORDINATOR``, else ``127.0.0.1:50051``.
        token: a client token; default ``$GPUPOOL_TOKEN`` (``gpupool up`` writes one to
            ``<state-dir>/client.env``).
        ca: the pool CA (a PEM file's path, or its bytes) for a coordinator that serves TLS; default
            ``$GPUPOOL_CA``.
        timeouts: deadlines for every call (defaults: :class:`gpupool.Timeouts`).
        client: how ``gpupool jobs`` lists this session (default ``user@host``).

    Raises:
        ConnectError: nothing listens at the address (at once), or no coordinator answered in time.
        AuthError: the coordinator refused the token (missing, unknown, revoked, expired).
    """
    credentials = PoolCredentials.from_env(address, token=token, ca=ca)
    return Pool(credentials, timeouts=timeouts or Timeouts(), client=client)
