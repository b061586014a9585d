"""The agent's gRPC data plane (``gpupool.v1.Agent``): shards in and out, programs, frees, health.

Each handler refuses a call by raising :class:`RpcRefusal` inside, which becomes a status code and the
``gpupool-error`` metadata (see ``protos/gpupool/v1/agent.proto``); after a refusal every reservation
the call made is released, so the agent serves the next call as if the refused one never came.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final

import grpc
import numpy as np

from gpupool._config import CHUNK_BYTES, MAX_MESSAGE_BYTES, Timeouts
from gpupool._errors import UnsupportedDType
from gpupool._proto.v1 import agent_pb2, agent_pb2_grpc, control_pb2
from gpupool.agent.buffers import BufferRegistry, Reservation
from gpupool.agent.program import run_program
from gpupool.agent.status import Counters
from gpupool.agent.workers import Worker
from gpupool.protocol.codec import check_dtype, iter_chunks, meta_of, shape_of
from gpupool.protocol.errors import RpcRefusal, abort

__all__ = ["AgentService"]

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

#: Smallest and largest Download chunk honoured; a request outside is clamped.
MIN_CHUNK_BYTES: Final = 1 << 10
MAX_CHUNK_BYTES: Final = MAX_MESSAGE_BYTES - (1 << 16)


class AgentService(agent_pb2_grpc.AgentServicer):
    """The servicer. Runs on the event loop; compute goes to each worker's thread.

    Args:
        workers: the agent's workers, by index.
        registry: the resident buffers.
        counters: work counters for telemetry (updated here).
        accepting: whether new uploads are taken now (False while draining or stopping).
        status: the agent's current status, for Health.
        timeouts: deadlines; an upload or download gets ``timeouts.for_stream(nbytes)``, the header ``rpc``.
        execute_deadline: most seconds a program may take, queueing behind others included.
    """

    def __init__(
        self,
        *,
        workers: Sequence[Worker],
        registry: BufferRegistry,
        counters: Counters,
        accepting: Callable[[], bool],
        status: Callable[[], control_pb2.AgentStatus],
        timeouts: Timeouts = Timeouts(),
        execute_deadline: float | None = None,
    ) -> None:
        self._workers = tuple(workers)
        self._registry = registry
        self._counters = counters
        self._accepting = accepting
        self._status = status
        self._timeouts = timeouts
        self._execute_deadline = execute_deadline or 10 * timeouts.rpc

    async def Upload(
        self, request_iterator: AsyncIterator[agent_pb2.UploadRequest], context: Context
    ) -> agent_pb2.UploadReply:
        """Receive a shard: a header, then raw chunks, into a preallocated host array."""
        reservation: Reservation | None = None
        try:
            requests = aiter(request_iterator)
            async with asyncio.timeout(self._timeouts.rpc):
                first = await anext(requests, None)
            if first is None or first.WhichOneof("kind") != "header":
                raise RpcRefusal("bad-request", "an upload starts with a header")
            header = first.header
            worker, dtype, shape, nbytes = self._check_header(header)
            reservation = self._registry.reserve(
                worker=worker.index, buffer_id=header.buffer_id, nbytes=nbytes, session=header.session
            )
            host = _allocate(dtype, shape, header.buffer_id)
            async with asyncio.timeout(self._timeouts.for_stream(nbytes)):
                await _receive_into(host, requests, header.buffer_id)
            array = host
            if not worker.backend.host_resident:
                array = await worker.call(_to_device, worker, host, header.buffer_id)
            self._registry.commit(reservation, array)
            self._counters.bytes_received += nbytes
            return agent_pb2.UploadReply(buffer_id=header.buffer_id, nbytes=nbytes)
        except RpcRefusal as refusal:
            await abort(context, refusal)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the upload stream stalled past its deadline"
            )
        finally:
            if reservation is not None:
                self._registry.release(reservation)  # a no-op once committed

    def _check_header(
        self, header: agent_pb2.UploadHeader
    ) -> tuple[Worker, np.dtype[Any], tuple[int, ...], int]:
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
        """Send a shard: its meta, then raw chunks."""
        try:
            buffer = self._registry.get(request.buffer_id)
            worker = self._workers[buffer.worker]
            host = buffer.array
            if not worker.backend.host_resident:
                host = await worker.call(_to_host, worker, buffer.array, buffer.buffer_id)
            chunk_bytes = min(max(request.chunk_bytes or CHUNK_BYTES, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)
            async with asyncio.timeout(self._timeouts.for_stream(host.nbytes)):
                await context.write(agent_pb2.DownloadChunk(meta=meta_of(host.dtype, tuple(host.shape))))
                for piece in iter_chunks(host, chunk_bytes):
                    await context.write(agent_pb2.DownloadChunk(chunk=bytes(piece)))
                    self._counters.bytes_sent += len(piece)
        except RpcRefusal as refusal:
            await abort(context, refusal)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the download stream stalled past its deadline"
            )

    async def Execute(self, request: agent_pb2.ExecuteRequest, context: Context) -> agent_pb2.ExecuteReply:
        """Run a program on one worker, all or nothing."""
        cancelled = threading.Event()
        try:
            self._registry.check_worker(request.worker)
            worker = self._workers[request.worker]
            program = functools.partial(
                run_program, request, backend=worker.backend, registry=self._registry, cancelled=cancelled
            )
            try:
                async with asyncio.timeout(self._execute_deadline):
                    reply = await worker.call(program)
            except BaseException:
                cancelled.set()  # whatever stopped us (timeout, the caller gone): keep nothing
                raise
            self._counters.ops_executed += len(request.ops)
            self._counters.bytes_sent += sum(len(fetched.data) for fetched in reply.fetched)
            return reply
        except RpcRefusal as refusal:
            await abort(context, refusal)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"the program ran past {self._execute_deadline:.0f} s"
            )

    async def Free(self, request: agent_pb2.FreeRequest, context: Context) -> agent_pb2.FreeReply:
        """Free buffers by id (unknown ids skipped), or every buffer of a session."""
        if request.buffer_ids:
            freed, nbytes = self._registry.free(request.buffer_ids)
        elif request.session:
            freed, nbytes = self._registry.free_session(request.session)
        else:
            freed, nbytes = 0, 0
        return agent_pb2.FreeReply(freed=freed, bytes_freed=nbytes)

    async def Health(self, request: agent_pb2.HealthRequest, context: Context) -> agent_pb2.HealthReply:
        """The agent's status."""
        return agent_pb2.HealthReply(status=self._status())


def _allocate(dtype: np.dtype[Any], shape: tuple[int, ...], buffer_id: str) -> np.ndarray:
    try:
        return np.empty(shape, dtype)
    except (MemoryError, ValueError) as exc:  # ValueError: a shape too large to express
        raise RpcRefusal(
            "out-of-memory", f"no host memory for {dtype.name}{list(shape)}: {exc}", buffer_id=buffer_id
        ) from exc


async def _receive_into(
    host: np.ndarray, requests: AsyncIterator[agent_pb2.UploadRequest], buffer_id: str
) -> None:
    """Fill ``host`` from the stream's chunks, in place; refuse too many bytes or too few."""
    view = host.reshape(-1).view(np.uint8).data
    expected = len(view)
    received = 0
    async for request in requests:
        if request.WhichOneof("kind") != "chunk":
            raise RpcRefusal("bad-request", "a second header in one upload", buffer_id=buffer_id)
        chunk = request.chunk
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


def _to_device(worker: Worker, host: np.ndarray, buffer_id: str) -> Any:
    """In the worker's thread: copy an uploaded array to the device."""
    try:
        return worker.backend.to_device(host)
    except worker.backend.out_of_memory_errors as exc:
        raise RpcRefusal(
            "out-of-memory",
            f"worker {worker.index}: the device ran out of memory: {exc}",
            buffer_id=buffer_id,
        ) from exc
    except worker.backend.kernel_errors as exc:
        raise RpcRefusal("kernel-failed", f"worker {worker.index}: {exc}", buffer_id=buffer_id) from exc


def _to_host(worker: Worker, array: Any, buffer_id: str) -> np.ndarray:
    """In the worker's thread: copy a device array to the host."""
    try:
        return worker.backend.to_host(array)
    except worker.backend.out_of_memory_errors as exc:
        raise RpcRefusal(
            "out-of-memory", f"no host memory for buffer {buffer_id}: {exc}", buffer_id=buffer_id
        ) from exc
    except worker.backend.kernel_errors as exc:
        raise RpcRefusal("kernel-failed", f"worker {worker.index}: {exc}", buffer_id=buffer_id) from exc
