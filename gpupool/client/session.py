"""The plumbing under a :class:`~gpupool.client.pool.Pool`: one coordinator session and what it talks over.

A :class:`Session` owns the private event loop (:class:`~gpupool.client._loop.LoopThread`), the coordinator
client, this session's capabilities, lease and view of offline agents (a
:class:`~gpupool.client.lease.LeaseKeeper`), the channels to agents, and the operations every remote array
is built from: upload, execute, free. It knows nothing of arrays: callers hand it host data and
:class:`~gpupool.client.layout.Piece`\\ s.
"""

from __future__ import annotations

import asyncio
import getpass
import itertools
import logging
import socket
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Awaitable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from gpupool._config import Streams, Timeouts
from gpupool._errors import (
    AgentLost,
    AgentNotAccepting,
    ArrayFreed,
    BufferMoved,
    ConnectError,
    DeadlineExceeded,
    GpupoolError,
    NoCapacity,
    PlacementError,
    UsageError,
)
from gpupool._ids import new_buffer_id
from gpupool._proto.v1 import agent_pb2, agent_pb2_grpc, control_pb2, coordinator_pb2
from gpupool._version import __version__
from gpupool.client._loop import LoopThread
from gpupool.client.channels import AgentChannel, Metadata, fetched_arrays
from gpupool.client.layout import Piece, by_endpoint, pieces_from_placement, round_robin
from gpupool.client.lease import WATCH_INTERVAL, LeaseKeeper, TransferMeter
from gpupool.client.lineage import Book, Keep
from gpupool.client.losses import MAX_RECOVERIES, Recovery, Verification, loss_of
from gpupool.client.progress import DELAY, Tracker, Unit, progress_default
from gpupool.moves import Segment
from gpupool.protocol.codec import meta_of
from gpupool.protocol.errors import translate_rpc_error
from gpupool.security.pki import agent_dns_name
from gpupool.transport.coordinator import CoordinatorClient, PoolCredentials
from gpupool.transport.rpc import CAPABILITY_KEY, sync_channel

__all__ = ["FREE_DELAY", "Session"]

#: Moved buffers one Free follows at most (each costs a call to the agent that moved it).
MAX_FOLLOWS = 64

#: Seconds a garbage-collected array's buffers wait for a program to carry their free (else a Free call).
FREE_DELAY = 0.05

log = logging.getLogger(__name__)
T = TypeVar("T")


class Session:
    """A session with a pool's coordinator, and the channels to its agents.

    Connects on construction; :meth:`close` frees every buffer the session made and ends it. Blocking
    methods may be called from any thread but the loop's own; the ``async`` ones and :meth:`channel` run
    on the loop only (through :meth:`run`).

    Args:
        credentials: the coordinator's address, this user's token, and the pool CA if the coordinator
            serves TLS.
        timeouts: deadlines for every call.
        client: how the coordinator lists this session in ``gpupool jobs``.
        keep_uploads: what the client keeps of uploaded rows, so that shards lost with an agent can be
            rebuilt (:data:`gpupool.client.lineage.KEEP_MODES`): "host" a copy, "none" nothing.
        twins: run a speculative twin of a straggling shard's program on another worker.
        verify: the fraction of programs re-run on a second agent and compared.

    Raises:
        ConnectError: nothing listens at the address (at once), or no coordinator answered in time.
        AuthError: the coordinator refused the token.
    """

    def __init__(
        self,
        credentials: PoolCredentials,
        *,
        timeouts: Timeouts = Timeouts(),
        client: str | None = None,
        progress: bool | None = None,
        keep_uploads: Keep = "host",
        twins: bool = True,
        verify: float = 0.0,
    ) -> None:
        if not 0.0 <= verify <= 1.0:
            raise UsageError(f"verify is the fraction of programs to check, from 0 to 1, not {verify!r}")
        self.address = credentials.address
        #: Which programs are re-run on a second agent, and what that found (:mod:`gpupool.client.verify`).
        self.verification = Verification(rate=verify)
        #: Whether a shard's program far behind its siblings' gets a twin elsewhere
        #: (:mod:`gpupool.client.stragglers`).
        self.twins = twins
        #: How each kept buffer was made, and where it is (:mod:`gpupool.client.lineage`).
        self.book = Book(keep_uploads)
        #: Lost places and where they went (:mod:`gpupool.client.recovery`).
        self.recovery = Recovery()
        #: What holds pieces and must follow them when their place moves (remote arrays, held operands):
        #: objects with ``relocate(old_place, to_piece)`` and ``holding(buffer_id) -> str`` (a name or ""),
        #: weakly, by id (arrays are unhashable, as NumPy's).
        self._holders: dict[int, weakref.ref[Any]] = {}
        self.timeouts = timeouts
        self.streams = Streams.from_environment()  # how shards' bytes travel (GPUPOOL_STREAMS)
        #: Whether long calls show a progress bar (None when made: in an interactive terminal).
        self.progress = progress_default() if progress is None else progress
        #: Seconds a call runs before its bar appears.
        self.progress_delay = DELAY
        self._byte_trackers: list[Tracker] = []
        self._rpc = CoordinatorClient(credentials, timeout=timeouts.rpc)
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
        self.id: str = reply.session
        self.coordinator_version: str = reply.coordinator_version
        self.lease: float = reply.lease_seconds
        self._agent_ca: bytes | None = reply.ca_certificate.encode() or None
        #: What the session's uploads and downloads measured per agent, reported at each heartbeat.
        self.meter = TransferMeter()
        self._keeper = LeaseKeeper(
            self._rpc,
            session=self.id,
            lease=self.lease,
            on_offline=self._note_offline,
            observed=self.meter.drain,
        )
        self._loop.call_soon(self._start_heartbeat)

    async def _connect(self, client: str) -> coordinator_pb2.ConnectReply:
        request = coordinator_pb2.ConnectRequest(client=client, client_version=__version__)
        # No wait_for_ready: a refused port fails at once, with a clear message, not after the deadline.
        reply: coordinator_pb2.ConnectReply = await self._rpc.acall(
            "Connect", request, timeout=self.timeouts.connect
        )
        return reply

    def add_holder(self, holder: Any) -> None:
        """Have ``holder`` told when a place it holds pieces on moves (see ``_holders``)."""
        key = id(holder)
        holders = self._holders

        def gone(ref: weakref.ref[Any]) -> None:
            if holders.get(key) is ref:  # not a newer holder that took the same id
                del holders[key]

        holders[key] = weakref.ref(holder, gone)

    def holders(self) -> list[Any]:
        """The live holders of pieces."""
        return [h for h in (r() for r in list(self._holders.values())) if h is not None]

    async def call_coordinator(self, method: str, request: Any) -> Any:
        """Call the coordinator (loop thread only), waiting for one that is restarting."""
        return await self._call_coordinator(method, request)

    def keep_placed(self, shards: Iterable[coordinator_pb2.ShardPlacement]) -> None:
        """Keep the capabilities a placement carries."""
        self._keeper.keep_placed(shards)

    async def _call_coordinator(self, method: str, request: Any) -> Any:
        # Once connected, a coordinator that is restarting is waited for (up to the call's deadline):
        # the session and its capabilities outlive the restart, so the user sees nothing of it.
        return await self._rpc.acall(method, request, wait_for_ready=True)

    def _start_heartbeat(self) -> None:
        task = asyncio.ensure_future(self._keeper.run())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # -- the loop and the channels ----------------------------------------------------------------
    def run(self, awaitable: Awaitable[T], *, timeout: float, what: str) -> T:
        """Run a coroutine on the session's loop and wait for its result (see :meth:`LoopThread.run`)."""

        async def wrapped() -> T:
            return await awaitable

        return self._loop.run(wrapped(), timeout=timeout, what=what)

    def spawn(self, coroutine: Coroutine[Any, Any, object]) -> None:
        """Start ``coroutine`` on the session's loop and return at once (its failures are its own to report).

        Raises:
            UsageError: the session is closed.
        """
        self.check_open()
        asyncio.run_coroutine_threadsafe(coroutine, self._loop.loop)

    def track(self, what: str, *, total: int | None = None, unit: Unit = "steps") -> Tracker:
        """A progress tracker for one blocking call of this session (a bar only if :attr:`progress`); one
        counting bytes is told of every chunk the session's channels move while it is open."""
        tracker = Tracker(what, total=total, unit=unit, enabled=self.progress, delay=self.progress_delay)
        if unit == "bytes" and self.progress:
            self._byte_trackers = [t for t in self._byte_trackers if not t.closed] + [tracker]
        return tracker

    def _count_bytes(self, amount: int) -> None:
        for tracker in self._byte_trackers:
            if not tracker.closed:
                tracker.advance(amount)

    @property
    def agents_in_use(self) -> list[str]:
        """The ids of the agents this session has opened channels to (for reprs; no call is made)."""
        return sorted({channel.agent_id for channel in list(self._channels.values())})

    def channel(self, agent_id: str, endpoint: str) -> AgentChannel:
        """The channel to an agent (loop thread only); TLS, checked against the agent's id, if enrolled."""
        channel = self._channels.get(endpoint)
        if channel is None or channel.agent_id != agent_id:
            channel = self._channels[endpoint] = AgentChannel(
                agent_id,
                endpoint,
                self.timeouts,
                ca_pem=self._agent_ca if self._keeper.holds(agent_id) else None,
                metadata=lambda: self.capability_metadata(agent_id),
                streams=self.streams,
                on_bytes=self._count_bytes,
            )
        return channel

    def new_buffer_id(self) -> str:
        """A buffer id unique to this session."""
        return new_buffer_id(self.id, next(self._serial))

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def check_open(self) -> None:
        """Raise :class:`ArrayFreed` once the session is closed."""
        if self._closed:
            raise ArrayFreed("the pool this array belongs to is closed")

    # -- capabilities and offline agents ---------------------------------------------------------
    @property
    def offline_agents(self) -> frozenset[str]:
        """The agents the coordinator showed offline at the last heartbeat."""
        return self._keeper.offline_agents

    def capability_metadata(self, agent_id: str) -> Metadata:
        """The metadata that carries this session's capability on ``agent_id`` (none for an open agent)."""
        return self._keeper.metadata(agent_id)

    async def grant(self, agent_ids: Sequence[str]) -> None:
        """Get this session's capabilities on ``agent_ids`` from the coordinator (loop thread only).

        Raises:
            PlacementError: an agent that is not an enrolled agent of the pool.
        """
        await self._keeper.grant(agent_ids)

    def _note_offline(self, offline: frozenset[str]) -> None:
        for channel in self._channels.values():
            lost = channel.agent_id in offline
            if lost and not channel.lost:
                log.warning("agent %s is offline: abandoning calls waiting on it", channel.agent_id)
                channel.mark_lost()
            elif not lost:
                channel.lost = False  # back (a resumed rig): its buffers may be too

    # -- the coordinator --------------------------------------------------------------------------
    def list_agents(self, *, include_offline: bool = False) -> list[coordinator_pb2.AgentRecord]:
        """The coordinator's registry records (ready, cordoned and draining; offline ones on request)."""
        self.check_open()
        reply = self.run(
            self._call_coordinator(
                "ListAgents", coordinator_pb2.ListAgentsRequest(include_offline=include_offline)
            ),
            timeout=self.timeouts.rpc,
            what="list agents",
        )
        return list(reply.agents)

    def capability_token(self, agent_id: str) -> str:
        """This session's capability on ``agent_id`` ("" for an open agent), for another agent to show it."""
        return dict(self.capability_metadata(agent_id)).get(CAPABILITY_KEY, "")

    def plan_moves(
        self, shape: tuple[int, ...], dtype: np.dtype[Any], sources: Sequence[Piece]
    ) -> tuple[list[Piece], list[Segment]]:
        """A new placement of a resident array's rows from the coordinator (``PlanMoves``), and where each
        target row comes from: the target pieces in row order, each with a new buffer id, and the segments.

        Raises:
            NoCapacity, PlacementError: the pool cannot take it.
        """
        self.check_open()
        request = coordinator_pb2.PlanMovesRequest(
            session=self.id,
            meta=meta_of(dtype, shape),
            sources=[
                coordinator_pb2.MoveSource(agent_id=p.agent_id, worker=p.worker, start=p.start, stop=p.stop)
                for p in sources
            ],
        )
        reply = self.run(
            self._call_coordinator("PlanMoves", request), timeout=self.timeouts.rpc * 2, what="plan moves"
        )
        self._keeper.keep_placed(reply.targets)
        # In row order already (the segments number them so); the sort in pieces_from_placement is stable.
        targets = pieces_from_placement(reply.targets, self.new_buffer_id)
        segments = [
            Segment(target=s.target, source=s.source, start=s.start, stop=s.stop, moved=s.moved)
            for s in reply.segments
        ]
        return targets, segments

    # -- execute ----------------------------------------------------------------------------------
    def execute_now(
        self,
        place: Piece,
        ops: Sequence[agent_pb2.Op],
        *,
        fetch: Sequence[str],
        free: Sequence[str],
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one program from the calling thread, over a synchronous channel (see :meth:`channel`).

        Raises:
            AgentLost: the coordinator shows the agent offline (before the call, or while it waits).
            RemoteError, TransportError: the agent refused the program, or the call failed.
        """
        self.check_open()
        stub = self._sync_stubs.get(place.endpoint)
        if stub is None:
            with self._free_lock:
                if place.endpoint not in self._sync_stubs:
                    tls = self._keeper.holds(place.agent_id)
                    channel = sync_channel(
                        place.endpoint,
                        ca_pem=self._agent_ca if tls else None,
                        server_name=agent_dns_name(place.agent_id) if tls else "",
                    )
                    self._sync_channels.append(channel)
                    self._sync_stubs[place.endpoint] = agent_pb2_grpc.AgentStub(channel)  # type: ignore[no-untyped-call]
                stub = self._sync_stubs[place.endpoint]
        request = agent_pb2.ExecuteRequest(
            worker=place.worker, ops=ops, fetch=fetch, free=free, session=self.id
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

    # -- upload -----------------------------------------------------------------------------------
    def upload(
        self, host: np.ndarray, *, rows: Sequence[int] | None = None, backend: str = ""
    ) -> list[Piece]:
        """Have the coordinator place ``host``'s rows, and upload each shard; returns the pieces.

        With ``rows`` (row counts, one per shard, adding up to ``len(host)``: see
        :func:`~gpupool.client.layout.check_rows`), the shards go round robin over the ready agents in
        agent id order (:meth:`place_rows`) instead of by free memory. With ``backend`` ("cupy"), only
        agents whose workers all run it take rows.

        Raises:
            NoCapacity, PlacementError: the pool cannot take it.
            DeviceOutOfMemory, RemoteError: an agent refused its shard (nothing is left behind).
        """
        with self.track("upload", total=host.nbytes, unit="bytes"):
            return self.run(
                self._upload(host, rows, backend),
                timeout=self.timeouts.for_stream(host.nbytes) * 2,
                what="upload",
            )

    async def _upload(self, host: np.ndarray, rows: Sequence[int] | None, backend: str) -> list[Piece]:
        exclude: list[str] = []
        for attempt in range(MAX_RECOVERIES + 1):
            if rows is None:
                pieces = await self._place(host.shape, host.dtype, backend, exclude=exclude)
            else:
                pieces = await self._place_rows(host.shape, host.dtype, rows, backend)
            try:
                # An array's shards get replicas (keep_uploads="replica": gpupool.client.replicas), no copy.
                await self.upload_pieces(host, pieces, replicated=self.book.keep == "replica")
                return pieces
            except GpupoolError as exc:
                # An agent lost mid-upload, or one whose worker is restarting: place the rows again
                # without it (what arrived was freed).
                lost = getattr(exc, "agent_id", "")
                gone = loss_of(exc) == "agent" or isinstance(exc, AgentNotAccepting)
                if attempt == MAX_RECOVERIES or rows is not None or not gone or not lost:
                    raise
                log.warning("agent %s failed an upload (%s): placing the rows again without it", lost, exc)
                exclude.append(lost)
        raise AssertionError("unreachable")

    async def _place_rows(
        self, shape: tuple[int, ...], dtype: np.dtype[Any], counts: Sequence[int], backend: str = ""
    ) -> list[Piece]:
        """Pieces of ``counts`` rows each, in row order, round robin over the ready agents by agent id.

        Each agent that gets shards is placed by the coordinator's own Place call for all its rows, with
        every other agent excluded: the coordinator checks and reserves its memory and hands out the
        capability as for any array; the agent's shards all go to the worker that call names.

        Raises:
            NoCapacity: an agent cannot hold its rows. PlacementError: no ready agents.
        """
        listed = await self._call_coordinator("ListAgents", coordinator_pb2.ListAgentsRequest())
        agents = sorted(
            r.status.agent_id
            for r in listed.agents
            if r.status.state == control_pb2.AGENT_STATE_READY
            and r.status.endpoint
            and (not backend or all((w.backend or r.status.backend) == backend for w in r.status.workers))
        )
        if not agents:
            raise PlacementError(f"no ready {backend + ' ' if backend else ''}agents to place rows on")
        split = round_robin(counts, len(agents))
        held: dict[int, int] = {}
        for position, start, stop in split:
            held[position] = held.get(position, 0) + stop - start
        positions = sorted(held)
        replies = await asyncio.gather(
            *(
                self._call_coordinator(
                    "Place",
                    coordinator_pb2.PlaceRequest(
                        session=self.id,
                        meta=meta_of(dtype, (held[p], *shape[1:])),
                        exclude_agents=[a for a in agents if a != agents[p]],
                        backend=backend,
                    ),
                )
                for p in positions
            )
        )
        where: dict[int, coordinator_pb2.ShardPlacement] = {}
        for position, reply in zip(positions, replies, strict=True):
            self._keeper.keep_placed(reply.shards)
            where[position] = min(reply.shards, key=lambda s: s.start)
        return [
            Piece(
                agent_id=where[p].agent_id,
                endpoint=where[p].endpoint,
                worker=where[p].worker,
                start=start,
                stop=stop,
                buffer_id=self.new_buffer_id(),
            )
            for p, start, stop in split
        ]

    def place(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> list[Piece]:
        """Have the coordinator place an array's rows, and hold capabilities on its agents; nothing is
        uploaded: returns the pieces (in row order, each with a new buffer id) for programs to fill.

        Raises:
            NoCapacity, PlacementError: the pool cannot take it.
        """
        self.check_open()
        return self.run(self._place(shape, dtype), timeout=self.timeouts.rpc * 2, what="place")

    async def place_async(
        self, shape: tuple[int, ...], dtype: np.dtype[Any], *, exclude: Sequence[str] = ()
    ) -> list[Piece]:
        r""":meth:`place` on the loop, ``exclude``\ ing some agents (and those the session gave up)."""
        return await self._place(shape, dtype, exclude=exclude)

    async def _place(
        self, shape: tuple[int, ...], dtype: np.dtype[Any], backend: str = "", *, exclude: Sequence[str] = ()
    ) -> list[Piece]:
        # Agents this session gave up on (lost, or slower than a twin) get nothing new while others can.
        avoid = sorted(self.recovery.avoid - set(exclude))
        request = coordinator_pb2.PlaceRequest(
            session=self.id, meta=meta_of(dtype, shape), backend=backend, exclude_agents=[*exclude, *avoid]
        )
        try:
            reply = await self._call_coordinator("Place", request)
        except (PlacementError, NoCapacity):
            if not avoid:
                raise
            del request.exclude_agents[len(exclude) :]
            reply = await self._call_coordinator("Place", request)
        self._keeper.keep_placed(reply.shards)
        return pieces_from_placement(reply.shards, self.new_buffer_id)

    async def upload_pieces(
        self, host: np.ndarray, pieces: Sequence[Piece], *, lineage: bool = True, replicated: bool = False
    ) -> None:
        """Upload each piece's rows of ``host``; on any failure free what arrived and re-raise. The rows
        the lineage book keeps (a copy, one per distinct row range: whole copies on several workers share
        it) are made in a thread while the bytes travel; without ``lineage`` nothing is kept (the caller
        keeps ``host`` and makes its copies again itself, as tasks do); ``replicated`` rows get no copy
        (the caller makes replicas of them on other agents)."""

        def keep() -> list[np.ndarray | None]:
            made: dict[tuple[int, int], np.ndarray | None] = {}
            for p in pieces:
                if (p.start, p.stop) not in made:
                    rows = host[p.start : p.stop]
                    made[p.start, p.stop] = self.book.kept(rows, replicated=replicated) if lineage else None
            return [made[p.start, p.stop] for p in pieces]

        keeping = asyncio.ensure_future(asyncio.to_thread(keep))
        results: list[object] = await asyncio.gather(
            *(
                self.timed(
                    p.agent_id,
                    host[p.start : p.stop].nbytes,
                    self.channel(p.agent_id, p.endpoint).upload(
                        p.buffer_id, p.worker, host[p.start : p.stop], self.id
                    ),
                )
                for p in pieces
            ),
            return_exceptions=True,
        )
        results = [
            r.with_rows(p.start, p.stop) if isinstance(r, AgentLost) else r
            for r, p in zip(results, pieces, strict=True)
        ]
        kept = await keeping
        await self.raise_after_cleanup(results, [[p] for p in pieces])
        for p, rows in zip(pieces, kept, strict=True):
            if lineage:
                self.book.uploaded(p, host[p.start : p.stop], rows)
            else:
                self.book.made_elsewhere(p, "its uploader keeps the rows and uploads them again itself")

    async def timed(self, agent_id: str, nbytes: int, transfer: Awaitable[T]) -> T:
        """Await ``transfer`` (``nbytes`` to or from ``agent_id``), counting its throughput in
        :attr:`meter` if it succeeds."""
        started = time.monotonic()
        result = await transfer
        self.meter.add(agent_id, nbytes, time.monotonic() - started)
        return result

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

    # -- free -------------------------------------------------------------------------------------
    async def free_now(self, pieces: Iterable[Piece]) -> None:
        """Free buffers, grouped per agent; failures are logged, never raised (best effort)."""
        pieces = list(pieces)
        self.book.forget(p.buffer_id for p in pieces)
        results = await asyncio.gather(
            *(
                self.free_following(ps[0].agent_id, endpoint, [p.buffer_id for p in ps])
                for endpoint, ps in by_endpoint(pieces).items()
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                log.warning("freeing buffers failed: %s", result)

    async def free_following(self, agent_id: str, endpoint: str, buffer_ids: Sequence[str]) -> None:
        """Free buffers on one agent, following those it moved away (a drained agent frees nothing of a
        call that names one it moved: each moved one is freed where it went, and the rest again)."""
        left = list(buffer_ids)
        for _ in range(MAX_FOLLOWS):
            if not left:
                return
            try:
                await self.channel(agent_id, endpoint).free(left)
                return
            except BufferMoved as moved:
                if moved.buffer_id not in left or not moved.to_endpoint:
                    raise
                left.remove(moved.buffer_id)
                await self.grant([moved.to_agent])
                await self.channel(moved.to_agent, moved.to_endpoint).free([moved.buffer_id])
        log.warning("freeing buffers on agent %s: more than %d of them had moved", agent_id, MAX_FOLLOWS)

    def release(self, pieces: Iterable[Piece]) -> None:
        """Free buffers soon, from any thread, without waiting (used when an array is garbage-collected).

        The ids ride along with the next program sent to their agent; what no program picks up within
        :data:`FREE_DELAY` seconds goes in one Free call per agent.
        """
        if self._closed:
            return
        pieces = list(pieces)
        self.book.forget(p.buffer_id for p in pieces)
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
                task = asyncio.ensure_future(self.free_following(self._agent_of[endpoint], endpoint, ids))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # -- close ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free every buffer this session made, end the session, and stop the loop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._keeper.close()
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
        await asyncio.gather(*(c.free(session=self.id) for c in channels), return_exceptions=True)
        try:
            # Not waited for if unreachable: an ended lease frees the session's buffers anyway.
            await self._rpc.acall("Disconnect", coordinator_pb2.DisconnectRequest(session=self.id))
        except Exception as exc:
            log.warning("disconnect: %s", exc)
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
        await self._rpc.aclose()
