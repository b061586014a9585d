"""The client's side of the agent data plane: one grpc.aio channel per agent endpoint.

Every call has a deadline from :class:`~gpupool._config.Timeouts`; gRPC failures are translated into
gpupool exceptions here and nowhere else in the client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np

from gpupool._config import CHUNK_BYTES, MAX_MESSAGE_BYTES, Timeouts
from gpupool._errors import StreamClosed
from gpupool._proto.v1 import agent_pb2, agent_pb2_grpc
from gpupool.protocol.codec import array_from_bytes, check_dtype, iter_chunks, meta_of, shape_of
from gpupool.protocol.errors import translate_rpc_error

__all__ = ["CHANNEL_OPTIONS", "AgentChannel"]

CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)


class AgentChannel:
    """Calls to one agent. Create and use it on the pool's event loop only.

    Args:
        agent_id: the agent's id, for error messages.
        endpoint: ``host:port`` of its data plane.
        timeouts: deadlines.
    """

    def __init__(self, agent_id: str, endpoint: str, timeouts: Timeouts) -> None:
        self.agent_id = agent_id
        self.endpoint = endpoint
        self._timeouts = timeouts
        self._channel = grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
        self._stub = agent_pb2_grpc.AgentStub(self._channel)  # type: ignore[no-untyped-call]

    def _error(self, exc: grpc.aio.AioRpcError) -> Exception:
        return translate_rpc_error(exc, peer=self.endpoint, agent_id=self.agent_id)

    async def upload(self, buffer_id: str, worker: int, host: np.ndarray, session: str) -> None:
        """Stream ``host`` into a new buffer on ``worker``.

        Raises:
            DeviceOutOfMemory, AgentNotAccepting, RemoteError: the agent refused it.
            DeadlineExceeded, ConnectError: the network failed.
        """
        header = agent_pb2.UploadHeader(
            buffer_id=buffer_id, worker=worker, meta=meta_of(host.dtype, host.shape), session=session
        )

        async def requests() -> AsyncIterator[agent_pb2.UploadRequest]:
            yield agent_pb2.UploadRequest(header=header)
            for chunk in iter_chunks(host):
                yield agent_pb2.UploadRequest(chunk=bytes(chunk))

        try:
            await self._stub.Upload(requests(), timeout=self._timeouts.for_stream(host.nbytes))
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc

    async def download_into(self, buffer_id: str, out: np.ndarray) -> None:
        """Stream a buffer into ``out``, a C-contiguous array of the buffer's dtype and shape.

        Raises:
            BufferNotFound: the agent does not hold it.
            StreamClosed: the stream ended early or carried the wrong size.
        """
        target = out.reshape(-1).view(np.uint8).data  # cast("B") refuses shapes with a zero in them
        offset = 0
        call = self._stub.Download(
            agent_pb2.DownloadRequest(buffer_id=buffer_id, chunk_bytes=CHUNK_BYTES),
            timeout=self._timeouts.for_stream(out.nbytes),
        )
        try:
            async for message in call:
                if message.WhichOneof("kind") == "meta":
                    if check_dtype(message.meta.dtype) != out.dtype or shape_of(message.meta) != out.shape:
                        raise StreamClosed(
                            self.endpoint, f"buffer {buffer_id} is not {out.dtype}{list(out.shape)}"
                        )
                    continue
                size = len(message.chunk)
                if offset + size > len(target):
                    raise StreamClosed(
                        self.endpoint, f"buffer {buffer_id} sent more than {len(target)} bytes"
                    )
                target[offset : offset + size] = message.chunk
                offset += size
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        if offset != len(target):
            raise StreamClosed(self.endpoint, f"buffer {buffer_id}: got {offset} of {len(target)} bytes")

    async def execute(
        self,
        worker: int,
        ops: Sequence[agent_pb2.Op],
        *,
        session: str,
        fetch: Sequence[str] = (),
        free: Sequence[str] = (),
    ) -> dict[str, np.ndarray]:
        """Run a program on ``worker``; returns the fetched buffers as host arrays.

        Raises:
            RemoteKernelError, DeviceOutOfMemory, BufferNotFound: the agent refused the program
                (and kept nothing it created).
        """
        request = agent_pb2.ExecuteRequest(worker=worker, ops=ops, fetch=fetch, free=free, session=session)
        try:
            reply = await self._stub.Execute(request, timeout=self._timeouts.rpc)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return {item.buffer_id: array_from_bytes(item.data, item.meta) for item in reply.fetched}

    async def free(self, buffer_ids: Sequence[str] = (), *, session: str = "") -> int:
        """Free buffers (or, with only ``session``, all of that session's); returns how many went."""
        try:
            reply = await self._stub.Free(
                agent_pb2.FreeRequest(buffer_ids=buffer_ids, session=session), timeout=self._timeouts.rpc
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return int(reply.freed)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close(grace=None)
