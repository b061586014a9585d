"""An agent's calls to the other agents of its pool: rows of a session's buffers, read peer to peer.

A ``Pull`` (see :mod:`gpupool.agent.pull`) names its remote sources by agent id, buffer id and rows, each
with the session's capability on that agent. :meth:`Peers.resolve` decides whether and where this agent
may dial for a source, and :meth:`Peers.fetch` reads the rows over the holder's ``DownloadRaw``.

What an attacker holding a session's credentials cannot make a pull do, and why:

- *Read another session's buffer.* The pulling agent accepts a source capability only for the session of
  the Pull's own capability, and shows it to the holder, whose guard confines the read to that session's
  buffers (as for any call). A buffer id naming another session is still qualified with the capability's.
- *Dial an address that is not the agent's.* The address dialled is the one the coordinator signed into
  the source's capability (the registry's endpoint of that agent); a Pull naming another is refused, and
  a capability without one is not used. The TLS certificate the address presents must be the pool CA's
  for ``<agent-id>.agent.gpupool``, the id the capability is for.
- *Use one agent's capability for another agent.* The capability is checked for the agent the source
  names (the id the certificate must then carry).

An agent run without a guard (``--insecure``, no coordinator key) trusts its network: it dials the
endpoint the Pull names, in plaintext.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from gpupool._config import CHUNK_BYTES, Timeouts, parse_endpoint
from gpupool._errors import AuthError, FrameDecodeError, UnsupportedDType, UsageError
from gpupool._proto.v1 import agent_pb2
from gpupool.protocol import bulk
from gpupool.protocol.codec import check_dtype, shape_of
from gpupool.protocol.errors import BUFFER_KEY, ERROR_KEY, MOVED_KEY, RpcRefusal
from gpupool.protocol.rawstream import DOWNLOAD_RAW, SERVICE, decode_message
from gpupool.security.capability import CapabilityVerifier
from gpupool.security.pki import agent_dns_name
from gpupool.transport.backoff import Backoff
from gpupool.transport.rpc import CAPABILITY_KEY, aio_channel
from gpupool.transport.tlssocket import client_context

__all__ = ["BULK_MIN_BYTES", "PULL_BACKOFF", "Peer", "Peers"]

log = logging.getLogger(__name__)

#: Between tries of a source that could not be reached: two more tries, at most about 1.5 s in all.
PULL_BACKOFF: Final = Backoff(base=0.25, cap=1.0, attempts=2)

#: Channels and capability checkers kept per peer; past these, the oldest are dropped.
MAX_PEERS: Final = 256

#: Reads of at least this many bytes go over a peer's bulk byte path where it has one
#: (:mod:`gpupool.protocol.bulk`); smaller ones over ``DownloadRaw``, on the channel already open.
BULK_MIN_BYTES: Final = 1 << 20
#: The method that tells a peer's status, and so its bulk port.
HEALTH: Final = f"/{SERVICE}/Health"
#: Seconds before a peer whose bulk path could not be reached (or that has none) is asked again.
BULK_RETRY_AFTER: Final = 60.0

#: Status codes of a read that may go better on another try (the peer restarting, a dropped link).
_TRANSIENT: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
    }
)

#: Refusals of the holder passed on as themselves; any other becomes the puller's bad-request. A source moved
#: to another agent (drain, pause) is passed on with its new home (``gpupool-moved-to``), so that the client
#: can name it there.
_PASSED_ON: Final = frozenset(
    {"buffer-not-found", "buffer-moved", "bad-request", "out-of-memory", "not-accepting"}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Peer:
    """Where and how to read one source: the agent, the address to dial, and what to show it."""

    agent_id: str
    endpoint: str
    capability: str
    tls: bool


class Peers:
    """Checks pull sources and reads rows from other agents. Use it on the agent's event loop.

    Args:
        agent_id: this agent's id.
        coordinator_key: the coordinator's capability key; None for an agent without a guard (insecure),
            which then dials the endpoints Pull requests name, in plaintext.
        ca_pem: the pool CA, which every peer's certificate must chain to (None with no key).
        timeouts: ``connect`` and ``stall`` bound each read's wait for the next chunk,
            ``for_stream(nbytes)`` each read in all.
        backoff: delays between the tries of a source that cannot be reached.
        clock: seconds since the epoch (capability expiry).
        bulk_path: read large rows over a peer's bulk byte path where it has one (False: always over
            ``DownloadRaw``).
    """

    def __init__(
        self,
        *,
        agent_id: str,
        coordinator_key: ec.EllipticCurvePublicKey | None,
        ca_pem: bytes | None,
        timeouts: Timeouts = Timeouts(),
        backoff: Backoff = PULL_BACKOFF,
        clock: Callable[[], float] = time.time,
        bulk_path: bool = True,
    ) -> None:
        self.agent_id = agent_id
        self._key = coordinator_key
        self._ca_pem = ca_pem
        self._timeouts = timeouts
        self._backoff = backoff
        self._clock = clock
        self._verifiers: dict[str, CapabilityVerifier] = {}
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._bulk = bulk_path
        self._bulk_tls = client_context(ca_pem) if ca_pem is not None and bulk_path else None
        # (endpoint, agent id) -> (bulk port, 0 for none; until when that is believed, time.monotonic())
        self._bulk_ports: dict[tuple[str, str], tuple[int, float]] = {}
        self._bulk_threads = ThreadPoolExecutor(max_workers=16, thread_name_prefix="gpupool-pull")

    @property
    def guarded(self) -> bool:
        """Whether sources must show capabilities (a secure pool)."""
        return self._key is not None

    def resolve(self, source: agent_pb2.PullSource, session: str) -> Peer:
        """Where to read a remote source of a pull for ``session``, checked (see the module).

        Raises:
            RpcRefusal: bad-request (no agent id, or no endpoint for an insecure agent), unauthenticated
                (no capability), permission-denied (a capability that does not verify, is for another
                agent or session, or an endpoint that is not the capability's).
        """
        agent_id = source.agent_id
        if not agent_id:
            raise RpcRefusal("bad-request", "a pull source names no agent")
        if self._key is None:
            if not source.endpoint:
                raise RpcRefusal("bad-request", f"a pull from agent {agent_id} names no endpoint")
            return Peer(agent_id=agent_id, endpoint=source.endpoint, capability=source.capability, tls=False)
        if not source.capability:
            raise RpcRefusal(
                "unauthenticated",
                f"a pull from agent {agent_id} needs the session's capability on that agent",
            )
        try:
            capability = self._verifier(agent_id).verify(source.capability, now=self._clock())
        except AuthError as exc:
            raise RpcRefusal(
                "permission-denied", f"the capability given for source agent {agent_id} does not hold: {exc}"
            ) from exc
        if capability.session != session:
            raise RpcRefusal(
                "permission-denied",
                f"the capability given for source agent {agent_id} is for another session than the pull's",
            )
        if not capability.endpoint:
            raise RpcRefusal(
                "permission-denied",
                f"the capability given for source agent {agent_id} carries no endpoint (a coordinator "
                "older than agent-to-agent moves signed it): ask for a new one",
            )
        if source.endpoint and source.endpoint != capability.endpoint:
            raise RpcRefusal(
                "permission-denied",
                f"the pull names {source.endpoint!r} for agent {agent_id}, not the address the "
                "coordinator signed for it: a peer's address is the coordinator's word",
            )
        return Peer(agent_id=agent_id, endpoint=capability.endpoint, capability=source.capability, tls=True)

    def _verifier(self, agent_id: str) -> CapabilityVerifier:
        assert self._key is not None
        verifier = self._verifiers.get(agent_id)
        if verifier is None:
            if len(self._verifiers) >= MAX_PEERS:
                del self._verifiers[next(iter(self._verifiers))]
            verifier = self._verifiers[agent_id] = CapabilityVerifier(self._key, agent_id, cache_size=64)
        return verifier

    async def fetch(
        self,
        peer: Peer,
        buffer_id: str,
        start: int,
        stop: int,
        dtype: np.dtype[Any],
        *,
        max_bytes: int,
        into: np.ndarray | None = None,
        whole: bool = False,
    ) -> np.ndarray:
        """Rows ``[start, stop)`` of ``peer``'s buffer ``buffer_id``, which must be of ``dtype`` and at most
        ``max_bytes``, as a new host array; or, with ``into`` (C-contiguous, ``stop - start`` rows of as many
        elements as the buffer's), written there (``into`` returned). ``whole``: the whole buffer, whatever
        its shape (``start`` and ``stop`` ignored; ``into`` of as many elements).

        Rows of at least :data:`BULK_MIN_BYTES` go over the peer's bulk byte path where it has one and it
        can be reached (:meth:`_fetch_bulk`); otherwise, or where that connection breaks, over
        ``DownloadRaw``. A peer that cannot be reached, or whose stream breaks, is tried again after
        :data:`PULL_BACKOFF`'s delays; each try has the stream's deadline and the stall limit between chunks.

        Raises:
            RpcRefusal: peer-unavailable (unreachable after the tries, or stalled; the message names the
                agent and its address), the holder's own refusal (buffer-not-found, bad-request,
                out-of-memory, not-accepting), permission-denied (the holder refused the capability), or
                bad-request (rows of another dtype or larger than ``max_bytes``).
        """
        read = _Read(peer, buffer_id, start, stop, dtype, max_bytes, into, whole)
        size = into.nbytes if into is not None else max_bytes
        if self._bulk and size >= BULK_MIN_BYTES:
            out = await self._try_bulk(read)
            if out is not None:
                return out
        tries = 0
        reason = ""
        for delay in itertools.chain(self._backoff.delays(), (None,)):
            tries += 1
            try:
                return await self._fetch_once(read)
            except grpc.aio.AioRpcError as exc:
                refusal = _refusal_of(exc, peer)
                if refusal is not None:
                    raise refusal from None
                reason = f"{exc.code().name}: {exc.details()}"
            except TimeoutError:
                raise RpcRefusal(
                    "peer-unavailable",
                    f"pull from agent {peer.agent_id} at {peer.endpoint}: no data for "
                    f"{self._timeouts.stall:g} s",
                ) from None
            await self._drop_channel(peer)
            if delay is None:
                break
            log.info("pull from agent %s at %s: %s; trying again", peer.agent_id, peer.endpoint, reason)
            await asyncio.sleep(delay)
        raise RpcRefusal(
            "peer-unavailable",
            f"pull from agent {peer.agent_id} at {peer.endpoint} failed after {tries} tries: {reason}",
        )

    async def _fetch_once(self, read: _Read) -> np.ndarray:
        peer, buffer_id, max_bytes = read.peer, read.buffer_id, read.max_bytes
        request = agent_pb2.DownloadRequest(
            buffer_id=buffer_id,
            chunk_bytes=CHUNK_BYTES,
            has_rows=not read.whole,
            start=read.start,
            stop=read.stop,
        )
        metadata = ((CAPABILITY_KEY, peer.capability),) if peer.capability else ()
        download = self._channel(peer).unary_stream(DOWNLOAD_RAW, None, None)
        call = download(
            request.SerializeToString(), timeout=self._timeouts.for_stream(max_bytes), metadata=metadata
        )
        messages: AsyncIterator[Any] = aiter(call)
        try:
            first = await self._next(messages, self._timeouts.connect + self._timeouts.stall)
            if first is None:
                raise _malformed(peer, buffer_id, "no meta opened the stream")
            try:
                meta = decode_message(first, agent_pb2.ArrayMeta, what="a download's meta")
            except FrameDecodeError as exc:
                raise _malformed(peer, buffer_id, str(exc)) from None
            out = _allocate(read, meta)
            target = out.reshape(-1).view(np.uint8).data  # cast("B") refuses shapes with a zero in them
            expected = len(target)
            offset = 0
            while (chunk := await self._next(messages, self._timeouts.stall)) is not None:
                end = offset + len(chunk)
                if end > expected:
                    raise _malformed(peer, buffer_id, f"more than the {expected} bytes declared")
                target[offset:end] = chunk
                offset = end
        finally:
            call.cancel()  # a no-op once the stream is done; ends it if we stopped early
        if offset != expected:
            raise _malformed(peer, buffer_id, f"the stream ended after {offset} of {expected} bytes")
        return out

    async def _try_bulk(self, read: _Read) -> np.ndarray | None:
        """:meth:`_fetch_bulk` where the peer has a bulk path; None where it has none, it cannot be reached
        (then not tried again for :data:`BULK_RETRY_AFTER` seconds) or the connection broke: read over gRPC.
        """
        peer = read.peer
        address = await self._bulk_address(peer)
        if address is None:
            return None
        try:
            return await self._fetch_bulk(read, address)
        except _BulkUnreachable as exc:
            retry = time.monotonic() + BULK_RETRY_AFTER
            self._bulk_ports[(peer.endpoint, peer.agent_id)] = (0, retry)
            log.info(
                "pull from agent %s: bulk path at %s:%d unreachable (%s); reading over gRPC for %g s",
                peer.agent_id,
                *address,
                exc,
                BULK_RETRY_AFTER,
            )
        except (OSError, FrameDecodeError) as exc:  # ConnectionError is an OSError
            log.info("pull from agent %s: bulk read broke off (%s); reading over gRPC", peer.agent_id, exc)
        return None

    async def _bulk_address(self, peer: Peer) -> tuple[str, int] | None:
        """Where ``peer``'s bulk path listens: the host of its endpoint (the coordinator's word, in a secure
        pool), the port its own status gives (over the channel that verified it); None where it has none.
        Remembered for :data:`BULK_RETRY_AFTER` seconds where none, for as long as the channel otherwise."""
        key = (peer.endpoint, peer.agent_id)
        now = time.monotonic()
        known = self._bulk_ports.get(key)
        if known is None or (not known[0] and now >= known[1]):
            port = 0
            try:
                health = self._channel(peer).unary_unary(
                    HEALTH,
                    request_serializer=agent_pb2.HealthRequest.SerializeToString,
                    response_deserializer=agent_pb2.HealthReply.FromString,
                )
                reply = await health(agent_pb2.HealthRequest(), timeout=self._timeouts.connect)
                if reply.status.agent_id == peer.agent_id:
                    port = reply.status.bulk_port
            except grpc.aio.AioRpcError as exc:
                log.info("pull from agent %s: no bulk path known (%s)", peer.agent_id, exc.code().name)
            known = self._bulk_ports[key] = (port, now + BULK_RETRY_AFTER)
        if not known[0]:
            return None
        try:
            host = parse_endpoint(peer.endpoint)[0]
        except UsageError:
            return None
        return host, known[0]

    async def _fetch_bulk(self, read: _Read, address: tuple[str, int]) -> np.ndarray:
        """:meth:`fetch` over the bulk path (:mod:`gpupool.protocol.bulk`), in a thread: the rows' bytes
        land in their array with no copy in user space.

        Raises:
            _BulkUnreachable: no connection (or no TLS session) could be opened.
            OSError, FrameDecodeError: the connection broke, or the holder spoke nonsense.
            RpcRefusal: the holder's refusal (as :func:`_refusal_of` passes it on), an answer that is not
                what the pull expects, or peer-unavailable where the holder went quiet.
        """
        peer = read.peer
        request = agent_pb2.DownloadRequest(
            buffer_id=read.buffer_id, has_rows=not read.whole, start=read.start, stop=read.stop
        )
        payload = bulk.encode_request(request, peer.capability)
        call = _BulkCall()

        def receive() -> np.ndarray | RpcRefusal:
            try:
                sock = socket.create_connection(address, timeout=self._timeouts.connect)
            except OSError as exc:
                raise _BulkUnreachable(str(exc)) from None
            try:
                call.sock = sock
                if call.cancelled:
                    raise ConnectionAbortedError("the pull was cancelled")
                sock.settimeout(self._timeouts.stall)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._bulk_tls is not None:
                    try:
                        sock = call.sock = self._bulk_tls.wrap_socket(
                            sock, server_hostname=agent_dns_name(peer.agent_id)
                        )
                    except (ssl.SSLError, OSError) as exc:
                        raise _BulkUnreachable(f"TLS: {exc}") from None
                sock.sendall(payload)
                reply = bulk.read_reply(sock)
                if isinstance(reply, RpcRefusal):
                    return reply
                out = _allocate(read, reply)
                deadline = time.monotonic() + self._timeouts.for_stream(out.nbytes)
                bulk.recv_into(sock, out.reshape(-1).view(np.uint8).data, deadline=deadline)
                return out
            except TimeoutError:
                raise RpcRefusal(
                    "peer-unavailable",
                    f"pull from agent {peer.agent_id} at {address[0]}:{address[1]}: no data for "
                    f"{self._timeouts.stall:g} s, or past the read's deadline",
                ) from None
            finally:
                sock.close()

        try:
            result = await asyncio.get_running_loop().run_in_executor(self._bulk_threads, receive)
        except asyncio.CancelledError:
            call.cancel()
            raise
        if isinstance(result, RpcRefusal):
            buffer_id = result.buffer_id.split("/", 1)[-1]
            raise _passed_on(result.kind, peer, result.message, buffer_id, result.extra.get("moved-to", ""))
        return result

    @staticmethod
    async def _next(messages: AsyncIterator[Any], seconds: float) -> bytes | None:
        async with asyncio.timeout(seconds):
            message = await anext(messages, None)
        return None if message is None else bytes(message)

    def _channel(self, peer: Peer) -> grpc.aio.Channel:
        key = (peer.endpoint, peer.agent_id)
        channel = self._channels.get(key)
        if channel is None:
            if len(self._channels) >= MAX_PEERS:
                oldest = next(iter(self._channels))
                _close_soon(self._channels.pop(oldest))
            if peer.tls:
                channel = aio_channel(
                    peer.endpoint, ca_pem=self._ca_pem, server_name=agent_dns_name(peer.agent_id)
                )
            else:
                channel = aio_channel(peer.endpoint)
            self._channels[key] = channel
        return channel

    async def _drop_channel(self, peer: Peer) -> None:
        channel = self._channels.pop((peer.endpoint, peer.agent_id), None)
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close(grace=None)

    async def close(self) -> None:
        """Close every channel to a peer."""
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            with contextlib.suppress(Exception):
                await channel.close(grace=None)
        self._bulk_threads.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True, slots=True)
class _Read:
    """One read of rows from a peer (:meth:`Peers.fetch`'s arguments)."""

    peer: Peer
    buffer_id: str
    start: int
    stop: int
    dtype: np.dtype[Any]
    max_bytes: int
    into: np.ndarray | None
    whole: bool = False


class _BulkUnreachable(Exception):
    """A peer's bulk path could not be reached: read over gRPC instead."""


class _BulkCall:
    """A bulk read in a thread, which the loop can break off (closing a socket would not wake the thread)."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)


def _allocate(read: _Read, meta: agent_pb2.ArrayMeta) -> np.ndarray:
    """The host array a read's meta announces (new, or ``read.into`` where it has the same elements),
    checked against what the pull expects."""
    peer, buffer_id, start, stop, dtype = read.peer, read.buffer_id, read.start, read.stop, read.dtype
    max_bytes, into = read.max_bytes, read.into
    try:
        sent = check_dtype(meta.dtype)
    except UnsupportedDType as exc:
        raise _malformed(peer, buffer_id, str(exc)) from None
    shape = shape_of(meta)
    if read.whole:
        return _allocate_whole(read, sent, shape)
    if sent != dtype or not shape or shape[0] != stop - start or any(n < 0 for n in shape):
        raise RpcRefusal(
            "bad-request",
            f"agent {peer.agent_id}: rows [{start}, {stop}) of buffer {buffer_id} are "
            f"{meta.dtype}{list(shape)}, not {stop - start} rows of {dtype.name} as the pull expects",
            buffer_id=buffer_id,
        )
    if math.prod(shape) * dtype.itemsize > max_bytes:
        raise RpcRefusal(
            "bad-request",
            f"agent {peer.agent_id}: rows [{start}, {stop}) of buffer {buffer_id} are larger than "
            "the pull's result",
            buffer_id=buffer_id,
        )
    if into is None:
        return np.empty(shape, dtype)
    if into.size != math.prod(shape):
        raise RpcRefusal(
            "bad-request",
            f"agent {peer.agent_id}: rows [{start}, {stop}) of buffer {buffer_id} are {list(shape)}, "
            f"not rows of {into.size // max(1, stop - start)} elements as the pull expects",
            buffer_id=buffer_id,
        )
    return into


def _allocate_whole(read: _Read, sent: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    """:func:`_allocate` for a whole buffer: any shape, of the pull's dtype, at most its bytes."""
    peer, buffer_id, dtype, into = read.peer, read.buffer_id, read.dtype, read.into
    size = math.prod(shape)
    if sent != dtype or any(n < 0 for n in shape) or size * dtype.itemsize > read.max_bytes:
        raise RpcRefusal(
            "bad-request",
            f"agent {peer.agent_id}: buffer {buffer_id} is {sent.name}{list(shape)}, not of {dtype.name} "
            f"in at most {read.max_bytes} bytes as the pull expects",
            buffer_id=buffer_id,
        )
    if into is None:
        return np.empty(shape, dtype)
    if into.size != size:
        raise RpcRefusal(
            "bad-request",
            f"agent {peer.agent_id}: buffer {buffer_id} has {size} elements, not {into.size} as the pull "
            "expects",
            buffer_id=buffer_id,
        )
    return into


def _close_soon(channel: grpc.aio.Channel) -> None:
    task = asyncio.ensure_future(channel.close(grace=None))
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _malformed(peer: Peer, buffer_id: str, detail: str) -> RpcRefusal:
    return RpcRefusal(
        "peer-unavailable",
        f"pull from agent {peer.agent_id} at {peer.endpoint}: buffer {buffer_id}: {detail}",
        buffer_id=buffer_id,
    )


def _refusal_of(exc: grpc.aio.AioRpcError, peer: Peer) -> RpcRefusal | None:
    """The refusal to answer with for a failed read; None where another try may do better."""
    kind = ""
    buffer_id = ""
    moved_to = ""
    for item in exc.trailing_metadata() or ():
        pair: tuple[object, ...] = tuple(item)  # type: ignore[arg-type]  # grpc-stubs: opaque metadatum
        if len(pair) == 2 and pair[0] == ERROR_KEY and isinstance(pair[1], str):
            kind = pair[1]
        elif len(pair) == 2 and pair[0] == BUFFER_KEY and isinstance(pair[1], str):
            buffer_id = pair[1].split("/", 1)[-1]
        elif len(pair) == 2 and pair[0] == MOVED_KEY and isinstance(pair[1], str):
            moved_to = pair[1]
    code = exc.code()
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return _passed_on("permission-denied", peer, exc.details() or "", buffer_id)
    if kind in _PASSED_ON:
        return _passed_on(kind, peer, exc.details() or "", buffer_id, moved_to)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RpcRefusal(
            "peer-unavailable",
            f"pull from agent {peer.agent_id} at {peer.endpoint} ran past its deadline: {exc.details()}",
        )
    if code in _TRANSIENT and not kind:
        return None
    return _passed_on(kind, peer, exc.details() or "", buffer_id)


def _passed_on(kind: str, peer: Peer, details: str, buffer_id: str, moved_to: str = "") -> RpcRefusal:
    """The puller's refusal for the holder's: a refused capability as permission-denied, the kinds of
    :data:`_PASSED_ON` as themselves (buffer-moved with the holder's ``moved_to``), any other as
    bad-request."""
    words = f"agent {peer.agent_id} at {peer.endpoint} refused the pull: {details}"
    if kind in ("unauthenticated", "permission-denied"):
        return RpcRefusal("permission-denied", words, buffer_id=buffer_id)
    if kind == "buffer-moved":
        return RpcRefusal("buffer-moved", words, buffer_id=buffer_id, extra={"moved-to": moved_to})
    if kind in _PASSED_ON:
        return RpcRefusal(kind, words, buffer_id=buffer_id)  # type: ignore[arg-type]  # checked just above
    return RpcRefusal("bad-request", words, buffer_id=buffer_id)
