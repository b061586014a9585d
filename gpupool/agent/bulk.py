"""The agent's end of the bulk byte path: other agents read rows of a session's buffers here, over a plain
TCP socket (TLS on an enrolled agent), with no copy in user space (see :mod:`gpupool.protocol.bulk`).

Each connection carries one read. What it may read is decided as for ``DownloadRaw``: on an enrolled agent
the request shows the session's capability on this agent, and its buffer id is confined to that session
(:meth:`gpupool.agent.guard.Guard.confine_read`), so another session's buffers cannot be named; an agent run
``--insecure`` trusts its network, as its gRPC server does.

What a stranger can make it do, and no more: hold one of :data:`MAX_CONNECTIONS` slots for ``stall``
seconds (the wait for a TLS handshake and for a request; a connection past the limit is closed at once),
and be refused. Sockets and threads are blocking, with timeouts; the event loop only accepts, authorizes
and looks the rows up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import numpy as np

from gpupool._config import Timeouts
from gpupool._errors import FrameDecodeError
from gpupool._proto.v1 import agent_pb2
from gpupool.agent.procworker import RowStream
from gpupool.agent.status import Counters
from gpupool.protocol import bulk
from gpupool.protocol.codec import meta_of
from gpupool.protocol.errors import RpcRefusal

__all__ = ["MAX_CONNECTIONS", "BulkServer"]

log = logging.getLogger(__name__)

#: Connections served at once (each a thread while it moves bytes); more are closed as they arrive.
MAX_CONNECTIONS: Final = 16

ReadRows = Callable[[agent_pb2.DownloadRequest], Awaitable[np.ndarray | RowStream]]
Confine = Callable[[agent_pb2.DownloadRequest, str], None]


class BulkServer:
    """Serves reads of rows on a listening socket. Start and close it on the agent's event loop.

    Args:
        read_rows: the rows a request names, on the host (refusing with :class:`RpcRefusal`).
        confine: checks the capability and confines the request to its session (in place); None on an
            insecure agent.
        counters: bytes sent are added here.
        timeouts: ``stall`` bounds each wait for the peer, ``for_stream(nbytes)`` each read in all.
        tls: the server context (None: plaintext).
    """

    def __init__(
        self,
        *,
        read_rows: ReadRows,
        confine: Confine | None,
        counters: Counters,
        timeouts: Timeouts,
        tls: ssl.SSLContext | None,
    ) -> None:
        self._read_rows = read_rows
        self._confine = confine
        self._counters = counters
        self._timeouts = timeouts
        self._tls = tls
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: dict[asyncio.Task[None], socket.socket] = {}
        self._threads = ThreadPoolExecutor(max_workers=MAX_CONNECTIONS, thread_name_prefix="gpupool-bulk")
        self.port = 0
        #: Reads served in full (for the agent's log and for tests).
        self.reads = 0

    async def start(self, host: str, port: int = 0) -> int:
        """Listen on ``host:port`` (0: a free port) and serve; the port bound.

        Raises:
            OSError: the address cannot be bound.
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host.strip("[]"), port))
            listener.listen(64)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accepting = asyncio.create_task(self._accept_loop(listener), name="gpupool-bulk.accept")
        return self.port

    async def close(self) -> None:
        """Stop listening and end every connection (a transfer in flight breaks off)."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for task, sock in list(self._connections.items()):
            _shut(sock)
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=self._timeouts.stall)
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:  # out of descriptors, a reset before accept: keep listening
                log.warning("bulk path: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if len(self._connections) >= MAX_CONNECTIONS:
                sock.close()
                continue
            task = asyncio.create_task(self._serve(sock))
            self._connections[task] = sock
            task.add_done_callback(self._connections.pop)

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn: socket.socket = sock
        try:
            conn, request, token = await loop.run_in_executor(self._threads, self._open, sock)
            self._connections[asyncio.current_task()] = conn  # type: ignore[index]  # shut this one on close
            try:
                if self._confine is not None:
                    self._confine(request, token)
                host = await self._read_rows(request)
            except RpcRefusal as refusal:
                await loop.run_in_executor(self._threads, conn.sendall, bulk.encode_refusal(refusal))
                return
            nbytes = await loop.run_in_executor(self._threads, self._send, conn, host)
            self._counters.bytes_sent += nbytes
            self.reads += 1
        except (OSError, TimeoutError, ConnectionError, FrameDecodeError) as exc:
            log.debug("bulk path: a connection ended early: %s", exc)
        finally:
            _shut(conn)
            conn.close()

    def _open(self, sock: socket.socket) -> tuple[socket.socket, agent_pb2.DownloadRequest, str]:
        """In a thread: the TLS handshake (where there is TLS) and the request, each within ``stall``."""
        sock.setblocking(True)
        sock.settimeout(self._timeouts.stall)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = sock if self._tls is None else self._tls.wrap_socket(sock, server_side=True)
        try:
            request, token = bulk.read_request(conn)
        except BaseException:
            conn.close()
            raise
        return conn, request, token

    def _send(self, conn: socket.socket, host: np.ndarray | RowStream) -> int:
        """In a thread: the meta, then the rows' memory as it lies (copied only if not contiguous), or as it
        comes from a worker process's staging blocks."""
        if isinstance(host, RowStream):
            deadline = time.monotonic() + self._timeouts.for_stream(host.nbytes)
            conn.sendall(bulk.encode_meta(meta_of(host.dtype, host.shape)))
            for chunk in host.chunks_sync(self._timeouts.stall):
                bulk.send_all(conn, chunk, deadline=deadline)
            return host.nbytes
        array: Any = np.asarray(host, order="C")  # ascontiguousarray would make a 0-d array 1-d
        deadline = time.monotonic() + self._timeouts.for_stream(array.nbytes)
        conn.sendall(bulk.encode_meta(meta_of(array.dtype, tuple(array.shape))))
        bulk.send_all(conn, memoryview(array.reshape(-1).view(np.uint8)), deadline=deadline)
        return int(array.nbytes)


def _shut(sock: socket.socket) -> None:
    """Wake a thread blocked on ``sock`` (a closed descriptor would not)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
