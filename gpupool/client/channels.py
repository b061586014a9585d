"""The client's side of the agent data plane: one grpc.aio channel per agent endpoint.

Every call has a deadline from :class:`~gpupool._config.Timeouts`; gRPC failures are translated into
gpupool exceptions here and nowhere else in the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Sequence,
)
from typing import Any, TypeVar

import grpc
import numpy as np

from gpupool._config import CHUNK_BYTES, Streams, Timeouts
from gpupool._errors import AgentLost, FrameDecodeError, GpupoolError, StreamClosed
from gpupool._proto.v1 import agent_pb2, agent_pb2_grpc
from gpupool.protocol.codec import array_from_bytes, check_dtype, iter_chunks, meta_of, shape_of
from gpupool.protocol.errors import translate_rpc_error
from gpupool.protocol.rawstream import ACCEPTED, DOWNLOAD_RAW, UPLOAD_RAW, decode_message
from gpupool.security.pki import agent_dns_name
from gpupool.transport.rpc import CHANNEL_OPTIONS, aio_channel

__all__ = ["CHANNEL_OPTIONS", "AgentChannel", "Metadata"]

Metadata = tuple[tuple[str, str], ...]
T = TypeVar("T")

log = logging.getLogger(__name__)


class AgentChannel:
    """Calls to one agent. Create and use it on the pool's event loop only.

    Args:
        agent_id: the agent's id, for error messages (and, with TLS, the name its certificate must carry).
        endpoint: ``host:port`` of its data plane.
        timeouts: deadlines.
        ca_pem: the pool CA: given, the agent is dialled with TLS and must present a certificate for
            ``<agent_id>.agent.gpupool`` (so an endpoint someone else answers gets no bytes).
        metadata: called before each call for its metadata (the session's capability on this agent).
        streams: how many streams (and connections) one shard's bytes go over.
    """

    def __init__(
        self,
        agent_id: str,
        endpoint: str,
        timeouts: Timeouts,
        *,
        ca_pem: bytes | None = None,
        metadata: Callable[[], Metadata] | None = None,
        streams: Streams = Streams(),
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self.agent_id = agent_id
        #: Told the size of every chunk uploaded or downloaded (the session's progress bars count them).
        self._on_bytes = on_bytes or (lambda n: None)
        self.endpoint = endpoint
        self._timeouts = timeouts
        self._metadata = metadata or (lambda: ())
        server_name = agent_dns_name(agent_id) if ca_pem is not None else ""
        self._streams = streams
        self._channel = aio_channel(endpoint, ca_pem=ca_pem, server_name=server_name)
        # More connections for the byte streams: gRPC runs one HTTP/2 connection's frames on one thread.
        self._more_channels = [
            aio_channel(endpoint, ca_pem=ca_pem, server_name=server_name, connection=n)
            for n in range(1, streams.connections)
        ]
        self.lost = False
        self._calls: set[asyncio.Task[Any]] = set()
        self._abandoned: set[asyncio.Task[Any]] = set()
        self._stub = agent_pb2_grpc.AgentStub(self._channel)  # type: ignore[no-untyped-call]
        # The raw byte streams (gpupool.protocol.rawstream): no serializers, bytes in and out; one pair
        # per connection, taken in turn.
        self._raw_methods = [
            (channel.stream_unary(UPLOAD_RAW, None, None), channel.unary_stream(DOWNLOAD_RAW, None, None))
            for channel in (self._channel, *self._more_channels)
        ]
        self._turn = itertools.count()
        self._raw = True  # False once the agent answered UNIMPLEMENTED (it predates them)

    def mark_lost(self) -> None:
        """The coordinator shows the agent offline: abandon every call waiting on it, refuse new ones."""
        self.lost = True
        for task in list(self._calls):
            self._abandoned.add(task)
            task.cancel()

    async def _watched(self, call: Awaitable[T]) -> T:
        """Await ``call``, unless the agent is (or goes) lost: then raise :class:`AgentLost`."""
        if self.lost:
            if inspect.iscoroutine(call):
                call.close()
            raise AgentLost(self.agent_id)
        task = asyncio.current_task()
        assert task is not None
        self._calls.add(task)
        try:
            return await call
        except asyncio.CancelledError:
            if task not in self._abandoned:
                raise
            task.uncancel()
            raise AgentLost(self.agent_id) from None
        finally:
            self._calls.discard(task)
            self._abandoned.discard(task)

    def _error(self, exc: grpc.aio.AioRpcError) -> Exception:
        return translate_rpc_error(exc, peer=self.endpoint, agent_id=self.agent_id)

    def _next_raw(self) -> tuple[Any, Any]:
        """The raw upload and download methods of the next connection in turn."""
        return self._raw_methods[next(self._turn) % len(self._raw_methods)]

    async def upload(self, buffer_id: str, worker: int, host: np.ndarray, session: str) -> None:
        """Stream ``host`` into a new buffer on ``worker`` (in parts, each its own stream, if it is large).

        Raises:
            DeviceOutOfMemory, AgentNotAccepting, RemoteError: the agent refused it.
            DeadlineExceeded, ConnectError: the network failed.
            AgentLost: the coordinator showed the agent offline meanwhile.
        """
        await self._watched(self._upload(buffer_id, worker, host, session))

    async def _upload(self, buffer_id: str, worker: int, host: np.ndarray, session: str) -> None:
        header = agent_pb2.UploadHeader(
            buffer_id=buffer_id, worker=worker, meta=meta_of(host.dtype, host.shape), session=session
        )
        timeout = self._timeouts.for_stream(host.nbytes)
        parts = self._streams.parts(host.shape[0], host.nbytes) if host.ndim else [(0, 0)]
        if self._raw and len(parts) > 1:
            try:
                # All parts or none: the agent commits the buffer once every part has arrived, and drops
                # it if any fails (the other parts' calls are cancelled then).
                await _all_or_first(
                    self._upload_raw_stream(
                        agent_pb2.UploadHeader(
                            buffer_id=buffer_id,
                            worker=worker,
                            meta=header.meta,
                            session=session,
                            has_rows=True,
                            start=start,
                            stop=stop,
                        ),
                        host[start:stop],
                        timeout,
                    )
                    for start, stop in parts
                )
                return
            except grpc.aio.AioRpcError as exc:
                if not self._lacks_raw(exc):
                    raise self._error(exc) from exc
        elif self._raw:
            try:
                await self._upload_raw_stream(header, host, timeout)
                return
            except grpc.aio.AioRpcError as exc:
                if not self._lacks_raw(exc):
                    raise self._error(exc) from exc

        async def requests() -> AsyncIterator[agent_pb2.UploadRequest]:
            yield agent_pb2.UploadRequest(header=header)
            for chunk in iter_chunks(host):
                yield agent_pb2.UploadRequest(chunk=bytes(chunk))
                self._on_bytes(len(chunk))

        try:
            await self._stub.Upload(requests(), timeout=timeout, metadata=self._metadata())
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc

    async def download_into(self, buffer_id: str, out: np.ndarray) -> None:
        """Stream a buffer into ``out``, a C-contiguous array of the buffer's dtype and shape (in parts,
        each a stream of a row range straight into its rows of ``out``, if it is large).

        Raises:
            BufferNotFound: the agent does not hold it.
            StreamClosed: the stream ended early or carried the wrong size.
            AgentLost: the coordinator showed the agent offline meanwhile.
        """
        await self._watched(self._download_into(buffer_id, out))

    async def _download_into(self, buffer_id: str, out: np.ndarray) -> None:
        parts = self._streams.parts(out.shape[0], out.nbytes) if out.ndim else [(0, 0)]
        if len(parts) == 1:
            await self._download_part(buffer_id, out, None)
            return
        await _all_or_first(
            self._download_part(buffer_id, out[start:stop], (start, stop)) for start, stop in parts
        )

    async def _download_part(self, buffer_id: str, out: np.ndarray, rows: tuple[int, int] | None) -> None:
        """Stream a buffer, or rows ``[start, stop)`` of it, into ``out``."""
        request = agent_pb2.DownloadRequest(buffer_id=buffer_id, chunk_bytes=CHUNK_BYTES)
        if rows is not None:
            request.has_rows, request.start, request.stop = True, rows[0], rows[1]
        timeout = self._timeouts.for_stream(out.nbytes)
        if self._raw:
            try:
                call = self._next_raw()[1](
                    request.SerializeToString(), timeout=timeout, metadata=self._metadata()
                )
                await self._fill(buffer_id, out, self._raw_messages(call))
                return
            except grpc.aio.AioRpcError as exc:
                if not self._lacks_raw(exc):
                    raise self._error(exc) from exc
        try:
            call = self._stub.Download(request, timeout=timeout, metadata=self._metadata())
            await self._fill(buffer_id, out, _framed_messages(call))
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc

    async def _upload_raw_stream(
        self, header: agent_pb2.UploadHeader, host: np.ndarray, seconds: float
    ) -> None:
        """An ``UploadRaw`` call: the serialized header, then a copy of each chunk (gRPC sends bytes only).

        Past one chunk, the data waits for the agent's go-ahead (initial metadata with
        :data:`~gpupool.protocol.rawstream.ACCEPTED`, sent once the header is accepted): a refused shard is
        not streamed, and the refusal arrives as itself. A call the agent ends while a write is in flight
        reports INTERNAL from the write instead of the agent's status (grpc/grpc#36066): the call's own
        outcome is awaited then, so a small upload's refusal (or an older agent's UNIMPLEMENTED) still
        arrives as itself.

        Raises:
            grpc.aio.AioRpcError: the agent refused the upload, or the call failed.
        """
        call = self._next_raw()[0](None, timeout=seconds, metadata=self._metadata())  # written below
        try:
            await call.write(header.SerializeToString())
            if host.nbytes > CHUNK_BYTES and ACCEPTED not in tuple(await call.initial_metadata() or ()):
                await call  # no go-ahead: the call's status is the refusal
            for chunk in iter_chunks(host):
                await call.write(bytes(chunk))
                self._on_bytes(len(chunk))
            await call.done_writing()
        except asyncio.InvalidStateError:  # the agent ended the call midway: its status says why
            pass
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INTERNAL:
                raise
            # The write lost a race with the agent's answer; the call itself carries that answer.
            async with asyncio.timeout(self._timeouts.rpc):
                await call
            raise  # the call ended well after all: the write's failure stands
        await call

    def _lacks_raw(self, exc: grpc.aio.AioRpcError) -> bool:
        """Whether the agent predates the raw methods (then use the protobuf ones from now on)."""
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            return False
        log.info("agent %s at %s has no raw byte streams; using protobuf ones", self.agent_id, self.endpoint)
        self._raw = False
        return True

    async def _raw_messages(self, call: AsyncIterable[bytes]) -> AsyncGenerator[agent_pb2.ArrayMeta | bytes]:
        """A ``DownloadRaw`` stream: its meta parsed, then the chunks as they come."""
        first = True
        async for message in call:
            if first:
                first = False
                try:
                    yield decode_message(message, agent_pb2.ArrayMeta, what="a download's meta")
                except FrameDecodeError as exc:
                    raise StreamClosed(self.endpoint, str(exc)) from exc
            else:
                yield message

    async def _fill(
        self, buffer_id: str, out: np.ndarray, messages: AsyncGenerator[agent_pb2.ArrayMeta | bytes]
    ) -> None:
        """Check the stream's meta against ``out``, then copy each chunk into place."""
        target = out.reshape(-1).view(np.uint8).data  # cast("B") refuses shapes with a zero in them
        expected = len(target)
        offset = 0
        async with contextlib.aclosing(messages):
            meta = await anext(messages, None)
            if not isinstance(meta, agent_pb2.ArrayMeta):
                raise StreamClosed(self.endpoint, f"buffer {buffer_id}: no meta opened the stream")
            if check_dtype(meta.dtype) != out.dtype or shape_of(meta) != out.shape:
                raise StreamClosed(self.endpoint, f"buffer {buffer_id} is not {out.dtype}{list(out.shape)}")
            async for chunk in messages:
                if not isinstance(chunk, bytes):
                    raise StreamClosed(self.endpoint, f"buffer {buffer_id}: a second meta in its stream")
                end = offset + len(chunk)
                if end > expected:
                    raise StreamClosed(self.endpoint, f"buffer {buffer_id} sent more than {expected} bytes")
                target[offset:end] = chunk
                offset = end
                self._on_bytes(len(chunk))
        if offset != expected:
            raise StreamClosed(self.endpoint, f"buffer {buffer_id}: got {offset} of {expected} bytes")

    async def execute(
        self,
        worker: int,
        ops: Sequence[agent_pb2.Op],
        *,
        session: str,
        fetch: Sequence[str] = (),
        free: Sequence[str] = (),
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, sized to the program's work
    ) -> dict[str, np.ndarray]:
        """Run a program on ``worker``; returns the fetched buffers as host arrays.

        Raises:
            RemoteKernelError, DeviceOutOfMemory, BufferNotFound: the agent refused the program
                (and kept nothing it created).
            AgentLost: the coordinator showed the agent offline meanwhile.
        """
        request = agent_pb2.ExecuteRequest(worker=worker, ops=ops, fetch=fetch, free=free, session=session)
        return await self._watched(self._execute(request, timeout))

    async def _execute(
        self,
        request: agent_pb2.ExecuteRequest,
        timeout: float | None,  # noqa: ASYNC109 - a gRPC deadline
    ) -> dict[str, np.ndarray]:
        reply = await self._unary(self._stub.Execute, request, timeout or self._timeouts.rpc)
        return fetched_arrays(reply, peer=self.endpoint)

    async def _unary(
        self,
        method: Callable[..., Awaitable[T]],
        request: Any,
        timeout: float,  # noqa: ASYNC109 - a gRPC deadline
    ) -> T:
        """One unary call of the stub's ``method`` with this channel's metadata, its errors as gpupool's."""
        try:
            return await method(request, timeout=timeout, metadata=self._metadata())
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc

    async def run_python(
        self,
        worker: int,
        payload: bytes,
        *,
        session: str,
        timeout: float,  # noqa: ASYNC109 - a gRPC deadline: the task's
    ) -> bytes:
        """Run a Python task (cloudpickle bytes) on ``worker`` of an agent that allows it; its outcome.

        Raises:
            AuthError: the agent does not run Python tasks (permission-denied).
            RemoteKernelError: the task's process died (the message says how).
            DeadlineExceeded: the task ran past ``timeout`` (the agent killed it).
            AgentLost: the coordinator showed the agent offline meanwhile.
        """
        request = agent_pb2.RunPythonRequest(worker=worker, session=session, payload=payload)
        reply: agent_pb2.RunPythonReply = await self._watched(
            self._unary(self._stub.RunPython, request, timeout)
        )
        return reply.payload

    async def pull(
        self,
        request: agent_pb2.PullRequest,
        *,
        timeout: float,  # noqa: ASYNC109 - a gRPC deadline, sized to the bytes pulled
    ) -> agent_pb2.PullReply:
        """Have this agent pull rows from others (and itself) into a new buffer (``Pull``).

        Raises:
            RemoteError: the agent refused, or could not read a source (the message names the source
                agent); BufferNotFound, DeviceOutOfMemory, AuthError: as for any call.
            AgentLost: the coordinator showed this agent offline meanwhile.
        """
        reply: agent_pb2.PullReply = await self._watched(self._unary(self._stub.Pull, request, timeout))
        return reply

    async def free(self, buffer_ids: Sequence[str] = (), *, session: str = "") -> int:
        """Free buffers (or, with only ``session``, all of that session's); returns how many went."""
        request = agent_pb2.FreeRequest(buffer_ids=buffer_ids, session=session)
        reply = await self._unary(self._stub.Free, request, self._timeouts.rpc)
        return int(reply.freed)

    async def close(self) -> None:
        """Close the channel (and its other connections)."""
        for channel in (self._channel, *self._more_channels):
            await channel.close(grace=None)


async def _all_or_first(calls: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run ``calls`` concurrently; if any fails, cancel the rest and raise the first failure itself.

    Raises:
        Exception: the first call's failure that is not a cancelled call (a refused part's, not its
            siblings' CANCELLED), as that call raised it, not in a group.
    """
    try:
        async with asyncio.TaskGroup() as group:
            for call in calls:
                group.create_task(call)
    except BaseExceptionGroup as errors:
        leaves = _leaves(errors)
        cancelled = [
            e for e in leaves if isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.CANCELLED
        ]
        first = next((e for e in leaves if e not in cancelled), leaves[0])
        raise first from None


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    return [
        leaf
        for error in group.exceptions
        for leaf in (_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    ]


def fetched_arrays(reply: agent_pb2.ExecuteReply, *, peer: str) -> dict[str, np.ndarray]:
    """The arrays an Execute reply carries inline.

    Raises:
        FrameDecodeError: a reply whose meta and data do not make an array (a broken or hostile agent).
    """
    try:
        return {item.buffer_id: array_from_bytes(item.data, item.meta) for item in reply.fetched}
    except (GpupoolError, ValueError, TypeError, KeyError) as exc:
        raise FrameDecodeError(f"an Execute reply from {peer}", str(exc)) from exc


async def _framed_messages(
    call: AsyncIterable[agent_pb2.DownloadChunk],
) -> AsyncGenerator[agent_pb2.ArrayMeta | bytes]:
    """A protobuf ``Download`` stream as the raw one reads: the meta, then chunks."""
    async for message in call:
        yield message.meta if message.WhichOneof("kind") == "meta" else message.chunk
