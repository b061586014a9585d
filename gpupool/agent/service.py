"""The agent's gRPC data plane (``gpupool.v1.Agent``): shards in and out, programs, frees, health.

Each handler refuses a call by raising :class:`RpcRefusal` inside, which becomes a status code and the
``gpupool-error`` metadata (see ``protos/gpupool/v1/agent.proto``); after a refusal every reservation
the call made is released, so the agent serves the next call as if the refused one never came.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final

import grpc
import numpy as np

from gpupool._config import CHUNK_BYTES, MAX_MESSAGE_BYTES, Timeouts
from gpupool._errors import FrameDecodeError, UnsupportedDType
from gpupool._proto.v1 import agent_pb2, agent_pb2_grpc, control_pb2
from gpupool.agent.buffers import BufferRegistry, Reservation
from gpupool.agent.evacuation import CallsInFlight, Evacuation
from gpupool.agent.guard import Guard
from gpupool.agent.parts import Assemblies, Assembly, PartsFailed
from gpupool.agent.procworker import AnyWorker, ProcessWorker, RemoteArray, RowStream
from gpupool.agent.program import estimate_work, forget_frames, is_small, run_program
from gpupool.agent.pull import Puller
from gpupool.agent.pytask import PythonOverdue, PythonRunner
from gpupool.agent.status import Counters
from gpupool.protocol.codec import check_dtype, iter_chunks, meta_of, shape_of
from gpupool.protocol.errors import RpcRefusal, abort
from gpupool.protocol.rawstream import ACCEPTED, DOWNLOAD_RAW, SERVICE, UPLOAD_RAW, decode_message

__all__ = ["AgentService", "add_to_server"]

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

#: Smallest and largest Download chunk honoured; a request outside is clamped.
MIN_CHUNK_BYTES: Final = 1 << 10
MAX_CHUNK_BYTES: Final = MAX_MESSAGE_BYTES - (1 << 16)

#: Bytes of each of the two staging blocks an upload to a device fills in turn (page-locked for CUDA).
STAGING_BYTES: Final = 8 << 20

#: A program's deadline is its work's (``Timeouts.for_work``) this many times over: the rest is for the
#: turns other sessions' ops take in between, and for this session's earlier programs on the worker.
QUEUE_ALLOWANCE: Final = 2.0


Handler = Callable[..., Awaitable[Any]]


def add_to_server(service: AgentService, server: grpc.aio.Server, guard: Guard | None = None) -> None:
    """Serve ``service`` on ``server``: the ``Agent`` methods and the raw twins of the byte path.

    ``UploadRaw`` and ``DownloadRaw`` (:mod:`gpupool.protocol.rawstream`) have no serializers: their
    handlers take and give ``bytes``, and encode or parse their one protobuf message themselves. With a
    ``guard`` every method but Health needs a capability, and sees only its session's buffers; Inventory and
    Forward take only the coordinator's. The data-plane calls are counted in ``service.calls`` while they run
    (an inventory for a move waits for them).
    """
    upload: Handler = service.Upload
    upload_raw: Handler = service.upload_raw
    download: Handler = service.Download
    download_raw: Handler = service.download_raw
    execute: Handler = service.Execute
    free: Handler = service.Free
    pull: Handler = service.Pull
    run_python: Handler = service.RunPython
    inventory: Handler = service.Inventory
    forward: Handler = service.Forward
    if guard is not None:
        upload, upload_raw = guard.upload(upload), guard.upload_raw(upload_raw)
        download, download_raw = guard.download(download), guard.download_raw(download_raw)
        execute, free = guard.execute(execute), guard.free(free)
        pull = guard.pull(pull)
        run_python = guard.run_python(run_python)
        inventory, forward = guard.inventory(inventory), guard.forward(forward)
    track = service.calls.track
    upload, upload_raw, download, download_raw = (
        track(upload),
        track(upload_raw),
        track(download),
        track(download_raw),
    )
    execute, free, pull, run_python = track(execute), track(free), track(pull), track(run_python)
    handlers = {
        "Upload": grpc.stream_unary_rpc_method_handler(
            upload,
            request_deserializer=agent_pb2.UploadRequest.FromString,
            response_serializer=agent_pb2.UploadReply.SerializeToString,
        ),
        "Download": grpc.unary_stream_rpc_method_handler(
            download,
            request_deserializer=agent_pb2.DownloadRequest.FromString,
            response_serializer=agent_pb2.DownloadChunk.SerializeToString,
        ),
        "Execute": grpc.unary_unary_rpc_method_handler(
            execute,
            request_deserializer=agent_pb2.ExecuteRequest.FromString,
            response_serializer=agent_pb2.ExecuteReply.SerializeToString,
        ),
        "Free": grpc.unary_unary_rpc_method_handler(
            free,
            request_deserializer=agent_pb2.FreeRequest.FromString,
            response_serializer=agent_pb2.FreeReply.SerializeToString,
        ),
        "Pull": grpc.unary_unary_rpc_method_handler(
            pull,
            request_deserializer=agent_pb2.PullRequest.FromString,
            response_serializer=agent_pb2.PullReply.SerializeToString,
        ),
        "RunPython": grpc.unary_unary_rpc_method_handler(
            run_python,
            request_deserializer=agent_pb2.RunPythonRequest.FromString,
            response_serializer=agent_pb2.RunPythonReply.SerializeToString,
        ),
        "Inventory": grpc.unary_unary_rpc_method_handler(
            inventory,
            request_deserializer=agent_pb2.InventoryRequest.FromString,
            response_serializer=agent_pb2.InventoryReply.SerializeToString,
        ),
        "Forward": grpc.unary_unary_rpc_method_handler(
            forward,
            request_deserializer=agent_pb2.ForwardRequest.FromString,
            response_serializer=agent_pb2.ForwardReply.SerializeToString,
        ),
        "Health": grpc.unary_unary_rpc_method_handler(
            service.Health,
            request_deserializer=agent_pb2.HealthRequest.FromString,
            response_serializer=agent_pb2.HealthReply.SerializeToString,
        ),
        UPLOAD_RAW.rsplit("/", 1)[1]: grpc.stream_unary_rpc_method_handler(upload_raw),
        DOWNLOAD_RAW.rsplit("/", 1)[1]: grpc.unary_stream_rpc_method_handler(download_raw),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class AgentService(agent_pb2_grpc.AgentServicer):
    """The servicer. Runs on the event loop; compute goes to each worker's thread.

    Args:
        workers: the agent's workers, by index.
        registry: the resident buffers.
        counters: work counters for telemetry (updated here).
        accepting: whether new uploads are taken now (False while draining or stopping).
        status: the agent's current status, for Health.
        timeouts: deadlines; an upload or download gets ``timeouts.for_stream(nbytes)``, the header ``rpc``.
        puller: runs ``Pull`` (rows from other agents, :mod:`gpupool.agent.pull`); None refuses it.
        allow_kernels: run users' kernels (``--allow-kernels``); refused with permission-denied otherwise.
        allow_python: run Python tasks (``--allow-python``, :mod:`gpupool.agent.pytask`); refused otherwise.
        fuse_kernels: on CuPy workers, run programs' elementwise chains as generated kernels.
        evacuation: serves ``Inventory`` and ``Forward`` (the coordinator moving buffers away); None refuses
            them.

    Attributes:
        calls: the data-plane calls in flight (counted by :func:`add_to_server`).
    """

    def __init__(
        self,
        *,
        workers: Sequence[AnyWorker],
        registry: BufferRegistry,
        counters: Counters,
        accepting: Callable[[], bool],
        status: Callable[[], control_pb2.AgentStatus],
        timeouts: Timeouts = Timeouts(),
        puller: Puller | None = None,
        allow_kernels: bool = False,
        allow_python: bool = False,
        fuse_kernels: bool = False,
        evacuation: Evacuation | None = None,
        calls: CallsInFlight | None = None,
    ) -> None:
        self.calls = calls if calls is not None else CallsInFlight()
        self._evacuation = evacuation
        self._puller = puller
        # The program runner with this agent's options, for both of Execute's paths.
        self._run_program = functools.partial(
            run_program, allow_kernels=allow_kernels, fuse_kernels=fuse_kernels
        )
        self._python = PythonRunner(workers, allowed=allow_python)
        self._workers = tuple(workers)
        self._registry = registry
        self._counters = counters
        self._accepting = accepting
        self._status = status
        self._timeouts = timeouts
        self._parts: Assemblies | None = None  # made on the loop, by the first upload in parts

    async def Upload(
        self, request_iterator: AsyncIterator[agent_pb2.UploadRequest], context: Context
    ) -> agent_pb2.UploadReply:
        """Receive a shard: a header, then raw chunks (each in a protobuf message)."""
        requests = aiter(request_iterator)

        async def read_header() -> agent_pb2.UploadHeader:
            first = await anext(requests, None)
            if first is None or first.WhichOneof("kind") != "header":
                raise RpcRefusal("bad-request", "an upload starts with a header")
            return first.header

        return await self._upload(read_header, _chunks_of(requests), context)

    async def upload_raw(self, request_iterator: AsyncIterator[bytes], context: Context) -> bytes:
        """Receive a shard: a serialized header, then unframed chunks (``UploadRaw``)."""
        requests = aiter(request_iterator)

        async def read_header() -> agent_pb2.UploadHeader:
            first = await anext(requests, None)
            if first is None:
                raise RpcRefusal("bad-request", "an upload starts with a header")
            try:
                return decode_message(first, agent_pb2.UploadHeader, what="an upload header")
            except FrameDecodeError as exc:
                raise RpcRefusal("bad-request", str(exc)) from exc

        reply = await self._upload(read_header, requests, context)
        return reply.SerializeToString()

    async def _upload(
        self,
        read_header: Callable[[], Awaitable[agent_pb2.UploadHeader]],
        chunks: AsyncIterator[bytes],
        context: Context,
    ) -> agent_pb2.UploadReply:
        """Both uploads: check the header, reserve, fill a preallocated host array, commit.

        Each chunk must come within ``timeouts.stall`` of the one before (the first, of the go-ahead),
        and all of them within ``timeouts.for_stream(nbytes)``; past either, the call ends with
        DEADLINE_EXCEEDED and the reservation is released there and then.
        """
        reservation: Reservation | None = None
        array: Any = None
        host: np.ndarray | None = None
        refusal: RpcRefusal | None = None
        overdue = "the upload stream ran past its deadline"
        try:
            async with asyncio.timeout(self._timeouts.rpc):
                header = await read_header()
            if header.has_rows:
                return await self._upload_part(header, chunks, context)
            worker, dtype, shape, nbytes = self._check_header(header)
            reservation = self._registry.reserve(
                worker=worker.index, buffer_id=header.buffer_id, nbytes=nbytes, session=header.session
            )
            if worker.host_resident:
                array = _allocate(dtype, shape, header.buffer_id)
            else:
                array = await worker.allocate(dtype, shape, header.buffer_id)
            # The go-ahead: a client may wait for it before it sends data, so that a refusal above reaches
            # it as itself, not as the INTERNAL error of a write the refusal cut off (grpc/grpc#36066).
            await context.send_initial_metadata((ACCEPTED,))
            paced = _paced(chunks, self._timeouts.stall)
            overdue = f"the upload stream ran past its {self._timeouts.for_stream(nbytes):.0f} s deadline"
            async with asyncio.timeout(self._timeouts.for_stream(nbytes)):
                host = _host_of(worker, array)
                if host is not None:
                    await _receive_into(host, paced, header.buffer_id)
                else:
                    await _receive_to_device(worker, array, nbytes, paced, header.buffer_id)
            self._registry.commit(reservation, array)
            self._counters.bytes_received += nbytes
            return agent_pb2.UploadReply(buffer_id=header.buffer_id, nbytes=nbytes)
        except RpcRefusal as exc:
            refusal = _detached(exc)
        except TimeoutError as exc:
            overdue = str(exc) or overdue
        finally:
            # This frame outlives the call in the abort's traceback: it must not hold the shard.
            array = host = None
            if reservation is not None:
                self._registry.release(reservation)  # a no-op once committed
        # Aborting here, outside the handlers, chains no exception (and its frames) to the abort's error.
        if refusal is not None:
            await abort(context, refusal)
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, overdue)

    async def _upload_part(
        self, header: agent_pb2.UploadHeader, chunks: AsyncIterator[bytes], context: Context
    ) -> agent_pb2.UploadReply:
        """One part of an upload in several streams (:mod:`gpupool.agent.parts`): claim its rows of the
        buffer (reserving and allocating the whole buffer if it is the first part), fill them in place, and
        answer once every part has arrived and the buffer is committed.

        Raises:
            RpcRefusal: the part was refused, or the upload was dropped (this part's fault or another's).
            TimeoutError: the upload's deadline passed while this part was receiving.
        """
        worker, dtype, shape, nbytes = self._check_header(header)
        if not shape:
            raise RpcRefusal(
                "bad-request", "a 0-d buffer has no rows to upload in parts", buffer_id=header.buffer_id
            )
        if self._parts is None:
            self._parts = Assemblies(self._registry, clock=asyncio.get_running_loop().time)
        parts = self._parts
        assembly = parts.get(header.buffer_id)
        if assembly is None:
            reservation = self._registry.reserve(
                worker=worker.index, buffer_id=header.buffer_id, nbytes=nbytes, session=header.session
            )
            assembly = parts.open(
                buffer_id=header.buffer_id,
                worker=worker.index,
                dtype=dtype,
                shape=shape,
                session=header.session,
                reservation=reservation,
                seconds=self._timeouts.for_stream(nbytes),
            )
            try:
                if worker.host_resident:
                    parts.allocate(assembly, _allocate(dtype, shape, header.buffer_id))
                else:
                    array = await worker.allocate(dtype, shape, header.buffer_id)
                    parts.allocate(assembly, array)
                    array = None
            except RpcRefusal as exc:
                parts.fail(assembly, exc)
                raise
            except BaseException as exc:
                parts.fail(assembly, RpcRefusal("bad-request", f"a part of the upload failed: {exc!r}"))
                raise
        else:
            try:
                await parts.join(assembly)  # its first part may still be allocating the array
            except PartsFailed as exc:
                raise _detached(exc.refusal) from None
        start, stop = int(header.start), int(header.stop)
        part_bytes = (stop - start) * assembly.row_bytes
        parts.enter(assembly)
        try:
            parts.check_same(assembly, worker=worker.index, dtype=dtype, shape=shape, session=header.session)
            assembly.claim(start, stop)
            parts.progressed(assembly)
            await context.send_initial_metadata((ACCEPTED,))
            paced = _paced(_part_chunks(parts, assembly, chunks), self._timeouts.stall)
            async with asyncio.timeout_at(assembly.deadline):
                host = _host_of(worker, assembly.array)
                if host is not None:
                    await _receive_into(host[start:stop], paced, header.buffer_id)
                else:
                    await _receive_to_device(
                        worker,
                        assembly.array,
                        part_bytes,
                        paced,
                        header.buffer_id,
                        base=start * assembly.row_bytes,
                    )
        except PartsFailed as exc:
            raise _detached(exc.refusal) from None
        except RpcRefusal as exc:
            parts.fail(assembly, exc)
            raise
        except asyncio.CancelledError:
            parts.fail(assembly, RpcRefusal("bad-request", "a part of the upload failed: it was cancelled"))
            raise
        except BaseException as exc:  # a timeout: the whole upload goes
            parts.fail(assembly, RpcRefusal("bad-request", f"a part of the upload failed: {exc!r}"))
            raise
        finally:
            parts.leave(assembly)
        parts.finished(assembly, start, stop)
        try:
            await parts.wait(assembly, self._timeouts.stall)
        except PartsFailed as exc:
            raise _detached(exc.refusal) from None
        except BaseException as exc:
            parts.fail(assembly, RpcRefusal("bad-request", f"a part of the upload failed: {exc!r}"))
            raise
        self._counters.bytes_received += part_bytes
        return agent_pb2.UploadReply(buffer_id=header.buffer_id, nbytes=part_bytes)

    def _check_header(
        self, header: agent_pb2.UploadHeader
    ) -> tuple[AnyWorker, np.dtype[Any], tuple[int, ...], int]:
        if not header.buffer_id:
            raise RpcRefusal("bad-request", "the upload header names no buffer id")
        try:
            dtype = check_dtype(header.meta.dtype)
        except UnsupportedDType as exc:
            raise RpcRefusal("bad-request", str(exc), buffer_id=header.buffer_id) from exc
        shape = shape_of(header.meta)
        if any(n < 0 for n in shape):
            raise RpcRefusal(
                "bad-request", f"negative dimension in shape {shape}", buffer_id=header.buffer_id
            )
        self._registry.check_worker(header.worker)
        if not self._accepting():
            raise RpcRefusal(
                "not-accepting", "this agent is draining: it takes no new uploads", buffer_id=header.buffer_id
            )
        return self._workers[header.worker], dtype, shape, math.prod(shape) * dtype.itemsize

    async def Download(self, request: agent_pb2.DownloadRequest, context: Context) -> None:
        """Send a shard: its meta, then raw chunks (each in a protobuf message)."""

        async def write(message: agent_pb2.ArrayMeta | bytes) -> None:
            if isinstance(message, bytes):
                await context.write(agent_pb2.DownloadChunk(chunk=message))
            else:
                await context.write(agent_pb2.DownloadChunk(meta=message))

        await self._download(request, write, context)

    async def download_raw(self, request: bytes, context: Context) -> None:
        """Send a shard: its serialized meta, then unframed chunks (``DownloadRaw``)."""

        async def write(message: agent_pb2.ArrayMeta | bytes) -> None:
            await context.write(message if isinstance(message, bytes) else message.SerializeToString())

        try:
            parsed = decode_message(request, agent_pb2.DownloadRequest, what="a download request")
        except FrameDecodeError as exc:
            await abort(context, RpcRefusal("bad-request", str(exc)))
        await self._download(parsed, write, context)

    async def host_rows(self, request: agent_pb2.DownloadRequest) -> np.ndarray | RowStream:
        """The rows a download asks for, on the host: a view of a host-resident buffer, a copy from the
        device, or (a worker in its own process) a stream of them through its staging blocks. Also what the
        bulk byte path sends (:mod:`gpupool.agent.bulk`).

        Raises:
            RpcRefusal: buffer-not-found, bad-request (rows outside the buffer), out-of-memory, kernel-failed.
        """
        buffer = self._registry.get(request.buffer_id)
        worker = self._workers[buffer.worker]
        rows = _row_range(request, buffer.shape, buffer.buffer_id)
        if isinstance(worker, ProcessWorker):
            shared = await worker.host_view(buffer.array, buffer.buffer_id)
            if shared is None:
                return worker.row_stream(buffer.array, buffer.buffer_id, rows, timeout=self._timeouts.stall)
            return shared if rows is None else shared[rows[0] : rows[1]]
        if not worker.host_resident:
            return await worker.to_host(buffer.array, buffer.buffer_id, rows)
        host: np.ndarray = buffer.array if rows is None else buffer.array[rows[0] : rows[1]]
        return host

    async def _download(
        self,
        request: agent_pb2.DownloadRequest,
        write: Callable[[agent_pb2.ArrayMeta | bytes], Awaitable[None]],
        context: Context,
    ) -> None:
        """Both downloads: write the shard's meta, then a copy of each chunk sliced from the host array.

        A reader that stops reading for :attr:`Timeouts.stall` seconds ends the call (DEADLINE_EXCEEDED),
        as does the whole stream running past its overall deadline.
        """
        refusal: RpcRefusal | None = None
        stalled = False
        host: Any = None
        try:
            host = await self.host_rows(request)
            chunk_bytes = min(max(request.chunk_bytes or CHUNK_BYTES, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)
            stall = self._timeouts.stall
            async with asyncio.timeout(self._timeouts.for_stream(host.nbytes)):
                await write(meta_of(host.dtype, tuple(host.shape)))
                async for piece in _pieces(host, chunk_bytes):
                    async with asyncio.timeout(stall):
                        await write(bytes(piece))  # gRPC sends bytes only: the one copy a sender must make
                    self._counters.bytes_sent += len(piece)
        except RpcRefusal as exc:
            refusal = _detached(exc)
        except TimeoutError:
            stalled = True
        finally:
            host = None  # a device shard's host copy goes now, whatever happened
        # Aborted outside the handlers, so the abort's error keeps no frame (and no host copy) alive.
        if refusal is not None:
            await abort(context, refusal)
        if stalled:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the download stream stalled past its deadline"
            )

    async def Execute(self, request: agent_pb2.ExecuteRequest, context: Context) -> agent_pb2.ExecuteReply:
        """Run a program on one worker, all or nothing, within a deadline that grows with its work.

        Programs of different sessions are in flight on a worker at once and their ops take turns (see
        :class:`~gpupool.agent.workers.Worker`); a session's programs run one after another.
        """
        refusal: RpcRefusal | None = None
        deadline = 0.0
        try:
            self._registry.check_worker(request.worker)
            self._registry.check_not_moved(request.free)
            worker = self._workers[request.worker]
            if isinstance(worker, ProcessWorker):
                deadline = _program_deadline(self._timeouts, request, self._registry.nbytes_of)
                async with worker.lane(request.session):
                    reply = await worker.execute(request, self._registry, deadline=deadline)
                self._count_program(request, reply)
                return reply
            if worker.idle_for_inline(is_small(request, self._registry.nbytes_of)):
                # A few microseconds of work: run it here, with no thread hop, timer or cancel flag.
                reply = self._run_program(request, backend=worker.backend, registry=self._registry)
                self._count_program(request, reply)
                return reply
            deadline = _program_deadline(self._timeouts, request, self._registry.nbytes_of)
            cancelled = threading.Event()
            program = functools.partial(
                self._run_program,
                request,
                backend=worker.backend,
                registry=self._registry,
                cancelled=cancelled,
                turn=functools.partial(worker.turn, request.session),
            )
            try:
                async with asyncio.timeout(deadline), worker.lane(request.session):
                    reply = await worker.call(program)
            except BaseException:
                cancelled.set()  # whatever stopped us (timeout, the caller gone): keep nothing
                raise
            self._count_program(request, reply)
            return reply
        except RpcRefusal as exc:
            refusal = _detached(exc)
        except TimeoutError:
            pass
        # Aborting here, outside the handlers, chains no exception (and its frames) to the abort's error.
        if refusal is not None:
            await abort(context, refusal)
        await context.abort(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"the program ran past its {deadline:.0f} s deadline"
        )

    def _count_program(self, request: agent_pb2.ExecuteRequest, reply: agent_pb2.ExecuteReply) -> None:
        self._counters.ops_executed += len(request.ops)
        self._counters.bytes_sent += sum(len(fetched.data) for fetched in reply.fetched)

    async def Free(self, request: agent_pb2.FreeRequest, context: Context) -> agent_pb2.FreeReply:
        """Free buffers by id (unknown ids skipped; any moved away refuses the call), or every buffer of a
        session."""
        refusal: RpcRefusal | None = None
        try:
            self._registry.check_not_moved(request.buffer_ids)
        except RpcRefusal as exc:
            refusal = _detached(exc)
        if refusal is not None:  # aborted outside the handler, as every refusal here
            await abort(context, refusal)
        if request.buffer_ids:
            freed, nbytes = self._registry.free(request.buffer_ids)
        elif request.session:
            freed, nbytes = self._registry.free_session(request.session)
        else:
            freed, nbytes = 0, 0
        return agent_pb2.FreeReply(freed=freed, bytes_freed=nbytes)

    async def Pull(self, request: agent_pb2.PullRequest, context: Context) -> agent_pb2.PullReply:
        """Make a buffer of row ranges pulled from other agents (and this one), peer to peer."""
        try:
            if self._puller is None:
                raise RpcRefusal("bad-request", "this agent takes no pulls")
            return await self._puller.pull(request)
        except RpcRefusal as exc:
            refusal = _detached(exc)
        # Aborting here, outside the handlers, chains no exception (and its frames) to the abort's error.
        await abort(context, refusal)

    async def RunPython(
        self, request: agent_pb2.RunPythonRequest, context: Context
    ) -> agent_pb2.RunPythonReply:
        """Run a Python task in a process of its own (see :mod:`gpupool.agent.pytask`), within the call's
        deadline (at most ``timeouts.rpc`` where the caller gave none)."""
        remaining = context.time_remaining()
        seconds = remaining if remaining is not None else self._timeouts.rpc
        refusal: RpcRefusal | None = None
        overdue = ""
        try:
            return await self._python.run(request, seconds=max(seconds - 0.5, 0.1))
        except RpcRefusal as exc:
            refusal = _detached(exc)
        except PythonOverdue as exc:
            overdue = str(exc)
        if refusal is not None:
            await abort(context, refusal)
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, overdue)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    async def Inventory(
        self, request: agent_pb2.InventoryRequest, context: Context
    ) -> agent_pb2.InventoryReply:
        """Every resident buffer, for the coordinator moving them away (:mod:`gpupool.agent.evacuation`)."""
        if self._evacuation is None:
            await abort(context, RpcRefusal("bad-request", "this agent does not move its buffers"))
        return await self._evacuation.inventory(request)

    async def Forward(self, request: agent_pb2.ForwardRequest, context: Context) -> agent_pb2.ForwardReply:
        """Free buffers that moved to other agents and forward their ids there."""
        if self._evacuation is None:
            await abort(context, RpcRefusal("bad-request", "this agent does not move its buffers"))
        return await self._evacuation.forward(request)

    async def Health(self, request: agent_pb2.HealthRequest, context: Context) -> agent_pb2.HealthReply:
        """The agent's status."""
        return agent_pb2.HealthReply(status=self._status())


def _host_of(worker: AnyWorker, array: Any) -> np.ndarray | None:
    """An upload's target as host memory to fill in place: a host-resident worker's array, or a worker
    process's array mapped here; None for device memory (filled through staging blocks)."""
    if worker.host_resident:
        host: np.ndarray = array
        return host
    if isinstance(array, RemoteArray):
        return array.host
    return None


async def _pieces(host: np.ndarray | RowStream, chunk_bytes: int) -> AsyncIterator[Any]:
    """A download's pieces of at most ``chunk_bytes``: slices of a host array, or of a stream's blocks."""
    if isinstance(host, np.ndarray):
        for piece in iter_chunks(host, chunk_bytes):
            yield piece
        return
    async for block in host.chunks():
        for start in range(0, len(block), chunk_bytes):
            yield block[start : start + chunk_bytes]


def _program_deadline(
    timeouts: Timeouts, request: agent_pb2.ExecuteRequest, resident_nbytes: Callable[[str], int]
) -> float:
    """Seconds a program may take on the agent: its work at :meth:`Timeouts.for_work`'s floors, times
    :data:`QUEUE_ALLOWANCE` for the turns other sessions' ops and this session's earlier programs take."""
    nbytes, flops = estimate_work(request, resident_nbytes)
    return QUEUE_ALLOWANCE * timeouts.for_work(nbytes, flops)


def _detached(refusal: RpcRefusal) -> RpcRefusal:
    """A copy of ``refusal`` with no traceback, cause or context: what a call aborts with.

    gRPC keeps the error an abort raises in the call's state, in a reference cycle with the handler's
    frame; chained to the original refusal, it would keep every frame that refusal passed through, and
    a failed program's arrays with them, until the cyclic collector ran.
    """
    forget_frames(refusal)
    return RpcRefusal(refusal.kind, refusal.message, buffer_id=refusal.buffer_id, extra=refusal.extra)


def _allocate(dtype: np.dtype[Any], shape: tuple[int, ...], buffer_id: str) -> np.ndarray:
    try:
        return np.empty(shape, dtype)
    except (MemoryError, ValueError) as exc:  # ValueError: a shape too large to express
        raise RpcRefusal(
            "out-of-memory", f"no host memory for {dtype.name}{list(shape)}: {exc}", buffer_id=buffer_id
        ) from exc


async def _chunks_of(requests: AsyncIterator[agent_pb2.UploadRequest]) -> AsyncIterator[bytes]:
    """The chunks of a protobuf upload after its header; a second header is refused."""
    async for request in requests:
        if request.WhichOneof("kind") != "chunk":
            raise RpcRefusal("bad-request", "a second header in one upload")
        yield request.chunk


async def _paced(chunks: AsyncIterator[bytes], stall: float) -> AsyncIterator[bytes]:
    """``chunks``, each within ``stall`` seconds of the one before.

    Raises:
        TimeoutError: a chunk took longer (its message says so).
    """
    iterator = aiter(chunks)
    while True:
        try:
            async with asyncio.timeout(stall):
                chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise TimeoutError(f"the upload stream stalled: no data for {stall:g} s") from None
        yield chunk


async def _receive_into(host: np.ndarray, chunks: AsyncIterator[bytes], buffer_id: str) -> None:
    """Fill ``host`` from the stream's chunks, in place; refuse too many bytes or too few."""
    view = host.reshape(-1).view(np.uint8).data  # cast("B") refuses shapes with a zero in them
    expected = len(view)
    received = 0
    async for chunk in chunks:
        end = received + len(chunk)
        if end > expected:
            raise RpcRefusal(
                "bad-request",
                f"the stream carries more than the declared {expected} bytes",
                buffer_id=buffer_id,
            )
        view[received:end] = chunk
        received = end
    if received != expected:
        raise RpcRefusal(
            "bad-request", f"the stream ended after {received} of {expected} bytes", buffer_id=buffer_id
        )


async def _part_chunks(
    parts: Assemblies, assembly: Assembly, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    """A part's chunks, each counted as progress of its upload; stops with the upload if another part failed.

    Raises:
        PartsFailed: the upload was dropped meanwhile.
    """
    async for chunk in chunks:
        if assembly.done.done():
            assembly.done.result()  # raises PartsFailed: a committed upload has no part still receiving
        parts.progressed(assembly)
        yield chunk


async def _receive_to_device(
    worker: AnyWorker,
    array: Any,
    expected: int,
    chunks: AsyncIterator[bytes],
    buffer_id: str,
    *,
    base: int = 0,
) -> None:
    """Fill a device array (its ``expected`` bytes from byte ``base`` on) from the stream's chunks through two
    staging blocks, in turn.

    While the worker's thread copies one full block to the device, the stream fills the other, so the
    copies overlap the network and no host copy of the whole shard is ever made. Refuses too many bytes
    or too few, like :func:`_receive_into`.
    """
    if expected == 0:
        await _receive_into(np.empty(0, np.uint8), chunks, buffer_id)  # nothing to copy; sizes still checked
        return
    block_bytes = min(STAGING_BYTES, expected)
    async with worker.staging(block_bytes) as blocks:
        views = [block.data for block in blocks]
        copies: list[asyncio.Future[None] | None] = [None, None]
        current = filled = offset = received = 0
        try:
            async for chunk in chunks:
                received += len(chunk)
                if received > expected:
                    raise RpcRefusal(
                        "bad-request",
                        f"the stream carries more than the declared {expected} bytes",
                        buffer_id=buffer_id,
                    )
                data = memoryview(chunk)
                while data:
                    taken = min(len(data), block_bytes - filled)
                    views[current][filled : filled + taken] = data[:taken]
                    filled += taken
                    data = data[taken:]
                    if filled == block_bytes:
                        copies[current] = asyncio.ensure_future(
                            worker.copy_in(array, base + offset, blocks[current], buffer_id)
                        )
                        offset += filled
                        filled = 0
                        current ^= 1
                        previous = copies[current]
                        if previous is not None:  # the block about to be filled must be on the device
                            copies[current] = None
                            await previous
            if received != expected:
                raise RpcRefusal(
                    "bad-request",
                    f"the stream ended after {received} of {expected} bytes",
                    buffer_id=buffer_id,
                )
            if filled:
                copies.append(
                    asyncio.ensure_future(
                        worker.copy_in(array, base + offset, blocks[current][:filled], buffer_id)
                    )
                )
            for waiting in copies:
                if waiting is not None:
                    await waiting
        finally:
            for left in copies:  # a refusal leaves these behind: the blocks are not free until they end
                if left is not None and not left.done():
                    with contextlib.suppress(Exception):
                        await asyncio.wait([left])
                if left is not None:
                    _ignore_outcome(left)


def _ignore_outcome(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _row_range(
    request: agent_pb2.DownloadRequest, shape: tuple[int, ...], buffer_id: str
) -> tuple[int, int] | None:
    """The rows a download asks for, checked against the buffer's shape; None for the whole buffer."""
    if not request.has_rows:
        return None
    if not shape or not 0 <= request.start <= request.stop <= shape[0]:
        raise RpcRefusal(
            "bad-request",
            f"rows [{request.start}, {request.stop}) are not rows of a buffer of shape {list(shape)}",
            buffer_id=buffer_id,
        )
    return request.start, request.stop
